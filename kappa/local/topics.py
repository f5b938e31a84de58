"""Topics on a Kafka-API broker, created idempotently with their partitions."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kappa.exceptions import ConfigurationError
from kappa.local.processes import LocalStackError

log = logging.getLogger(__name__)


def _admin_client(bootstrap_servers: str, timeout_s: float) -> Any:
    from kafka.admin import KafkaAdminClient

    timeout_ms = max(100, int(timeout_s * 1000))
    return KafkaAdminClient(
        bootstrap_servers=[s.strip() for s in bootstrap_servers.split(",") if s.strip()],
        client_id="kappa-localstack",
        bootstrap_timeout_ms=timeout_ms,
        request_timeout_ms=max(timeout_ms, 1000),
    )


def list_topics(bootstrap_servers: str, timeout_s: float) -> list[str]:
    admin = _admin_client(bootstrap_servers, timeout_s)
    try:
        return list(admin.list_topics())
    finally:
        admin.close()


def ensure_topics(
    bootstrap_servers: str, topics: Mapping[str, int], timeout_s: float
) -> dict[str, int]:
    """Create the missing topics (name -> partitions); existing topics stay untouched.

    Returns the partition count of every requested topic as the broker reports it (an existing
    topic keeps its own count; a warning is logged when it differs from the requested one).
    Raises :class:`ConfigurationError` (``KAFKA_BOOTSTRAP_SERVERS``) when no broker answers.
    """
    from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

    for name, partitions in topics.items():
        if int(partitions) < 1:
            raise ValueError(f"topic {name!r}: partitions must be >= 1, got {partitions}")
    try:
        admin = _admin_client(bootstrap_servers, timeout_s)
    except KafkaError as exc:
        raise ConfigurationError(
            "KAFKA_BOOTSTRAP_SERVERS",
            f"no broker answered at {bootstrap_servers} within {timeout_s:g} s "
            f"({type(exc).__name__})",
        ) from None
    try:
        existing = set(admin.list_topics())
        missing = {name: n for name, n in topics.items() if name not in existing}
        if missing:
            response = admin.create_topics(
                {
                    name: {"num_partitions": int(n), "replication_factor": -1}
                    for name, n in missing.items()
                },
                timeout_ms=max(100, int(timeout_s * 1000)),
                raise_errors=False,
            )
            failures = []
            for result in response.get("topics", []):
                code = result.get("error_code", 0)
                if code in (0, TopicAlreadyExistsError.errno):
                    if code == 0:
                        log.info(
                            "created topic %s (%s partitions)",
                            result["name"],
                            missing[result["name"]],
                        )
                    continue
                failures.append(
                    f"{result.get('name')}: {result.get('error_message') or f'error {code}'}"
                )
            if failures:
                raise LocalStackError(
                    f"cannot create topics on {bootstrap_servers}: " + "; ".join(failures)
                )
        try:
            admin.wait_for_topics(list(topics), timeout_ms=max(100, int(timeout_s * 1000)))
        except KafkaTimeoutError as exc:
            raise LocalStackError(
                f"topics not ready on {bootstrap_servers} after {timeout_s:g} s: {exc}"
            ) from None
        counts = {
            t["name"]: len(t.get("partitions") or []) for t in admin.describe_topics(list(topics))
        }
    except KafkaError as exc:
        raise ConfigurationError(
            "KAFKA_BOOTSTRAP_SERVERS",
            f"the broker at {bootstrap_servers} failed while creating topics: {exc}",
        ) from None
    finally:
        admin.close()
    for name, wanted in topics.items():
        if counts.get(name) != wanted and name in existing:
            log.warning(
                "topic %s exists with %s partitions (%s requested); left untouched",
                name,
                counts.get(name),
                wanted,
            )
    return {name: counts.get(name, 0) for name in topics}
