"""The same feature chain on the production profile, against the real Postgres and Redis servers on
127.0.0.1 (dbt-postgres, Feast's Postgres offline store, Redis online store). If either server is
unreachable these tests fail: they are never skipped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pandas as pd
import psycopg
import pytest
import redis

from feature_repo import store
from feature_repo.stages import build_feature_day
from feature_repo.warehouse import FEATURES_SCHEMA, postgres, published_days
from retrieval_core.settings import Settings
from tests.feature_helpers import FIRST_BUILD, NEXT_DAY, simulate_tiny

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
