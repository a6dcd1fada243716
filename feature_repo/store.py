"""The Feast feature store, configured from the settings object (never from hand-edited YAML)."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import warnings
from pathlib import Path
from typing import Any

import yaml

from retrieval_core.settings import Settings

PROJECT = "uer"
# Views that the feature pipeline materialises; product_embeddings is written by training.
PIPELINE_VIEWS = ("user_history", "product_profile", "product_quality")


def feast_dir(settings: Settings) -> Path:
    return settings.data_dir / "feast"


def store_config(settings: Settings, secrets: bool = True) -> dict[str, Any]:
    """feature_store.yaml as a dict. With ``secrets=False`` passwords stay ``${ENV}`` references."""
    pg, redis = settings.postgres, settings.redis
    password = (pg.password.get_secret_value() if pg.password and secrets else "${UER_POSTGRES__PASSWORD}"
                if pg.password else "")
    if settings.offline_store == "postgres":
        offline = {"type": "postgres", "host": pg.host, "port": pg.port, "database": pg.database,
                   "db_schema": "public", "user": pg.user, "password": password, "sslmode": "disable"}
        registry: dict[str, Any] = {"registry_type": "sql", "cache_ttl_seconds": 60,
                                    "path": f"postgresql+psycopg://{pg.user}"
                                            + (f":{password}" if password else "")
                                            + f"@{pg.host}:{pg.port}/{pg.database}"}
    else:
        offline = {"type": "duckdb"}
        registry = {"registry_type": "file", "path": str(feast_dir(settings) / "registry.db"),
                    "cache_ttl_seconds": 60}
    if settings.online_store == "redis":
        conn = redis.connection_string() if secrets or not redis.password else \
            f"{redis.host}:{redis.port},db={redis.db},password=${{UER_REDIS__PASSWORD}}"
        online = {"type": "redis", "connection_string": conn}
    else:
        online = {"type": "sqlite", "path": str(feast_dir(settings) / "online.db")}
    return {"project": PROJECT, "provider": "local", "registry": registry, "offline_store": offline,
            "online_store": online, "entity_key_serialization_version": 3}


def write_store_yaml(settings: Settings) -> Path:
    """A feature_store.yaml for `feast serve` / `feast -c`, secrets as ${ENV} references."""
    out = feast_dir(settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_store.yaml").write_text(yaml.safe_dump(store_config(settings, secrets=False), sort_keys=False))
    return out


def get_store(settings: Settings) -> Any:
    """A FeatureStore for the settings' profile."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from feast import FeatureStore
        from feast.repo_config import RepoConfig
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # feast resets filters on import
    # Feast's bundled Milvus online-store config warns on import; we do not use that store.
    warnings.filterwarnings("ignore", message='Field name "vector_enabled"')
    feast_dir(settings).mkdir(parents=True, exist_ok=True)
    return FeatureStore(config=RepoConfig(repo_path=feast_dir(settings), **store_config(settings)))


def apply(settings: Settings) -> list[str]:
    """Register every entity, view and service (idempotent)."""
    from feature_repo.definitions import definitions
    from feature_repo.warehouse import ensure_embeddings_source

    ensure_embeddings_source(settings)
    store = get_store(settings)
    objects = definitions(settings)
    with contextlib.redirect_stdout(io.StringIO()):
        store.apply(objects)
    write_store_yaml(settings)
    return [getattr(o, "name", str(o)) for o in objects]


def materialize(settings: Settings, start: dt.datetime, end: dt.datetime,
                views: tuple[str, ...] = PIPELINE_VIEWS) -> None:
    """Load feature rows with event_timestamp in [start, end] into the online store."""
    store = get_store(settings)
    with contextlib.redirect_stdout(io.StringIO()):
        store.materialize(start_date=start, end_date=end, feature_views=list(views))


def online_user_history(settings: Settings, user_ids: list[int], service: str = "query_tower_v1") -> dict[str, list]:
    store = get_store(settings)
    return store.get_online_features(features=store.get_feature_service(service),
                                     entity_rows=[{"user_id": u} for u in user_ids]).to_dict()
