"""The engine's documented environment variables: name, default and meaning of each (the
README's configuration table lists every one; a test checks it). :mod:`kappa.settings`
reads and validates them."""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_PG_PORT = 55432
LOCAL_BROKER_PORT = 19092


@dataclass(frozen=True)
class Setting:
    """One documented environment variable (the README's configuration table is built from these)."""

    name: str
    default: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("KAPPA_HOME", ".kappa", "Local state: embedded PostgreSQL data, DAGSTER_HOME, logs."),
    Setting(
        "KAFKA_BOOTSTRAP_SERVERS",
        "",
        "Kafka-API brokers (Redpanda in production). Empty: `kappa up` starts a local broker.",
    ),
    Setting(
        "KAPPA_EDW_URL",
        "",
        "PostgreSQL URL of the EDW (facts, ledger, dead letters). Empty: the embedded server.",
    ),
    Setting(
        "KAPPA_DAGSTER_PG_URL",
        "",
        "PostgreSQL URL for Dagster's run, event-log and schedule storage. Empty: the embedded server.",
    ),
    Setting(
        "KAPPA_OLTP_URL",
        "",
        "PostgreSQL URL of the OLTP database with the captured tables and change tables. Empty: the embedded server.",
    ),
    Setting(
        "KAPPA_MARIADB_URL",
        "",
        "MariaDB server of the catalogue's `engine: mariadb` tables (`mysql://user:password@host:port/`). "
        "Empty: `kappa up` starts a local `mariadbd` when one is installed, else turns those tables off.",
    ),
    Setting(
        "KAPPA_CAPTURES_OFF",
        "",
        "Captured tables (catalogue `name`s, comma-separated) not captured by this deployment: "
        "no asset, sensor or checks; their EDW tables stay.",
    ),
    Setting(
        "KAPPA_CATALOG",
        "catalog.yaml",
        "The catalogue: event streams (`streams:`), captured OLTP tables (`tables:`) and what "
        "the local stack runs (`local:`); "
        "relative paths are taken from the repository root.",
    ),
    Setting("KAPPA_PG_PORT", str(LOCAL_PG_PORT), "Port of the embedded PostgreSQL (127.0.0.1)."),
    Setting("KAPPA_BROKER_PORT", str(LOCAL_BROKER_PORT), "Port of the local broker (127.0.0.1)."),
    Setting("KAPPA_MARIADB_PORT", "3307", "Port of the local MariaDB server (127.0.0.1)."),
    Setting(
        "KAPPA_BROKER_STORAGE",
        "memory",
        "Storage of the local broker: `memory` (nothing kept across restarts) or `durable` "
        "(experimental: its log in `$KAPPA_HOME/broker`, kept across restarts; its fetches "
        "stall under the whole stack, see Known limits of the local broker).",
    ),
    Setting("KAPPA_EDW_SCHEMA", "edw", "Schema of the EDW tables."),
    Setting("KAPPA_META_SCHEMA", "kappa", "Schema of the ledger and dead-letter tables."),
    Setting("KAPPA_TOPIC_PARTITIONS", "4", "Partitions per topic when `kappa up` creates topics."),
    Setting("KAPPA_BATCH_MAX_RECORDS", "50000", "Upper bound of one batch, per topic partition."),
    Setting("KAPPA_RUN_MAX_RECORDS", "200000", "Upper bound of one run, over all its partitions."),
    Setting(
        "KAPPA_RUN_MEMORY_RECORDS",
        "20000",  # kappa.ingest.budget.RUN_MEMORY_RECORDS
        "Records the batches of a micro-batch run hold in memory together while it loads its "
        "partitions in parallel; a batch waits while the others hold too many, and a larger "
        "batch loads alone, so a run holds at most this or one batch bound.",
    ),
    Setting(
        "KAPPA_SENSOR_INTERVAL_S",
        "5",
        "Seconds between the offset and capture sensors' ticks "
        "(Dagster's daemon looks at its sensors every 5 s: below 5, every 5 s).",
    ),
    Setting(
        "KAPPA_PARTITIONS",
        "daily",
        "Time partitions of the ingestion assets by arrival time: `daily` or `hourly` (UTC).",
    ),
    Setting(
        "KAPPA_PARTITIONS_START",
        "2026-11-01",
        "First partition (UTC date, or date and hour for `hourly`); older records belong to it.",
    ),
    Setting("KAPPA_KAFKA_TIMEOUT_S", "5", "Timeout of each broker call, in seconds."),
    Setting(
        "KAPPA_RUN_RETRIES",
        "3",
        "Automatic retries of a failed micro-batch run; a shard whose last "
        "KAPPA_RUN_RETRIES + 1 runs failed shows as stopped.",
    ),
    Setting(
        "KAPPA_RUN_MAX_RUNTIME_S",
        "600",
        "A micro-batch run still going after this many seconds is failed (then retried): "
        "a run whose process died with the daemon or its machine stops holding its partitions.",
    ),
    Setting("KAPPA_MAX_CONCURRENT_RUNS", "4", "Runs the Dagster run queue lets run at once."),
    Setting(
        "KAPPA_RUN_LAUNCHER",
        "celery",
        "How runs execute: `celery` (in warm Celery worker processes that imported the code "
        "location once; `kappa up` starts them) or `process` (Dagster's default: a new Python "
        "process per run).",
    ),
    Setting(
        "KAPPA_CELERY_BROKER_URL",
        "",
        "Celery broker of the run workers (`redis://host:6379/0`, `amqp://...`, "
        "`sqla+postgresql://...`). Empty: kombu's SQLAlchemy transport on the Dagster database.",
    ),
    Setting(
        "KAPPA_CELERY_BACKEND_URL",
        "",
        "Celery result backend, where the workers' heartbeats go (`redis://...`, "
        "`db+postgresql://...`). Empty: Celery's database backend on the Dagster database.",
    ),
    Setting(
        "KAPPA_WORKERS",
        "",
        "Run worker processes `kappa up` starts for live micro-batches (queue `kappa-live`). "
        "Empty: the machine's cores, at least 2.",
    ),
    Setting(
        "KAPPA_BACKFILL_WORKERS",
        "1",
        "Run worker processes `kappa up` starts for backfill runs (queue `kappa-backfill`); "
        "at most this many backfill runs run at once. 0: `kappa up` starts none (workers "
        "elsewhere serve the queue).",
    ),
    Setting("KAPPA_UI_PORT", "3000", "Port of the Dagster webserver (bound to 127.0.0.1)."),
    Setting(
        "KAPPA_ENRICH_MAX_WAIT_S",
        "1",
        "How long a batch of events waits for change capture to cover its event times; rows "
        "still newer are `provisional` and healed later.",
    ),
    Setting(
        "KAPPA_BACKFILL_MAX_WAIT_S",
        "0",
        "How long a backfill (or heal) of one partition waits, in all, for change capture to "
        "cover its event times; rows still newer are `provisional` and healed later.",
    ),
    Setting(
        "KAPPA_HEAL_INTERVAL_S",
        "30",
        "Seconds between evaluations of the heal sensors, which re-derive partitions with "
        "`provisional` rows once change capture covers them.",
    ),
    Setting(
        "KAPPA_STATE_CACHE_KEYS",
        "200000",
        "State keys held in memory per run (LRU over PostgreSQL).",
    ),
    Setting(
        "KAPPA_FRESHNESS_MAX_LAG_S",
        "300",
        "Freshness check: the oldest record or change not yet in the EDW may be this many seconds old.",
    ),
    Setting(
        "KAPPA_RUN_RETENTION_HOURS",
        "48",
        "Finished micro-batch runs and their event logs are deleted from Dagster's storage this "
        "many hours after they end, once their time partition is closed and summarised "
        "(backfill, heal and check runs are kept). 0: keep every run.",
    ),
    Setting(
        "KAPPA_RUN_RETENTION_DELETES",
        "200",
        "Most runs the retention sensor deletes per tick (one tick a minute).",
    ),
)
