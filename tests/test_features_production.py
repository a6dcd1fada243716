"""The same feature chain on the production profile, against the real Postgres and Redis servers on
127.0.0.1 (dbt-postgres, Feast's Postgres offline store, Redis online store). If either server is
unreachable these tests fail: they are never skipped."""

from __future__ import annotations

import datetime as dt
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psycopg
import pytest
import redis

from feature_repo import store
from feature_repo.stages import FIRST_MATERIALIZATION_START, build_feature_day, closed_at
from feature_repo.warehouse import FEATURES_SCHEMA, noted_keys, postgres, published_days
from retrieval_core.settings import Settings
from tests.feature_helpers import (
    FIRST_BUILD,
    NEXT_DAY,
    assert_online_is_point_in_time,
    correct_raw_day,
    online_snapshot,
    simulate_tiny,
)

REDIS_DB = 2


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("features-production")
    database = f"uer_test_{uuid.uuid4().hex[:8]}"
    settings = Settings(profile="production", data_dir=root / "data", artifacts_dir=root / "artifacts",
                        postgres={"database": database}, redis={"db": REDIS_DB})
    redis.Redis(host=settings.redis.host, port=settings.redis.port, db=REDIS_DB).flushdb()
    simulate_tiny(settings)
    build_feature_day(settings, FIRST_BUILD)
    build_feature_day(settings, NEXT_DAY)
    yield settings
    with psycopg.connect(settings.postgres.dsn(database="postgres"), autocommit=True) as conn:
        conn.execute(f'drop database if exists "{database}" with (force)')
    redis.Redis(host=settings.redis.host, port=settings.redis.port, db=REDIS_DB).flushdb()


def test_first_builds_started_together_both_find_the_database(tmp_path: Path) -> None:
    """The first build on a new server creates the warehouse's database, before any lock can be taken in it: two
    workers starting at once both saw no database, and the second's CREATE DATABASE failed its build."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from feature_repo.warehouse import ensure_database

    database = f"uer_test_{uuid.uuid4().hex[:8]}"
    settings = Settings(profile="production", data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts",
                        postgres={"database": database})
    together = Barrier(4)

    def first_build() -> None:
        together.wait()
        ensure_database(settings)

    try:
        with ThreadPoolExecutor(4) as pool:
            for started in [pool.submit(first_build) for _ in range(4)]:
                started.result()
        with psycopg.connect(settings.postgres.dsn(), autocommit=True) as conn:
            assert conn.execute("select current_database()").fetchone()[0] == database
    finally:
        with psycopg.connect(settings.postgres.dsn(database="postgres"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{database}" with (force)')


def test_marts_are_published_to_postgres(production: Settings) -> None:
    assert published_days(production) == [FIRST_BUILD.replace(day=d) for d in range(1, 6)]
    with postgres(production) as conn:
        sql = f"select count(*) from {FEATURES_SCHEMA}.user_history where ds = %s"
        n = conn.execute(sql, (NEXT_DAY,)).fetchone()[0]
    assert n > 50


def test_online_history_comes_from_redis(production: Settings) -> None:
    client = redis.Redis(host=production.redis.host, port=production.redis.port, db=REDIS_DB)
    assert client.dbsize() > 0
    online = store.online_user_history(production, [1, 2, 3])
    assert any(q for q in online["recent_queries"])


def test_redis_rows_equal_the_point_in_time_join_and_survive_a_chunked_rewrite(production: Settings) -> None:
    """What the pipeline wrote to Redis (via Postgres' ``distinct on``) is, per user and product, what
    the point-in-time join over Postgres returns at the end of the last window, and still is once users
    aged past the TTL were expired; emptying Redis and writing the whole backlog again in small chunks
    gives back exactly the same online store."""
    end = store.get_store(production).get_feature_view("user_history").most_recent_end_time
    assert end == closed_at(NEXT_DAY) + dt.timedelta(seconds=1)
    users_with_history = assert_online_is_point_in_time(production, end)
    assert users_with_history > 50
    assert assert_online_is_point_in_time(production, end, "product_quality") > 50
    before = online_snapshot(production)
    # Users and products aged past the 30-day TTL leave Redis (the Postgres path of the same code).
    later = end + dt.timedelta(days=27, hours=12)
    feast = store.get_store(production)
    assert store.expire_online_rows(production, feast, "user_history", later, since=end) > 0
    assert 0 < assert_online_is_point_in_time(production, later) < users_with_history
    redis.Redis(host=production.redis.host, port=production.redis.port, db=REDIS_DB).flushdb()
    written = store.materialize(production, FIRST_MATERIALIZATION_START, end, chunk_rows=41)
    assert written["user_history"] > 41 * 3
    assert online_snapshot(production) == before


def test_production_serves_the_same_features_as_local(production: Settings, tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("features-compare")
    local = Settings(profile="local", data_dir=root / "data", artifacts_dir=root / "artifacts")
    simulate_tiny(local)
    build_feature_day(local, FIRST_BUILD)
    build_feature_day(local, NEXT_DAY)
    users = list(range(1, 80))
    assert store.online_user_history(production, users) == store.online_user_history(local, users)


def test_historical_join_reads_postgres(production: Settings) -> None:
    feast = store.get_store(production)
    entity = pd.DataFrame({"user_id": [1, 2, 3],
                           "event_timestamp": pd.to_datetime(["2026-10-05T12:00:00Z"] * 3, utc=True)})
    service = feast.get_feature_service("query_tower_v1")
    joined = feast.get_historical_features(entity_df=entity, features=service).to_df()
    assert len(joined) == 3 and "recent_queries" in joined.columns


def test_written_sources_are_replaced_per_version_in_postgres_and_read_per_bundle_from_redis(
        production: Settings) -> None:
    """What ``uer user-states`` writes in production: a bundle's rows replace its own earlier rows in Postgres
    (never another bundle's), and the online store (Redis) answers per (user, model bundle), with timestamps."""
    import pyarrow as pa

    from feature_repo.warehouse import USER_STATES, USER_STATES_SCHEMA, write_version

    now = pd.Timestamp.now(tz="UTC").floor("s")

    def states(bundle: str, users: list[int]) -> pa.Table:
        return pa.table({"user_id": users, "model_bundle": [bundle] * len(users), "event_timestamp": [now] * len(users),
                         "state": [[float(u), 0.5, -1.0] for u in users], "personalized": [u % 2 == 1 for u in users]},
                        schema=USER_STATES_SCHEMA)

    assert write_version(production, USER_STATES, states("v@a", [1, 2, 3]), "v@a") == 3
    assert write_version(production, USER_STATES, states("v@b", [1]), "v@b") == 1
    assert write_version(production, USER_STATES, states("v@a", [1, 2]), "v@a") == 2  # a rerun replaces its rows
    with postgres(production) as conn:
        counts = dict(conn.execute(f"select model_bundle, count(*) from {FEATURES_SCHEMA}.{USER_STATES} "
                                   "group by model_bundle").fetchall())
    assert counts == {"v@a": 2, "v@b": 1}

    feast = store.get_store(production)
    feast.write_to_online_store(USER_STATES, states("v@a", [1, 2]).to_pandas(types_mapper=pd.ArrowDtype))
    rows = store.online_rows(feast, feast.get_feature_service("query_tower_state_v1"),
                             [{"user_id": 1, "model_bundle": "v@a"}, {"user_id": 2, "model_bundle": "v@a"},
                              {"user_id": 1, "model_bundle": "v@c"}], timestamps=True)
    assert rows[0]["state"] == pytest.approx([1.0, 0.5, -1.0]) and rows[0]["personalized"] is True
    assert rows[1]["state"] == pytest.approx([2.0, 0.5, -1.0]) and rows[1]["personalized"] is False
    assert rows[0]["state__ts"] == int(now.timestamp())
    assert rows[2]["state"] is None  # another bundle's states are never read

    # Pruning a bundle deletes exactly its rows: in Redis the entity's hash fields, in Postgres its rows.
    from feature_repo.warehouse import delete_version, version_keys, written_versions

    feast.write_to_online_store(USER_STATES, states("v@b", [1]).to_pandas(types_mapper=pd.ArrowDtype))
    assert written_versions(production, USER_STATES) == ["v@a", "v@b"]
    assert sorted(version_keys(production, USER_STATES, "v@a", "user_id")) == [1, 2]
    assert store.delete_online_rows(feast, USER_STATES, [{"user_id": 1, "model_bundle": "v@a"}]) == 1
    delete_version(production, USER_STATES, "v@a")
    rows = store.online_rows(feast, feast.get_feature_service("query_tower_state_v1"),
                             [{"user_id": 1, "model_bundle": "v@a"}, {"user_id": 2, "model_bundle": "v@a"},
                              {"user_id": 1, "model_bundle": "v@b"}])
    assert rows[0]["state"] is None and rows[0]["personalized"] is None
    assert rows[1]["state"] == pytest.approx([2.0, 0.5, -1.0])  # not asked for: kept
    assert rows[2]["state"] == pytest.approx([1.0, 0.5, -1.0])  # the same user under another bundle: kept
    assert written_versions(production, USER_STATES) == ["v@b"] and version_keys(production, USER_STATES, "v@a",
                                                                                   "user_id") == []



def test_a_corrected_day_built_again_reaches_redis_and_drops_what_it_no_longer_holds(
        production: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A day's raw events corrected after it was published, and the day built again (an Airflow clear): every
    user's online row is again the point-in-time join — the renamed queries replace the row Redis holds for the same
    event timestamp (Feast's Redis writer keeps the stored row on equal timestamps), a user whose events all went
    falls back to their older row, one with no row left has none online. The first rebuild is killed at its second
    online write, after that write's entities lost their Redis timestamps and before their rows were written: the
    retry still finishes the job. Restoring the events and building the day once more gives back the original
    online store."""
    from feast import FeatureStore
    from feast.infra.online_stores.helpers import _mmh3

    client = redis.Redis(host=production.redis.host, port=production.redis.port, db=REDIS_DB)

    def rows_without_timestamp(view: str) -> int:
        """The view's online rows (Redis hashes holding its features) whose event timestamp was removed."""
        feature = _mmh3(f"{view}:{store.get_store(production).get_feature_view(view).features[0].name}")
        return sum(client.hexists(key, feature) and not client.hexists(key, f"_ts:{view}")
                   for key in client.scan_iter(count=1000))

    before = online_snapshot(production)
    end = store.get_store(production).get_feature_view("user_history").most_recent_end_time
    backup, users = correct_raw_day(production, NEXT_DAY)
    try:
        writes, write = [], FeatureStore.write_to_online_store

        def killed_at_the_second_write(self: FeatureStore, *args: object, **kwargs: object) -> None:
            writes.append(args[0] if args else kwargs.get("feature_view_name"))
            if len(writes) == 2:
                raise RuntimeError("killed mid-materialisation")
            write(self, *args, **kwargs)

        with monkeypatch.context() as crash:
            crash.setattr(FeatureStore, "write_to_online_store", killed_at_the_second_write)
            with pytest.raises(RuntimeError, match="killed mid-materialisation"):
                build_feature_day(production, NEXT_DAY)
        assert noted_keys(production, writes[1]), writes  # the killed view's note is kept for the retry
        assert rows_without_timestamp(writes[1]) > 0, writes  # killed where it matters: timestamps gone, rows not in
        build_feature_day(production, NEXT_DAY)
        assert rows_without_timestamp(writes[1]) == 0
        for view in store.PIPELINE_VIEWS:
            assert assert_online_is_point_in_time(production, end, view) > 50
            assert noted_keys(production, view) == set()  # the note goes once the online store caught up
        online = store.online_user_history(production, list(users.values()))
        dropped, gone, renamed = online["recent_queries"]  # in the order of ``users``
        assert renamed[0] == "corrected lamp query" and dropped and gone is None, online
    finally:  # the module's later tests read the original day
        shutil.move(backup, backup.with_suffix(".parquet"))
        build_feature_day(production, NEXT_DAY)
    assert online_snapshot(production) == before


def test_a_second_feature_build_is_refused_while_another_worker_holds_the_lock(production: Settings) -> None:
    """In production the lock is Postgres's (every worker shares the warehouse): a build is refused while another
    session holds it, and runs once that session is gone."""
    from feature_repo.stages import FEATURE_BUILD_LOCK_KEY, FeatureBuildInProgress

    with psycopg.connect(production.postgres.dsn(), autocommit=True) as other_worker:
        assert other_worker.execute("select pg_try_advisory_lock(%s)", (FEATURE_BUILD_LOCK_KEY,)).fetchone()[0]
        with pytest.raises(FeatureBuildInProgress, match="advisory lock"):
            build_feature_day(production, NEXT_DAY)
    assert build_feature_day(production, NEXT_DAY).published_days == [NEXT_DAY]


def test_a_build_that_lost_its_lock_is_stopped_and_its_release_hides_nothing(production: Settings) -> None:
    """The lock is its connection's: a Postgres restart or a dropped link ends both, and another worker may take it.
    The build checks it before publishing and before materialising; leaving the lock then raises nothing, so a
    build's own outcome (its result or its error) is what the caller sees."""
    from feature_repo.stages import FEATURE_BUILD_LOCK_KEY, FeatureBuildInProgress, feature_build_lock

    with feature_build_lock(production) as still_held:
        still_held()
        with psycopg.connect(production.postgres.dsn(), autocommit=True) as admin:
            [holder] = admin.execute("select pid from pg_locks where locktype = 'advisory' and granted and objid = %s "
                                     "and database = (select oid from pg_database where datname = current_database())",
                                     (FEATURE_BUILD_LOCK_KEY,)).fetchall()
            assert admin.execute("select pg_terminate_backend(%s)", holder).fetchone()[0]
        with pytest.raises(FeatureBuildInProgress, match="lost its Postgres advisory lock"):
            still_held()
