"""The warehouse side of the feature pipeline: raw partitions in, dbt marts built, a day published.

* local profile: dbt-duckdb builds into ``data/warehouse.duckdb`` reading the landed parquet
  partitions; a published day is written as parquet under ``data/features/<mart>/``.
* production profile: the landed partitions are loaded into Postgres (schema ``uer_raw``), dbt-postgres
  builds into ``uer_build``, and a published day is copied into ``uer_features``, the tables
  Feast's Postgres offline store reads.

Marts are built into a build area and only *published* after the quality gate passes, so a bad day
never reaches the offline or online store.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from retrieval_core.contract import CONTRACTS, TABLES, landed_days, partition_path, write_atomic
from retrieval_core.errors import OperatorError
from retrieval_core.settings import PROJECT_ROOT, Settings

DBT_PROJECT_DIR = PROJECT_ROOT / "dbt_project"
BUILD_SCHEMA = "uer_build"
RAW_SCHEMA = "uer_raw"
FEATURES_SCHEMA = "uer_features"
# Marts rebuilt one day at a time (keyed by ds) versus marts rebuilt whole on every run.
DAILY_MARTS = ("product_profile", "product_quality", "user_history", "query_product_edges")
WHOLE_MARTS = ("training_examples", "query_stats")
MARTS = DAILY_MARTS + WHOLE_MARTS
# Row order of a published mart: the same input must publish byte-identical files.
MART_ORDER = {"product_profile": "product_id", "product_quality": "product_id", "user_history": "user_id",
              "query_product_edges": "query, product_id", "training_examples": "example_id", "query_stats": "query"}


class DayRejected(OperatorError, RuntimeError):
    """The day's data was refused (by a dbt test or the quality gate): nothing of it was published."""


class DbtBuildFailed(DayRejected):
    """dbt could not build the day: a model failed or a dbt test found bad data."""


def warehouse_path(settings: Settings) -> Path:
    return settings.data_dir / "warehouse.duckdb"


def features_dir(settings: Settings) -> Path:
    return settings.data_dir / "features"


def write_dbt_profile(settings: Settings) -> Path:
    """profiles.yml for both targets, generated from the settings (the password stays an env var)."""
    pg = settings.postgres
    profile = {"uer": {"target": settings.dbt_target, "outputs": {
        "duckdb": {"type": "duckdb", "path": str(warehouse_path(settings)), "schema": BUILD_SCHEMA,
                   "threads": 1},
        "postgres": {"type": "postgres", "host": pg.host, "port": pg.port, "user": pg.user,
                     "password": "{{ env_var('UER_POSTGRES__PASSWORD', '') }}", "dbname": pg.database,
                     "schema": BUILD_SCHEMA, "threads": 2},
    }}}
    out = settings.artifacts_dir / "dbt"
    out.mkdir(parents=True, exist_ok=True)
    (out / "profiles.yml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return out


def run_dbt(settings: Settings, ds: dt.date, command: str = "build", extra: list[str] | None = None) -> None:
    """Run ``dbt <command>`` for day ``ds`` on the profile's target; raise with the failing nodes.

    dbt runs in a child process: it keeps its DuckDB connection (a file lock) and global logging
    state for the life of a process, which must not leak into the stage that called it."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    profiles_dir = write_dbt_profile(settings)
    target_path = settings.artifacts_dir / "dbt" / "target"
    dbt_vars = {"ds": ds.isoformat(), "raw_dir": str(settings.raw_dir)}
    args = [sys.executable, "-c", "from dbt.cli.main import cli; cli()", command,
            "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(profiles_dir),
            "--target", settings.dbt_target, "--vars", json.dumps(dbt_vars),
            "--target-path", str(target_path), "--log-path", str(settings.artifacts_dir / "dbt" / "logs"),
            *(extra or [])]
    env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    if settings.postgres.password is not None:
        env["UER_POSTGRES__PASSWORD"] = settings.postgres.password.get_secret_value()
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=DBT_PROJECT_DIR)
    if done.returncode == 0:
        return
    failures = []
    results = target_path / "run_results.json"
    if results.exists():
        for node in json.loads(results.read_text()).get("results", []):
            if node.get("status") in {"error", "fail"}:
                name = node["unique_id"].split(".", 2)[-1]
                failures.append(f"{name}: {node['status']} ({(node.get('message') or '').strip()[:200]})")
    detail = "; ".join(failures) or done.stdout[-1500:] + done.stderr[-1500:]
    raise DbtBuildFailed(f"dbt {command} for {ds} on target {settings.dbt_target} failed: {detail}. "
                         f"Logs: {settings.artifacts_dir / 'dbt' / 'logs'}")


# --------------------------------------------------------------------------------------------------
# Production: landed parquet partitions → Postgres raw tables
# --------------------------------------------------------------------------------------------------

_PG_TYPES = {"int64": "bigint", "int32": "integer", "double": "double precision", "string": "text",
             "list<item: string>": "text[]", "timestamp[us, tz=UTC]": "timestamptz", "date32[day]": "date"}


@contextmanager
def postgres(settings: Settings) -> Iterator[object]:
    import psycopg

    with psycopg.connect(settings.postgres.dsn(), autocommit=False) as conn:
        yield conn


def _published_table_exists(conn: object, table: str) -> bool:
    """Whether ``features.<table>`` exists in the production warehouse."""
    return conn.execute("select to_regclass(%s)", (f"{FEATURES_SCHEMA}.{table}",)).fetchone()[0] is not None


def ensure_database(settings: Settings) -> None:
    """Create the settings' database on the server if it does not exist yet."""
    import psycopg

    with psycopg.connect(settings.postgres.dsn(database="postgres"), autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (settings.postgres.database,)).fetchone()
        if not exists:
            try:
                conn.execute(f'create database "{settings.postgres.database}"')
            except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                # Another worker's first build created it since the check (it is made before any lock can be taken
                # in it): the second CREATE fails, with UniqueViolation while the first is still committing.
                pass


def load_raw_to_postgres(settings: Settings, up_to: dt.date) -> int:
    """Copy landed partitions up to ``up_to`` into ``uer_raw``: days not loaded yet, and ``up_to``
    itself again (idempotent: a day's rows are replaced as a unit)."""
    ensure_database(settings)
    rows = 0
    with postgres(settings) as conn:
        conn.execute(f"create schema if not exists {RAW_SCHEMA}")
        for table in TABLES:
            schema = CONTRACTS[table].schema
            cols = ", ".join(f'"{f.name}" {_PG_TYPES[str(f.type)]}' for f in schema)
            conn.execute(f"create table if not exists {RAW_SCHEMA}.{table} ({cols}, ds date not null)")
            loaded = {r[0] for r in conn.execute(f"select distinct ds from {RAW_SCHEMA}.{table}")}
            days = [d for d in landed_days(settings.raw_dir, table) if d <= up_to and (d not in loaded or d == up_to)]
            for day in days:
                path = partition_path(settings.raw_dir, table, day)
                if not path.exists():
                    continue
                data = pq.read_table(path).to_pylist()
                conn.execute(f"delete from {RAW_SCHEMA}.{table} where ds = %s", (day,))
                names = ", ".join(f'"{f.name}"' for f in schema) + ", ds"
                with conn.cursor().copy(f"copy {RAW_SCHEMA}.{table} ({names}) from stdin") as copy:
                    for record in data:
                        copy.write_row([*record.values(), day])
                rows += len(data)
        conn.commit()
    return rows


# --------------------------------------------------------------------------------------------------
# Reading what dbt built, and publishing a day after the gate
# --------------------------------------------------------------------------------------------------


def read_build(settings: Settings, mart: str, days: list[dt.date] | None = None) -> pd.DataFrame:
    """Rows of a mart from the build area (the given days' rows for a daily mart, all rows otherwise)."""
    daily = days is not None and mart in DAILY_MARTS
    if settings.dbt_target == "duckdb":
        where = " where ds in (select unnest(?))" if daily else ""
        with duckdb.connect(str(warehouse_path(settings)), read_only=True) as con:
            return con.execute(f"select * from {BUILD_SCHEMA}.{mart}{where}", [days] if daily else []).df()
    where = " where ds = any(%s)" if daily else ""
    with postgres(settings) as conn:
        cur = conn.execute(f"select * from {BUILD_SCHEMA}.{mart}{where}", [days] if daily else [])
        return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])


def built_days(settings: Settings, mart: str = "product_quality") -> list[dt.date]:
    """The days a daily mart holds in the build area."""
    if settings.dbt_target == "duckdb":
        with duckdb.connect(str(warehouse_path(settings)), read_only=True) as con:
            rows = con.execute(f"select distinct ds from {BUILD_SCHEMA}.{mart} order by 1").fetchall()
    else:
        with postgres(settings) as conn:
            rows = conn.execute(f"select distinct ds from {BUILD_SCHEMA}.{mart} order by 1").fetchall()
    return [r[0] if isinstance(r[0], dt.date) else r[0].date() for r in rows]


def published_days(settings: Settings, mart: str = "product_quality") -> list[dt.date]:
    """The days of a daily mart already published to the offline store."""
    if settings.offline_store == "duckdb":
        base = features_dir(settings) / mart
        return sorted(dt.date.fromisoformat(p.name[3:]) for p in base.glob("ds=*")) if base.exists() else []
    with postgres(settings) as conn:
        if not _published_table_exists(conn, mart):
            return []
        return [r[0] for r in conn.execute(f"select distinct ds from {FEATURES_SCHEMA}.{mart} order by 1")]


def pending_days(settings: Settings, ds: dt.date) -> list[dt.date]:
    """Days to validate and publish with ``ds``: ``ds`` itself and any built day never published
    (the backlog of a first run or of a backfill)."""
    done = set(published_days(settings))
    return sorted({d for d in built_days(settings) if d <= ds and d not in done} | {ds})


def published_path(settings: Settings, mart: str, ds: dt.date | None = None) -> Path:
    base = features_dir(settings) / mart
    return base / f"ds={ds.isoformat()}" / "part-0.parquet" if ds is not None else base / "data.parquet"


def publish_days(settings: Settings, days: list[dt.date], marts: tuple[str, ...] = MARTS) -> dict[str, int]:
    """Copy the given days' rows of every daily mart, and the whole-table marts, to the offline store (of ``marts``
    only, when given).

    Each day is replaced as a unit, so publishing a day again yields the same offline store."""
    counts: dict[str, int] = dict.fromkeys(marts, 0)
    if settings.offline_store == "duckdb":
        with duckdb.connect(str(warehouse_path(settings)), read_only=True) as con:
            for mart in marts:
                if mart in DAILY_MARTS:
                    for day in days:
                        table = con.execute(f"select * from {BUILD_SCHEMA}.{mart} where ds = ? "
                                            f"order by {MART_ORDER[mart]}", [day]).to_arrow_table()
                        write_atomic(_utc_timestamps(table), published_path(settings, mart, day))
                        counts[mart] += table.num_rows
                else:
                    sql = f"select * from {BUILD_SCHEMA}.{mart} order by {MART_ORDER[mart]}"
                    table = con.execute(sql).to_arrow_table()
                    write_atomic(_utc_timestamps(table), published_path(settings, mart))
                    counts[mart] = table.num_rows
        return counts
    with postgres(settings) as conn:
        conn.execute(f"create schema if not exists {FEATURES_SCHEMA}")
        for mart in marts:
            conn.execute(f"create table if not exists {FEATURES_SCHEMA}.{mart} "
                         f"as select * from {BUILD_SCHEMA}.{mart} where false")
            if mart in DAILY_MARTS:
                conn.execute(f"delete from {FEATURES_SCHEMA}.{mart} where ds = any(%s)", (days,))
                cur = conn.execute(f"insert into {FEATURES_SCHEMA}.{mart} "
                                   f"select * from {BUILD_SCHEMA}.{mart} where ds = any(%s)", (days,))
            else:
                conn.execute(f"delete from {FEATURES_SCHEMA}.{mart}")
                cur = conn.execute(f"insert into {FEATURES_SCHEMA}.{mart} select * from {BUILD_SCHEMA}.{mart}")
            counts[mart] = cur.rowcount
        conn.commit()  # one transaction: readers see the whole day or none of it
    return counts


def _utc_timestamps(table: pa.Table) -> pa.Table:
    """DuckDB hands timestamptz back in the session's zone; store every timestamp as UTC."""
    for i, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type) and field.type.tz is not None:
            table = table.set_column(i, field.name, table.column(i).cast(pa.timestamp("us", "UTC")))
    return table


def previous_published_day(settings: Settings, mart: str, ds: dt.date) -> dt.date | None:
    """The latest day before ``ds`` whose rows of a daily mart were published."""
    earlier = [d for d in published_days(settings, mart) if d < ds]
    return earlier[-1] if earlier else None


def published_rows(settings: Settings, mart: str, ds: dt.date) -> int:
    if settings.offline_store == "duckdb":
        path = published_path(settings, mart, ds)
        return pq.read_metadata(path).num_rows if path.exists() else 0
    with postgres(settings) as conn:
        return conn.execute(f"select count(*) from {FEATURES_SCHEMA}.{mart} where ds = %s", (ds,)).fetchone()[0]



# Entities whose published rows of a day are about to be replaced, per view, until the online store has caught up
# (feature_repo.store.note_replaced_entities): beside the published marts, so that a retry on another worker finds it.
REPLACED_ENTITIES = "replaced_entities"


def _notes_path(settings: Settings, mart: str) -> Path:
    return features_dir(settings) / "_replaced_entities" / f"{mart}.json"


def note_published_keys(settings: Settings, mart: str, key: str, days: list[dt.date]) -> int:
    """Add the ``key`` values of a daily mart's published rows of ``days`` to its note (kept with what the note
    holds already: a crash after the publish leaves its rerun only the new rows to read). Returns the note's size."""
    if settings.offline_store == "duckdb":
        paths = [path for day in days if (path := published_path(settings, mart, day)).exists()]
        keys = {k for path in paths for k in pq.read_table(path, columns=[key])[key].to_pylist()} | noted_keys(
            settings, mart)
        note = _notes_path(settings, mart)
        note.parent.mkdir(parents=True, exist_ok=True)
        tmp = note.with_name(f".{note.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(sorted(keys)))
        os.replace(tmp, note)
        return len(keys)
    with postgres(settings) as conn:
        conn.execute(f"create table if not exists {FEATURES_SCHEMA}.{REPLACED_ENTITIES} "
                     "(mart text not null, entity bigint not null, primary key (mart, entity))")
        if _published_table_exists(conn, mart):
            conn.execute(f"insert into {FEATURES_SCHEMA}.{REPLACED_ENTITIES} "
                         f'select distinct %s, "{key}" from {FEATURES_SCHEMA}.{mart} where ds = any(%s) '
                         "on conflict do nothing", (mart, days))
        count = conn.execute(f"select count(*) from {FEATURES_SCHEMA}.{REPLACED_ENTITIES} where mart = %s",
                             (mart,)).fetchone()[0]
        conn.commit()
        return count


def noted_keys(settings: Settings, mart: str) -> set:
    """What :func:`note_published_keys` noted of ``mart`` (empty: nothing is waiting)."""
    if settings.offline_store == "duckdb":
        note = _notes_path(settings, mart)
        return set(json.loads(note.read_text())) if note.exists() else set()
    with postgres(settings) as conn:
        if not _published_table_exists(conn, REPLACED_ENTITIES):
            return set()
        rows = conn.execute(f"select entity from {FEATURES_SCHEMA}.{REPLACED_ENTITIES} where mart = %s", (mart,))
        return {row[0] for row in rows}


def clear_noted_keys(settings: Settings, mart: str) -> None:
    if settings.offline_store == "duckdb":
        _notes_path(settings, mart).unlink(missing_ok=True)
        return
    with postgres(settings) as conn:
        if _published_table_exists(conn, REPLACED_ENTITIES):
            conn.execute(f"delete from {FEATURES_SCHEMA}.{REPLACED_ENTITIES} where mart = %s", (mart,))
            conn.commit()


def read_published(settings: Settings, mart: str) -> pd.DataFrame:
    """A published mart as the offline store holds it (every published day of a daily mart)."""
    if settings.offline_store == "duckdb":
        path = published_path(settings, mart) if mart in WHOLE_MARTS else features_dir(settings) / mart / "*" / "*"
        with duckdb.connect() as con:
            return con.execute(f"select * from read_parquet('{path}')").df()
    with postgres(settings) as conn:
        cur = conn.execute(f"select * from {FEATURES_SCHEMA}.{mart}")
        return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description])


# DuckDB's share of the memory while it picks the latest rows (it spills to disk beyond this).
LATEST_ROWS_MEMORY_LIMIT = "3GB"
# Postgres column types (information_schema udt_name) → Arrow, so every chunk has the mart's types
# even when a column is all null in that chunk.
_ARROW_FROM_PG = {"int8": pa.int64(), "int4": pa.int32(), "float8": pa.float64(), "text": pa.string(),
                  "varchar": pa.string(), "bool": pa.bool_(), "date": pa.date32(),
                  "timestamptz": pa.timestamp("us", "UTC"), "_text": pa.list_(pa.string()),
                  "_varchar": pa.list_(pa.string()), "_int8": pa.list_(pa.int64()), "_int4": pa.list_(pa.int32()),
                  "_float8": pa.list_(pa.float64()), "_float4": pa.list_(pa.float32()), "float4": pa.float32()}


def latest_rows(settings: Settings, mart: str, key: str, columns: list[str], start: dt.datetime,
                end: dt.datetime, chunk_rows: int, only: list | None = None) -> Iterator[pa.Table]:
    """The newest published row of ``mart`` per ``key`` among rows with ``start <= event_timestamp <= end``
    (what Feast's ``pull_latest_from_table_or_query`` selects for a materialisation window), as Arrow
    tables of at most ``chunk_rows`` rows. Ties on the timestamp keep one row per key. With ``only``, the
    rows of those keys alone.

    Locally DuckDB reads the published parquet partitions (the timestamp filter is pushed into the scan,
    so row groups outside the window are skipped by their statistics) and spills to disk past
    ``LATEST_ROWS_MEMORY_LIMIT``; in production Postgres does the same with ``distinct on`` behind a
    server-side cursor. Nothing holds the whole window in Python."""
    cols = ", ".join(f'"{c}"' for c in columns)
    if settings.offline_store == "duckdb":
        files = features_dir(settings) / mart / "*" / "*.parquet"
        if not list((features_dir(settings) / mart).glob("*/*.parquet")):
            return
        tmp = settings.data_dir / "tmp" / "duckdb"
        tmp.mkdir(parents=True, exist_ok=True)
        with duckdb.connect(config={"memory_limit": LATEST_ROWS_MEMORY_LIMIT, "temp_directory": str(tmp),
                                    "preserve_insertion_order": False}) as con:
            keys = "" if only is None else f'and "{key}" in (select unnest(?)) '
            sql = (f"select {cols} from read_parquet('{files}', hive_partitioning = false) "
                   f"where event_timestamp between ? and ? {keys}"
                   f'qualify row_number() over (partition by "{key}" order by event_timestamp desc) = 1')
            params = [start, end] if only is None else [start, end, list(only)]
            for batch in con.sql(sql, params=params).to_arrow_reader(chunk_rows):
                if batch.num_rows:
                    yield pa.Table.from_batches([batch])
        return
    with postgres(settings) as conn:
        types = dict(conn.execute("select column_name, udt_name from information_schema.columns "
                                  "where table_schema = %s and table_name = %s", (FEATURES_SCHEMA, mart)).fetchall())
        if not types:
            return
        schema = pa.schema([(c, _ARROW_FROM_PG[types[c]]) for c in columns])
        # bigint[]: psycopg sends small ints as integer[], which Postgres compares with a bigint key row by row
        keys = "" if only is None else f'and "{key}" = any(%s::bigint[]) '
        sql = (f"select distinct on (\"{key}\") {cols} from {FEATURES_SCHEMA}.{mart} "
               f"where event_timestamp between %s and %s {keys}order by \"{key}\", event_timestamp desc")
        with conn.cursor(name=f"latest_{mart}") as cur:  # server-side: rows arrive chunk by chunk
            cur.itersize = chunk_rows
            cur.execute(sql, (start, end) if only is None else (start, end, list(only)))
            while rows := cur.fetchmany(chunk_rows):
                yield pa.Table.from_pylist([dict(zip(columns, row, strict=True)) for row in rows], schema=schema)


EMBEDDINGS = "product_embeddings"
EMBEDDINGS_SCHEMA = pa.schema([("product_id", pa.int64()), ("event_timestamp", pa.timestamp("us", "UTC")),
                               ("text_embedding", pa.list_(pa.float32())), ("graph_embedding", pa.list_(pa.float32())),
                               ("embedding_version", pa.string())])
USER_STATES = "user_query_state"
USER_STATES_SCHEMA = pa.schema([("user_id", pa.int64()), ("model_bundle", pa.string()),
                                ("event_timestamp", pa.timestamp("us", "UTC")), ("state", pa.list_(pa.float32())),
                                ("personalized", pa.bool_())])
# Sources that no dbt mart builds: each model version writes its own rows (product text/graph embeddings
# from training, precomputed user states from serving), keyed by the version column named here.
WRITTEN_SOURCES = {EMBEDDINGS: (EMBEDDINGS_SCHEMA, "embedding_version"),
                   USER_STATES: (USER_STATES_SCHEMA, "model_bundle")}
_POSTGRES_TYPES = {pa.int64(): "bigint", pa.string(): "text", pa.bool_(): "boolean", pa.float32(): "real",
                   pa.timestamp("us", "UTC"): "timestamptz", pa.list_(pa.float32()): "real[]"}


def ensure_written_sources(settings: Settings) -> None:
    """Until a version has written one of ``WRITTEN_SOURCES``, the source exists and is empty, so the
    feature services that include it already work (its features read as null)."""
    for name, (schema, _) in WRITTEN_SOURCES.items():
        if settings.offline_store == "duckdb":
            base = features_dir(settings) / name
            if not list(base.glob("*/*.parquet")):
                write_atomic(schema.empty_table(), base / "version=none" / "part-0.parquet")
            continue
        columns = ", ".join(f"{field.name} {_POSTGRES_TYPES[field.type]}" for field in schema)
        with postgres(settings) as conn:
            conn.execute(f"create schema if not exists {FEATURES_SCHEMA}")
            conn.execute(f"create table if not exists {FEATURES_SCHEMA}.{name} ({columns})")
            conn.commit()


def write_version(settings: Settings, name: str, table: pa.Table, version: str) -> int:
    """Replace ``version``'s rows of the written source ``name`` with ``table`` (its schema); returns the rows."""
    schema, version_column = WRITTEN_SOURCES[name]
    table = table.cast(schema)
    if settings.offline_store == "duckdb":
        write_atomic(table, _version_dir(settings, name, version) / "part-0.parquet")
        return table.num_rows
    with postgres(settings) as conn:
        conn.execute(f"delete from {FEATURES_SCHEMA}.{name} where {version_column} = %s", (version,))
        with conn.cursor().copy(f"copy {FEATURES_SCHEMA}.{name} ({', '.join(schema.names)}) from stdin") as copy:
            for row in table.to_pylist():
                copy.write_row(list(row.values()))
        conn.commit()
    return table.num_rows


def _version_dir(settings: Settings, name: str, version: str) -> Path:
    return features_dir(settings) / name / f"version={version}"


def written_versions(settings: Settings, name: str) -> list[str]:
    """The versions holding rows of the written source ``name``, sorted."""
    _, version_column = WRITTEN_SOURCES[name]
    if settings.offline_store == "duckdb":  # version=none: the empty placeholder of ensure_written_sources
        return sorted(path.parent.name.removeprefix("version=")
                      for path in (features_dir(settings) / name).glob("version=*/part-0.parquet")
                      if path.parent.name != "version=none")
    with postgres(settings) as conn:
        return [row[0] for row in conn.execute(f"select distinct {version_column} from {FEATURES_SCHEMA}.{name} "
                                               f"order by 1").fetchall()]


def version_rows(settings: Settings, name: str, version: str, columns: list[str]) -> pa.Table:
    """``columns`` of ``version``'s rows of the written source ``name`` (none: an empty table)."""
    schema, version_column = WRITTEN_SOURCES[name]
    schema = pa.schema([schema.field(c) for c in columns])
    if settings.offline_store == "duckdb":
        path = _version_dir(settings, name, version) / "part-0.parquet"
        return pq.read_table(path, columns=columns).cast(schema) if path.exists() else schema.empty_table()
    quoted = ", ".join(f'"{c}"' for c in columns)
    with postgres(settings) as conn:
        rows = conn.execute(f"select {quoted} from {FEATURES_SCHEMA}.{name} where {version_column} = %s",
                            (version,)).fetchall()
    return pa.Table.from_pylist([dict(zip(columns, row, strict=True)) for row in rows], schema=schema)


def copy_version(settings: Settings, name: str, source: str, target: str) -> int:
    """Write ``source``'s rows of the written source ``name`` again as ``target``'s, stamped now as a write of
    its own would be (a version registered with another's encodings, as ``benchmarks/full_width_bundle.py``
    does); returns the rows. Refuses a source without rows: the copy would be a version nothing can serve."""
    schema, version_column = WRITTEN_SOURCES[name]
    rows = version_rows(settings, name, source, schema.names)
    if rows.num_rows == 0:
        raise LookupError(f"{name} has no rows of version {source!r} to copy to {target!r}")
    now = pa.array([dt.datetime.now(dt.UTC)] * rows.num_rows, schema.field("event_timestamp").type)
    rows = rows.set_column(rows.schema.get_field_index("event_timestamp"), "event_timestamp", now)
    rows = rows.set_column(rows.schema.get_field_index(version_column), version_column,
                           pa.array([target] * rows.num_rows, pa.string()))
    return write_version(settings, name, rows, target)


def version_keys(settings: Settings, name: str, version: str, key: str) -> list:
    """The ``key`` column of ``version``'s rows of the written source ``name``."""
    return version_rows(settings, name, version, [key]).column(key).to_pylist()


def delete_version(settings: Settings, name: str, version: str) -> None:
    """Remove ``version``'s rows of the written source ``name``; the source itself stays readable."""
    _, version_column = WRITTEN_SOURCES[name]
    if settings.offline_store == "duckdb":
        directory = _version_dir(settings, name, version)
        if directory.exists():
            shutil.rmtree(directory)
        ensure_written_sources(settings)  # a source directory without any parquet file would not read at all
        return
    with postgres(settings) as conn:
        conn.execute(f"delete from {FEATURES_SCHEMA}.{name} where {version_column} = %s", (version,))
        conn.commit()
