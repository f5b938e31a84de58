"""COPY's text format as the fact rows are written: NULLs, escapes, exact doubles, instants."""

import numpy as np
import pandas as pd

from kappa.edw.copy import copy_text


def test_text_columns_escape_only_what_copy_reads_specially_and_keep_empty_strings():
    frame = pd.DataFrame(
        {
            "t": pd.Series(
                ["a\tb", "line\nbreak", "back\\slash", "", None, "cr\r"], dtype="string"
            ),
            "o": pd.Series(["x", None, "y", "z", "", "w"], dtype=object),
        }
    )
    assert copy_text(frame) == (
        "a\\tb\tx\nline\\nbreak\t\\N\nback\\\\slash\ty\n\tz\n\\N\t\ncr\\r\tw\n"
    )


def test_numbers_are_written_exactly_and_nulls_as_null():
    frame = pd.DataFrame(
        {
            "amount": [19.99, 0.1, np.nan, 1e-7],
            "count": pd.array([1, None, 3, -4], dtype="Int64"),
            "offset": np.array([0, 1, 2, 2**62], dtype=np.int64),
            "flag": pd.array([True, False, None, True], dtype="boolean"),
        }
    )
    assert copy_text(frame) == (
        "19.99\t1\t0\tt\n0.1\t\\N\t1\tf\n\\N\t3\t2\t\\N\n1e-07\t-4\t4611686018427387904\tt\n"
    )


def test_instants_are_utc_with_microseconds():
    times = pd.Series(
        pd.to_datetime(["2026-11-26T05:59:00.250001+01:00", None], utc=True, format="ISO8601")
    )
    assert copy_text(pd.DataFrame({"at": times})) == ("2026-11-26T04:59:00.250001+00:00\n\\N\n")


def test_a_column_of_other_objects_is_left_to_the_csv_path():
    from decimal import Decimal

    assert copy_text(pd.DataFrame({"d": [Decimal("1.10"), None]})) is None
    assert copy_text(pd.DataFrame({"naive": pd.to_datetime(["2026-01-01"])})) is None


def test_pieces_of_a_copy_join_to_the_whole_text_and_are_judged_whole_first():
    from decimal import Decimal

    from kappa.edw.copy import copy_chunks

    frame = pd.DataFrame(
        {
            "n": np.arange(10, dtype=np.int64),
            "t": pd.Series([f"v{i}\t" if i % 3 else None for i in range(10)], dtype=object),
            "at": pd.Series(pd.to_datetime(["2026-11-26T05:59:00Z"] * 10, utc=True)),
        }
    )
    pieces = list(copy_chunks(frame, rows=3) or [])
    assert len(pieces) == 4
    assert [p.count("\n") for p in pieces] == [3, 3, 3, 1]
    assert "".join(pieces) == copy_text(frame)
    # A column with a value of another kind past the first piece: the whole frame goes to
    # the CSV path, before anything is written.
    mixed = frame.assign(t=pd.Series(["a"] * 9 + [Decimal("1")], dtype=object))
    assert copy_chunks(mixed, rows=3) is None
