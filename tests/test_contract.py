"""The raw-data contract rejects each kind of bad input whole, with an actionable message."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval_core.contract import ContractViolation, land_day, land_partition, partition_path
from retrieval_core.settings import Settings
from retrieval_core.simulator import SimulationSummary

DAY = dt.date(2026, 10, 2)


def _day_table(settings: Settings, table: str) -> pa.Table:
    return pq.read_table(partition_path(settings.raw_dir, table, DAY))


def _set(table: pa.Table, column: str, row: int, value: object) -> pa.Table:
    values = table[column].to_pylist()
    values[row] = value
    idx = table.column_names.index(column)
    return table.set_column(idx, column, pa.array(values, table.schema.field(column).type))


CASES: list[tuple[str, str, Callable[[pa.Table], pa.Table], str, str]] = [
    ("events", "missing column", lambda t: t.drop_columns(["session_id"]), "session_id", "missing"),
    ("events", "unknown column", lambda t: t.append_column("extra", pa.array([1] * len(t))), "extra", "unknown"),
    ("events", "null product key", lambda t: _set(t, "product_id", 3, None), "product_id", "must not be null"),
    ("events", "bad event type", lambda t: _set(t, "event_type", 2, "hover"), "event_type", "one of"),
    ("events", "event outside its day", lambda t: _set(t, "ts", 0, dt.datetime(2026, 10, 9, tzinfo=dt.UTC)),
     "ts", "inside the partition day"),
    ("events", "zero position", lambda t: _set(t, "position", 1, 0), "position", "position >= 1"),
    ("events", "blank query", lambda t: _set(t, "query", 4, "   "), "query", "non-blank"),
    ("events", "duplicate event id", lambda t: _set(t, "event_id", 1, t["event_id"][0].as_py()),
     "event_id", "unique"),
    ("events", "text in a number column",
     lambda t: t.set_column(t.column_names.index("position"), "position",
                            pa.array(["x"] * len(t))), "position", "type must be int32"),
    ("catalogue", "negative price", lambda t: _set(t, "price", 0, -3.0), "price", "price > 0"),
    ("catalogue", "rating above 5", lambda t: _set(t, "rating", 0, 7.5), "rating", "0 <= rating <= 5"),
    ("catalogue", "bad currency", lambda t: _set(t, "currency", 0, "dollars"), "currency", "ISO 4217"),
    ("users", "bad country", lambda t: _set(t, "country", 0, "usa"), "country", "ISO 3166"),
    ("users", "signup in the future", lambda t: _set(t, "signup_date", 0, dt.date(2027, 1, 1)),
     "signup_date", "not after"),
]


@pytest.mark.parametrize(("table", "case", "corrupt", "column", "rule"), CASES, ids=[c[1] for c in CASES])
def test_contract_rejects_bad_file_whole_and_keeps_what_was_landed(
        tiny_settings: Settings, tiny_world: SimulationSummary, tmp_path: Path,
        table: str, case: str, corrupt: Callable[[pa.Table], pa.Table], column: str, rule: str) -> None:
    published = partition_path(tiny_settings.raw_dir, table, DAY)
    before = published.read_bytes()
    bad = corrupt(_day_table(tiny_settings, table))
    src = tmp_path / f"{table}-bad.parquet"
    pq.write_table(bad, src)
    quarantine = tmp_path / "quarantine"
    with pytest.raises(ContractViolation) as err:
        land_partition(src, table, DAY, tiny_settings.raw_dir, quarantine)
    message = str(err.value)
    assert str(src) in message and f"'{column}'" in message and rule in message, message
    assert err.value.column == column
    assert published.read_bytes() == before  # yesterday's (and today's earlier) state still stands
    assert (quarantine / table / f"ds={DAY}" / "reason.json").exists()
    assert not src.exists()  # moved to quarantine, not left where a retry would re-read it blindly


def test_row_level_violation_message_carries_a_sample_of_bad_rows(tiny_settings: Settings,
                                                                 tiny_world: SimulationSummary,
                                                                 tmp_path: Path) -> None:
    bad = _set(_day_table(tiny_settings, "catalogue"), "price", 0, -3.0)
    src = tmp_path / "c.parquet"
    pq.write_table(bad, src)
    with pytest.raises(ContractViolation) as err:
        land_partition(src, "catalogue", DAY, tmp_path / "raw", tmp_path / "q")
    assert err.value.sample and err.value.sample[0]["price"] == -3.0
    assert "-3.0" in str(err.value)
    assert not (tmp_path / "raw").exists()


def test_unreadable_file_is_rejected(tmp_path: Path) -> None:
    src = tmp_path / "garbage.parquet"
    src.write_text("not parquet at all")
    with pytest.raises(ContractViolation, match="readable parquet"):
        land_partition(src, "events", DAY, tmp_path / "raw", tmp_path / "q")


def test_a_retried_landing_of_a_quarantined_partition_names_the_violation_not_a_missing_delivery(
        tmp_path: Path) -> None:
    """The first attempt moves the bad file to quarantine; Airflow's retries find none in landing. They must still
    say why (the alert goes out on the last attempt), not send the operator looking for a late delivery."""
    waiting = tmp_path / "landing" / "catalogue" / f"ds={DAY.isoformat()}.parquet"
    waiting.parent.mkdir(parents=True)
    waiting.write_text("not parquet at all")
    dirs = tmp_path / "raw", tmp_path / "landing", tmp_path / "q"
    for _attempt in range(2):
        with pytest.raises(ContractViolation, match="readable parquet") as raised:
            land_day(DAY, *dirs)
        assert "not been delivered" not in str(raised.value)
    assert not waiting.exists() and (tmp_path / "q" / "catalogue" / f"ds={DAY.isoformat()}" / waiting.name).exists()


def test_valid_file_lands_atomically(tiny_settings: Settings, tiny_world: SimulationSummary, tmp_path: Path) -> None:
    good = _day_table(tiny_settings, "events")
    src = tmp_path / "good.parquet"
    pq.write_table(good, src)
    dest = land_partition(src, "events", DAY, tmp_path / "raw", tmp_path / "q")
    assert pq.read_table(dest).equals(good)
    assert not list(dest.parent.glob(".*tmp*"))
