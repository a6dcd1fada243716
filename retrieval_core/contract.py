"""The raw-data contract: the three tables every source (simulator, adapters, a user's own data) writes.

Each table is daily-partitioned parquet: ``<raw_dir>/<table>/ds=YYYY-MM-DD/part-0.parquet``.

* ``catalogue`` — products created or changed that day (the latest row per product wins downstream).
* ``users`` — users who signed up or changed that day.
* ``events`` — the day's search events: impressions and the engagement that followed.

``land_partition`` is the only way into ``raw_dir``: it validates a file against the contract and
either publishes it atomically, or moves it to quarantine and raises :class:`ContractViolation`
naming the file, the column, the rule and a sample of the bad rows. A rejected file is never
partially published, so nothing downstream can read it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EVENT_TYPES = ("impression", "click", "favorite", "add_to_cart", "purchase")
TABLES = ("catalogue", "users", "events")


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Rule:
    """A row-level rule: ``check`` returns a boolean mask of the rows that satisfy it."""

    column: str
    name: str
    check: Callable[[pa.Table, dt.date], pa.ChunkedArray | np.ndarray]


@dataclass(frozen=True)
class TableContract:
    name: str
    columns: tuple[Column, ...]
    key: str
    rules: tuple[Rule, ...] = field(default=())

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns])


class ContractViolation(ValueError):
    """A file broke the raw-data contract. The whole file is rejected."""

    def __init__(self, file: Path | str, column: str, rule: str, sample: list[dict] | None = None):
        self.file, self.column, self.rule = str(file), column, rule
        self.sample = sample or []
        shown = json.dumps(self.sample[:5], default=str)
        super().__init__(
            f"{self.file}: column '{column}' breaks rule '{rule}'"
            + (f"; sample of bad rows: {shown}" if self.sample else "")
            + ". The file was rejected whole; fix the source and land it again."
        )


def _day_bounds(day: dt.date) -> tuple[pa.Scalar, pa.Scalar]:
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return pa.scalar(start, pa.timestamp("us", "UTC")), pa.scalar(
        start + dt.timedelta(days=1), pa.timestamp("us", "UTC")
    )


def _in_day(column: str) -> Callable[[pa.Table, dt.date], pa.ChunkedArray]:
    def check(table: pa.Table, day: dt.date) -> pa.ChunkedArray:
        lo, hi = _day_bounds(day)
        col = table[column]
        return pc.and_(pc.greater_equal(col, lo), pc.less(col, hi))

    return check


def _not_after_day(column: str) -> Callable[[pa.Table, dt.date], pa.ChunkedArray]:
    def check(table: pa.Table, day: dt.date) -> pa.ChunkedArray:
        return pc.less(table[column], _day_bounds(day)[1])

    return check


def _country_code(column: str) -> Callable[[pa.Table, dt.date], pa.ChunkedArray]:
    return lambda t, _d: pc.match_substring_regex(t[column], r"^[A-Z]{2}$")


def _non_blank(column: str) -> Callable[[pa.Table, dt.date], pa.ChunkedArray]:
    return lambda t, _d: pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(t[column])), 0)


CATALOGUE = TableContract(
    name="catalogue",
    key="product_id",
    columns=(
        Column("product_id", pa.int64(), doc="stable product key"),
        Column("shop_id", pa.int64(), doc="the shop that sells it"),
        Column("title", pa.string(), doc="the seller's title"),
        Column("tags", pa.list_(pa.string()), doc="the seller's tags, may be empty"),
        Column("category_path", pa.string(), doc="e.g. 'jewelry > necklaces'"),
        Column("materials", pa.list_(pa.string()), nullable=True, doc="where known"),
        Column("colors", pa.list_(pa.string()), nullable=True, doc="where known"),
        Column("price", pa.float64(), doc="> 0, in `currency`"),
        Column("currency", pa.string(), doc="ISO 4217 code"),
        Column("shop_country", pa.string(), doc="ISO 3166 alpha-2"),
        Column("created_at", pa.timestamp("us", "UTC"), doc="not after the partition's day"),
        Column("rating", pa.float64(), nullable=True, doc="0..5 average review rating"),
        Column("review_count", pa.int64(), doc=">= 0"),
    ),
    rules=(
        Rule("title", "non-blank", _non_blank("title")),
        Rule("category_path", "non-blank", _non_blank("category_path")),
        Rule("price", "price > 0", lambda t, _d: pc.greater(t["price"], 0.0)),
        Rule("currency", "ISO 4217 code", lambda t, _d: pc.match_substring_regex(t["currency"], r"^[A-Z]{3}$")),
        Rule("shop_country", "ISO 3166 alpha-2 code", _country_code("shop_country")),
        Rule("created_at", "not after the partition day", _not_after_day("created_at")),
        Rule("rating", "0 <= rating <= 5", lambda t, _d: pc.and_kleene(
            pc.greater_equal(t["rating"], 0.0), pc.less_equal(t["rating"], 5.0))),
        Rule("review_count", "review_count >= 0", lambda t, _d: pc.greater_equal(t["review_count"], 0)),
    ),
)

USERS = TableContract(
    name="users",
    key="user_id",
    columns=(
        Column("user_id", pa.int64(), doc="stable user key"),
        Column("country", pa.string(), doc="ISO 3166 alpha-2"),
        Column("signup_date", pa.date32(), doc="not after the partition's day"),
    ),
    rules=(
        Rule("country", "ISO 3166 alpha-2 code", _country_code("country")),
        Rule("signup_date", "not after the partition day",
             lambda t, d: pc.less_equal(t["signup_date"], pa.scalar(d, pa.date32()))),
    ),
)

EVENTS = TableContract(
    name="events",
    key="event_id",
    columns=(
        Column("event_id", pa.string(), doc="unique per event"),
        Column("ts", pa.timestamp("us", "UTC"), doc="inside the partition's day"),
        Column("user_id", pa.int64(), nullable=True, doc="null for signed-out traffic"),
        Column("session_id", pa.string(), doc="one search session"),
        Column("query", pa.string(), doc="the query text as typed"),
        Column("product_id", pa.int64(), doc="the product shown or engaged"),
        Column("event_type", pa.string(), doc="|".join(EVENT_TYPES)),
        Column("position", pa.int32(), doc="1-based rank of the product in the results shown"),
    ),
    rules=(
        Rule("ts", "inside the partition day", _in_day("ts")),
        Rule("query", "non-blank", _non_blank("query")),
        Rule("event_type", f"one of {EVENT_TYPES}",
             lambda t, _d: pc.is_in(t["event_type"], value_set=pa.array(EVENT_TYPES))),
        Rule("position", "position >= 1", lambda t, _d: pc.greater_equal(t["position"], 1)),
    ),
)

CONTRACTS: dict[str, TableContract] = {c.name: c for c in (CATALOGUE, USERS, EVENTS)}

# A day with fewer rows than this share of the previous landed day is suspicious but legal at the
# contract level; the data-quality gate (great-expectations) judges volume, the contract judges shape.


def partition_path(root: Path, table: str, day: dt.date) -> Path:
    return root / table / f"ds={day.isoformat()}" / "part-0.parquet"


def landed_days(raw_dir: Path, table: str) -> list[dt.date]:
    """The days whose partition of ``table`` passed the contract, oldest first."""
    base = raw_dir / table
    if not base.exists():
        return []
    days = [dt.date.fromisoformat(p.name[3:]) for p in base.glob("ds=*") if (p / "part-0.parquet").exists()]
    return sorted(days)


def _sample(table: pa.Table, bad_mask: np.ndarray, n: int = 5) -> list[dict]:
    idx = np.flatnonzero(bad_mask)[:n]
    return table.take(pa.array(idx)).to_pylist()


def validate_table(table: pa.Table, contract: TableContract, day: dt.date, file: Path | str) -> pa.Table:
    """Check ``table`` against ``contract``; return it cast to the contract's schema or raise."""
    names = set(table.column_names)
    for col in contract.columns:
        if col.name not in names:
            raise ContractViolation(file, col.name, "required column is missing")
    extra = sorted(names - {c.name for c in contract.columns})
    if extra:
        raise ContractViolation(file, extra[0], f"unknown column (the contract has no {extra})")
    columns = []
    for col in contract.columns:
        arr = table[col.name]
        if not arr.type.equals(col.type):
            try:
                arr = arr.cast(col.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ContractViolation(file, col.name, f"type must be {col.type}, found {arr.type}") from exc
        if not col.nullable and arr.null_count:
            raise ContractViolation(file, col.name, "must not be null",
                                    _sample(table, arr.is_null().to_numpy(zero_copy_only=False)))
        columns.append(arr)
    cast = pa.table(columns, schema=contract.schema)
    for rule in contract.rules:
        ok = rule.check(cast, day)
        # Null means "unknown" (allowed only in nullable columns, already checked above).
        ok_np = pc.fill_null(ok, True).to_numpy(zero_copy_only=False)
        if not ok_np.all():
            raise ContractViolation(file, rule.column, rule.name, _sample(cast, ~ok_np))
    key = cast[contract.key]
    if pc.count_distinct(key).as_py() != len(key):
        dup = pd.Series(key.to_numpy(zero_copy_only=False)).duplicated(keep=False).to_numpy()
        raise ContractViolation(file, contract.key, "unique within the partition", _sample(cast, dup))
    return cast


def land_partition(src: Path, table: str, day: dt.date, raw_dir: Path, quarantine_dir: Path) -> Path:
    """Validate ``src`` and publish it as ``table``'s partition for ``day``, atomically.

    On a violation the file is moved to ``quarantine_dir`` beside a ``reason.json`` and the error is
    raised; whatever was published before for that day stays as it was.
    """
    contract = CONTRACTS[table]
    try:
        try:
            data = pq.read_table(src)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ContractViolation(src, "*", f"must be a readable parquet file ({exc})") from exc
        valid = validate_table(data, contract, day, src)
    except ContractViolation as violation:
        target = quarantine_dir / table / f"ds={day.isoformat()}"
        target.mkdir(parents=True, exist_ok=True)
        if Path(src).exists():
            shutil.move(str(src), target / Path(src).name)
        (target / "reason.json").write_text(json.dumps(
            {"file": violation.file, "column": violation.column, "rule": violation.rule,
             "sample": violation.sample[:5]}, default=str, indent=2))
        raise
    dest = partition_path(raw_dir, table, day)
    write_atomic(valid, dest)
    return dest


def land_day(day: dt.date, raw_dir: Path, landing_dir: Path, quarantine_dir: Path) -> dict[str, str]:
    """Land whatever waits in ``landing_dir/<table>/ds=<day>.parquet`` and check every table has its
    partition for ``day``. Returns table → partition path. Idempotent: an already-landed day passes."""
    landed = {}
    for table in TABLES:
        waiting = landing_dir / table / f"ds={day.isoformat()}.parquet"
        if waiting.exists():
            land_partition(waiting, table, day, raw_dir, quarantine_dir)
        dest = partition_path(raw_dir, table, day)
        quarantined = quarantine_dir / table / f"ds={day.isoformat()}" / "reason.json"
        if not dest.exists() and quarantined.exists():
            # A retry after a violation: the file is in quarantine now, and "not delivered" would mislead.
            try:
                why = json.loads(quarantined.read_text())
            except (OSError, ValueError):
                why = {"rule": "see the quarantined file"}
            raise ContractViolation(quarantined.parent, why.get("column", "*"),
                                    f"{why.get('rule', '?')} (quarantined from {why.get('file', landing_dir / table)})",
                                    why.get("sample"))
        if not dest.exists():
            raise ContractViolation(dest, "*", f"the {table} partition for {day} has not been delivered "
                                               f"(expected in {landing_dir / table})")
        landed[table] = str(dest)
    return landed


def write_atomic(table: pa.Table, dest: Path, compression: str = "zstd", use_dictionary: bool = True) -> None:
    """Write parquet to a temporary sibling then rename, so readers never see half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression=compression, use_dictionary=use_dictionary)
    os.replace(tmp, dest)


def read_table(raw_dir: Path, table: str, days: list[dt.date] | None = None) -> pd.DataFrame:
    """Read landed partitions of ``table`` (all, or the given days) as one DataFrame."""
    days = landed_days(raw_dir, table) if days is None else days
    parts = [pq.read_table(partition_path(raw_dir, table, d)) for d in days]
    if not parts:
        return CONTRACTS[table].schema.empty_table().to_pandas()
    return pa.concat_tables(parts).to_pandas()
