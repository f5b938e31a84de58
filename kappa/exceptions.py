"""Typed errors. Each carries the coordinates an operator needs to act on it."""

from __future__ import annotations


class KappaError(Exception):
    """Base class of every error raised by kappa-etl."""


class ConfigurationError(KappaError):
    """A setting is missing, malformed or points at something that does not answer.

    The message always starts with the name of the setting.
    """

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")


class LogResetError(KappaError):
    """The event store holds less than the ledger says was loaded, or the topic was recreated.

    Raised instead of skipping or re-loading anything: the operator decides.
    """

    def __init__(self, asset: str, topic: str, partition: int, detail: str) -> None:
        self.asset = asset
        self.topic = topic
        self.partition = partition
        super().__init__(
            f"{asset}: {topic}[{partition}] {detail} Nothing was skipped or re-loaded and no EDW "
            f"rows were touched; {asset} stops here until an operator acts "
            f"(to reload {asset} from the log as it is now: `kappa replay {asset}`)."
        )


class OffsetOutOfRangeError(KappaError):
    """A batch asked for positions the log no longer (or not yet) holds."""

    def __init__(self, topic: str, partition: int, start: int, end: int, detail: str) -> None:
        self.topic = topic
        self.partition = partition
        self.start = start
        self.end = end
        super().__init__(f"{topic}[{partition}] offsets [{start}, {end}): {detail}")


class BatchSupersededError(KappaError):
    """Another run committed this shard's positions first; this batch's work is discarded."""


class EventStoreTimeoutError(KappaError):
    """The event store did not answer within the configured timeout."""


class ReprocessError(KappaError):
    """A partition cannot be reprocessed as asked: the positions it needs are gone, its
    predecessor is not loaded, or the state checkpoint at its start is missing.

    Raised before anything is deleted: the EDW is left exactly as it was.
    """

    def __init__(
        self,
        asset: str,
        topic: str,
        partition: int,
        window: str,
        start: int,
        end: int,
        detail: str,
        *,
        positions: str = "offsets",
    ) -> None:
        self.asset = asset
        self.topic = topic
        self.partition = partition
        self.window = window
        self.start = start
        self.end = end
        super().__init__(
            f"{asset} partition {window}: {topic}[{partition}] {positions} [{start}, {end}): {detail} "
            "Nothing in the EDW was changed."
        )


class MassRefusalError(KappaError):
    """The database refuses so many records of one batch that the cause is the table (a
    constraint, a trigger, a migration), not the records: nothing is dead-lettered, the
    batch fails and is retried, and the shard shows as stopped until the cause is fixed."""

    def __init__(self, refused: int, size: int, message: str) -> None:
        self.refused = refused
        self.size = size
        super().__init__(
            f"the database refused more than {refused} of the batch's {size} records "
            f"(first: {message}); that is not poison in the data but a table that takes "
            "nothing: nothing was dead-lettered, fix the table and the batch loads"
        )
