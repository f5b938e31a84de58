import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kappa.cursor import OffsetCursor
from kappa.edw.types import LedgerHead
from kappa.exceptions import LogResetError
from kappa.ingest.outcome import trim_range
from kappa.ingest.plan import plan_ranges
from kappa.sources.base import TRANSACTIONS, LogBounds, check_continuity


def head(partition: int, end: int, epoch: str = "t1") -> LedgerHead:
    return LedgerHead("fact_order", "orders", partition, epoch=epoch, end=end, batches=1)


def test_ranges_start_at_the_ledger_and_are_capped_per_partition():
    heads = {0: head(0, 100), 1: head(1, 50)}
    bounds = {0: LogBounds(0, 130), 1: LogBounds(0, 5000), 2: LogBounds(7, 9), 3: LogBounds(0, 0)}
    ranges = plan_ranges("orders", heads, bounds, max_batch=1000, max_run=10_000)
    assert [(r.partition, r.start, r.end) for r in ranges] == [
        (0, 100, 130),
        (1, 50, 1050),
        (2, 7, 9),
    ]


def test_busy_partitions_are_left_alone():
    bounds = {0: LogBounds(0, 10), 1: LogBounds(0, 10)}
    ranges = plan_ranges("orders", {}, bounds, busy=frozenset({0}), max_batch=100, max_run=100)
    assert [r.partition for r in ranges] == [1]


def test_the_run_budget_serves_the_most_lagging_partitions_first():
    bounds = {0: LogBounds(0, 10), 1: LogBounds(0, 500), 2: LogBounds(0, 300)}
    ranges = plan_ranges("orders", {}, bounds, max_batch=400, max_run=600)
    assert [(r.partition, r.start, r.end) for r in ranges] == [(1, 0, 400), (2, 0, 200)]


def test_no_partition_starves_while_every_partition_lags():
    """Producers stay ahead of the run budget: every partition is still served, in turn."""
    heads: dict[int, LedgerHead] = {}
    served: set[int] = set()
    for tick in range(1, 4):
        bounds = {p: LogBounds(0, 5000 * tick) for p in range(4)}
        for r in plan_ranges("orders", heads, bounds, max_batch=500, max_run=1200):
            served.add(r.partition)
            heads[r.partition] = head(r.partition, r.end)
    assert served == {0, 1, 2, 3}


@settings(deadline=None)  # what is tested is the cover, not the time (CI machines are shared)
@given(
    ends=st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=6),
    max_batch=st.integers(min_value=1, max_value=700),
    max_run=st.integers(min_value=1, max_value=2000),
)
def test_repeated_planning_covers_every_log_without_gap_or_overlap(ends, max_batch, max_run):
    """Apply planned ranges to the ledger until nothing is left: contiguous, bounded cover."""
    bounds = {p: LogBounds(0, end) for p, end in enumerate(ends)}
    heads: dict[int, LedgerHead] = {}
    covered: dict[int, list[tuple[int, int]]] = {p: [] for p in bounds}
    for _ in range(100_000):
        ranges = plan_ranges("orders", heads, bounds, max_batch=max_batch, max_run=max_run)
        if not ranges:
            break
        assert sum(r.end - r.start for r in ranges) <= max_run
        for r in ranges:
            assert 0 < r.end - r.start <= max_batch
            covered[r.partition].append((r.start, r.end))
            heads[r.partition] = head(r.partition, r.end)
    for p, spans in covered.items():
        position = 0
        for start, end in spans:
            assert start == position
            position = end
        assert position == bounds[p].end


def test_continuity_accepts_a_log_that_extends_the_ledger():
    check_continuity("fact_order", "orders", 0, head(0, 10), LogBounds(0, 10), "t1")
    check_continuity("fact_order", "orders", 0, head(0, 10), LogBounds(10, 20), "t1")
    check_continuity("fact_order", "orders", 0, None, LogBounds(5, 20), "t1")


@pytest.mark.parametrize(
    ("ledger", "bounds", "epoch", "words"),
    [
        (
            head(2, 500),
            LogBounds(0, 120),
            "t1",
            "the ledger has loaded offsets up to 500, the log now ends at 120",
        ),
        (head(2, 500), LogBounds(0, 900), "t2", "was recreated"),
        # A log grown past the ledger, from a broker that reports no id: not taken on trust.
        (head(2, 500), LogBounds(0, 900), "", "and no topic id is reported now"),
        (head(2, 500), LogBounds(600, 900), "t1", "expired offsets [500, 600)"),
    ],
)
def test_continuity_refuses_reset_recreated_and_expired_logs(ledger, bounds, epoch, words):
    with pytest.raises(LogResetError) as caught:
        check_continuity("fact_order", "orders", 2, ledger, bounds, epoch)
    message = str(caught.value)
    assert words in message
    assert message.startswith("fact_order: orders[2] ")
    assert "Nothing was skipped or re-loaded" in message


def test_a_change_table_is_refused_when_recreated_and_named_in_its_own_terms():
    ledger = head(0, 812, epoch="5:100")
    with pytest.raises(LogResetError) as caught:
        check_continuity(
            "dim_customer", "cdc.c_changes", 0, ledger, None, "5:200", positions=TRANSACTIONS
        )
    assert str(caught.value).startswith(
        "dim_customer: cdc.c_changes[0] was recreated: the ledger loaded transactions up to 812 "
        "of change table 5:100, the OLTP database now has 5:200. Nothing was skipped"
    )


def test_a_change_table_is_not_held_to_bounds_it_does_not_have():
    # A change table keeps every change: its horizon is no log end the ledger could pass.
    ledger = head(0, 812, epoch="5:100")
    check_continuity(
        "dim_customer",
        "cdc.c_changes",
        0,
        ledger,
        LogBounds(0, 10),
        "5:100",
        positions=TRANSACTIONS,
    )


def test_a_requested_range_starts_where_the_ledger_ends_and_stops_where_records_are_ready():
    def ready(start: int) -> int:
        return min(start + 100, 250)

    fresh = trim_range(None, first=7, ready_end=ready, requested_start=None, requested_end=None)
    assert (fresh.start, fresh.end, fresh.skipped) == (7, 107, None)
    capped = trim_range(
        head(0, 200), first=0, ready_end=ready, requested_start=200, requested_end=230
    )
    assert (capped.start, capped.end, capped.skipped) == (200, 230, None)
    at_log_end = trim_range(
        head(0, 200), first=0, ready_end=ready, requested_start=None, requested_end=900
    )
    assert (at_log_end.start, at_log_end.end) == (200, 250)


def test_a_range_behind_the_ledger_is_already_loaded_and_one_past_a_rewound_ledger_superseded():
    def ready(start: int) -> int:
        return start + 100

    behind = trim_range(
        head(0, 500), first=0, ready_end=ready, requested_start=300, requested_end=400
    )
    assert (behind.start, behind.end, behind.skipped) == (500, 500, "already loaded")
    rewound = trim_range(
        head(0, 100), first=0, ready_end=ready, requested_start=300, requested_end=400
    )
    assert (rewound.start, rewound.end, rewound.skipped) == (100, 100, "superseded")
    nothing_ready = trim_range(
        head(0, 50), first=0, ready_end=lambda s: s, requested_start=None, requested_end=None
    )
    assert nothing_ready.skipped == "already loaded"


def test_cursor_round_trips_and_starts_a_new_generation_when_empty():
    cursor = OffsetCursor.parse(None)
    cursor.seq = 7
    cursor.log_end = {"0": 12}
    again = OffsetCursor.parse(cursor.dump())
    assert again == cursor
