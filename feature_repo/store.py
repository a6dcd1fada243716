"""The Feast feature store, configured from the settings object (never from hand-edited YAML)."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from retrieval_core.settings import Settings

log = logging.getLogger(__name__)

PROJECT = "uer"
# Views that the feature pipeline materialises; product_embeddings is written by training.
PIPELINE_VIEWS = ("user_history", "product_profile", "product_quality")
# Rows per write to the online store: bounds the memory of a materialisation, whatever the window.
ONLINE_WRITE_CHUNK_ROWS = 50_000


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
    from feature_repo.warehouse import ensure_written_sources

    ensure_written_sources(settings)
    store = get_store(settings)
    objects = definitions(settings)
    with contextlib.redirect_stdout(io.StringIO()):
        store.apply(objects)
    write_store_yaml(settings)
    return [getattr(o, "name", str(o)) for o in objects]


def note_replaced_entities(settings: Settings, days: list[dt.date], views: tuple[str, ...] = PIPELINE_VIEWS) -> None:
    """Before published ``days`` are published again (a corrected day built again): note, per view, the entities
    their rows name now (``warehouse.note_published_keys``: beside the published marts, in Postgres in production).
    The next materialisation lets their new rows replace the online ones whatever their timestamps, and gives back
    the online row of any entity the new rows no longer hold; the note is kept until then, so a crash after the
    publish, whose rerun reads the new rows only, still knows them."""
    from feature_repo.warehouse import note_published_keys

    store = get_store(settings)
    for name in views:
        noted = note_published_keys(settings, name, store.get_feature_view(name).entity_columns[0].name, days)
        log.info("%s: %d entities noted before their day is published again", name, noted)


def _take_back_replaced(settings: Settings, store: Any, name: str, columns: list[str], noted: set, written: set,
                        window_end: dt.datetime, chunk_rows: int) -> int:
    """The ``noted`` entities (:func:`note_replaced_entities`) that this window did not write: each gets its newest
    row inside the view's TTL at ``window_end`` back online, or, with none left, leaves the online store. Returns
    how many entities that was."""
    from feature_repo.warehouse import latest_rows

    stale = noted - written
    if not stale:
        return 0
    view = store.get_feature_view(name)
    key = columns[0]
    oldest = window_end - view.ttl if view.ttl else dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    found: set = set()
    for chunk in latest_rows(settings, name, key, columns, oldest, window_end, chunk_rows, only=sorted(stale)):
        entities = chunk[key].to_pylist()
        forget_online_timestamps(store, name, [{key: entity} for entity in entities])  # an older row replaces theirs
        store.write_to_online_store(name, chunk.to_pandas(types_mapper=pd.ArrowDtype))
        found.update(entities)
    if gone := stale - found:
        delete_online_rows(store, name, [{key: entity} for entity in sorted(gone)])
    return len(stale)


def materialize(settings: Settings, start: dt.datetime, end: dt.datetime,
                views: tuple[str, ...] = PIPELINE_VIEWS, chunk_rows: int = ONLINE_WRITE_CHUNK_ROWS) -> dict[str, int]:
    """Load the window ``[start, end]`` of each view into the online store, as ``feast materialize`` does,
    without Feast's materialisation engine; returns the rows written per view.

    Same result as ``FeatureStore.materialize(start, end)``: per entity, the newest row with
    ``start <= event_timestamp <= end`` (Feast applies no TTL when it materialises a window: a view's
    TTL only bounds point-in-time joins and picks the first window of ``materialize-incremental``).
    Feast's engine reads the whole window into memory (the DuckDB offline store cannot prune
    partitions), which on the large world needs more than 17 GB; here the offline store itself picks
    the latest rows (:func:`feature_repo.warehouse.latest_rows`: DuckDB over the published parquet,
    ``distinct on`` in Postgres) and they go to the online store ``chunk_rows`` at a time through the
    SDK's ``write_to_online_store`` (SQLite and Redis alike, one code path). Each view's window is then
    recorded in the registry exactly as Feast records it (``apply_materialization``), so
    ``most_recent_end_time`` and ``feast materialize-incremental`` carry on from here.

    Three differences from Feast. A window that ends before the view's last recorded end (an earlier day built
    again) runs on to that end, so rows already online are never replaced by older ones. A day published again
    (:func:`note_replaced_entities`) replaces its entities' online rows also where the timestamp is the same (Feast's
    Redis writer keeps the stored row then), and an entity it no longer holds gets its newest remaining row back or
    leaves the online store (Feast would leave the replaced row online). And before the window
    is recorded, the view's entities that have aged past its TTL at its end leave the online store
    (:func:`expire_online_rows`): Feast applies no TTL on online reads, so a user inactive for longer would
    be served the history that training's point-in-time join no longer returns (a skew), and other teams
    would read stale 30-day counts."""
    from feature_repo.warehouse import clear_noted_keys, latest_rows, noted_keys

    start, end = _utc(start), _utc(end)
    if start > end:
        raise ValueError(f"materialisation window starts after it ends: {start} > {end}")
    store = get_store(settings)
    written: dict[str, int] = {}
    for name in views:
        view = store.get_feature_view(name)
        keys = [column.name for column in view.entity_columns]
        if len(keys) != 1:
            raise ValueError(f"feature view {name} has {len(keys)} join keys; the chunked writer handles one")
        timestamp = view.batch_source.timestamp_field
        columns = [*keys, *(f.name for f in view.features), timestamp]
        written[name] = 0
        # A window that ends before what is already online (a rebuilt earlier day) runs on to that end: the newest
        # row per entity then stays the one online, and a rebuilt row goes online only where it is the newest.
        # Feast would write the window's rows over newer ones (SQLite overwrites; Redis keeps equal timestamps).
        last_end = _utc(view.most_recent_end_time) if view.most_recent_end_time else None
        window_end = max(end, last_end) if last_end else end
        noted = noted_keys(settings, name)
        written_keys: set = set()
        for chunk in latest_rows(settings, name, keys[0], columns, start, window_end, chunk_rows):
            if noted:  # their rows of a day published again replace the online ones, also at an equal timestamp
                replacing = [entity for entity in chunk[keys[0]].to_pylist() if entity in noted]
                forget_online_timestamps(store, name, [{keys[0]: entity} for entity in replacing])
                written_keys.update(replacing)
            # Arrow-backed columns: Feast turns the frame back into exactly these Arrow arrays.
            store.write_to_online_store(name, chunk.to_pandas(types_mapper=pd.ArrowDtype))
            written[name] += chunk.num_rows
        if gone := _take_back_replaced(settings, store, name, columns, noted, written_keys, window_end, chunk_rows):
            log.info("%s: %d entities that a day published again no longer holds took back an older row or left "
                     "the online store", name, gone)
        # Before the window is recorded: a crash in between makes the next run redo both. Entities whose newest
        # row is older than this window and the last recorded end (a gap: days never built) aged out since then.
        since = min(start, last_end) if last_end else start
        expired = expire_online_rows(settings, store, name, window_end, since, chunk_rows)
        if expired:
            log.info("%s: %d entities aged past the view's TTL left the online store", name, expired)
        store.registry.apply_materialization(view, store.project, start, window_end)
        clear_noted_keys(settings, name)
    return written


def expire_online_rows(settings: Settings, store: Any, name: str, end: dt.datetime, since: dt.datetime | None = None,
                       chunk_rows: int = ONLINE_WRITE_CHUNK_ROWS) -> int:
    """Delete the online rows of ``name``'s entities whose newest published row is older than the view's
    TTL at ``end``: after it, an online read returns what a point-in-time join at ``end`` returns (nothing)
    for them. Returns how many entities were deleted.

    With ``since``, only entities that could have crossed that line since then are read (newest row since
    ``since - ttl``): materialisation passes the start of its window or the view's last recorded end, whichever
    is earlier, as the ones before crossed it in an earlier window, whose materialisation deleted them. Without
    it, every published row is read (:func:`expire_all`). Rows newer than ``end`` that a later window already
    put online keep their entity."""
    from feature_repo.warehouse import latest_rows

    view = store.get_feature_view(name)
    if not view.ttl:
        return 0
    end = _utc(end)
    cutoff = end - view.ttl
    scan_from = _utc(since) - view.ttl if since is not None else dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    key = view.entity_columns[0].name
    timestamp = view.batch_source.timestamp_field
    newest = max(end, _utc(view.most_recent_end_time)) if view.most_recent_end_time else end
    expired = 0
    for chunk in latest_rows(settings, name, key, [key, timestamp], scan_from, newest, chunk_rows):
        aged = [entity for entity, ts in zip(chunk[key].to_pylist(), chunk[timestamp].to_pylist(), strict=True)
                if _utc(ts) < cutoff]
        if aged:
            expired += delete_online_rows(store, name, [{key: entity} for entity in aged])
    return expired


def materialize_incremental(settings: Settings, end: dt.datetime, views: tuple[str, ...] = PIPELINE_VIEWS,
                            chunk_rows: int = ONLINE_WRITE_CHUNK_ROWS) -> dict[str, int]:
    """``feast materialize-incremental`` with the chunked writer: each view from the end of its last
    recorded window (or, never materialised, from ``now - ttl`` as Feast does) up to ``end``."""
    store = get_store(settings)
    end = _utc(end)
    written: dict[str, int] = {}
    for name in views:
        view = store.get_feature_view(name)
        start = view.most_recent_end_time
        if start is None:
            if not view.ttl:
                raise ValueError(f"feature view {name} has no TTL and was never materialised: "
                                 "run materialize with an explicit window first")
            start = dt.datetime.now(dt.UTC) - view.ttl
        start = _utc(start)
        if start >= end:
            written[name] = 0
            continue
        written.update(materialize(settings, start, end, (name,), chunk_rows))
    return written


def expire_all(settings: Settings, views: tuple[str, ...] = PIPELINE_VIEWS) -> dict[str, int]:
    """:func:`expire_online_rows` over every published row, at each view's last recorded end: once after an
    upgrade from a version that did not expire online rows (a materialisation only reads the entities that may
    have aged out since the previous one). Returns the entities deleted per view."""
    store = get_store(settings)
    expired = {}
    for name in views:
        end = store.get_feature_view(name).most_recent_end_time
        expired[name] = expire_online_rows(settings, store, name, end) if end is not None else 0
    return expired


def _utc(ts: dt.datetime) -> dt.datetime:
    return ts.replace(tzinfo=dt.UTC) if ts.tzinfo is None else ts.astimezone(dt.UTC)


def online_rows(store: Any, service: Any, entity_rows: list[dict[str, Any]],
                timestamps: bool = False) -> list[dict[str, Any]]:
    """The features of ``service`` for each entity row, one dict per row, without the join keys (an
    entity the store does not hold reads as None values). With ``timestamps``, each feature's event time
    (epoch seconds) is there too, as ``<feature>__ts``."""
    table = store.get_online_features(features=service, entity_rows=entity_rows).to_dict(timestamps)
    keys = set(entity_rows[0]) if entity_rows else set()
    return [{name: values[i] for name, values in table.items() if name not in keys} for i in range(len(entity_rows))]


def online_user_history(settings: Settings, user_ids: list[int], service: str = "query_tower_v1") -> dict[str, list]:
    store = get_store(settings)
    return store.get_online_features(features=store.get_feature_service(service),
                                     entity_rows=[{"user_id": u} for u in user_ids]).to_dict()


def service_join_keys(store: Any, service: Any) -> list[str]:
    """The join keys an entity row of ``service`` needs (the entities of its views), in view order."""
    keys: dict[str, None] = {}
    for projection in service.feature_view_projections:
        keys.update(dict.fromkeys(c.name for c in store.get_feature_view(projection.name).entity_columns))
    return list(keys)


# Redis pipelines and SQLite statements delete this many entities at a time.
_DELETE_CHUNK = 5000


def forget_online_timestamps(store: Any, view_name: str, entity_rows: list[dict[str, Any]]) -> int:
    """Let the next write of ``view_name``'s rows of these entities replace the online ones whatever their event
    timestamps; returns how many entities were asked for. Feast's Redis writer keeps a stored row whose timestamp is
    equal to or newer than the written one — so a day built again from corrected raw data (its rows carry the same
    timestamp) never reached Redis — and reads a row without a timestamp as written at the epoch: this removes the
    timestamp and leaves the values served until they are replaced. SQLite's writer overwrites anyway."""
    return _edit_online_rows(store, view_name, entity_rows, timestamps_only=True)


def delete_online_rows(store: Any, view_name: str, entity_rows: list[dict[str, Any]]) -> int:
    """Delete ``view_name``'s online rows of these entities; returns how many entities were asked for.

    Feast has no API to delete single rows (only whole tables), so this encodes each entity key as the
    online store's own writer does (``serialize_entity_key``, the store's table or hash-field names) for
    the two online stores of the settings: SQLite (embedded) and Redis (production)."""
    return _edit_online_rows(store, view_name, entity_rows, timestamps_only=False)


def _edit_online_rows(store: Any, view_name: str, entity_rows: list[dict[str, Any]], timestamps_only: bool) -> int:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.helpers import _mmh3, _redis_key, compute_table_id
    from feast.infra.online_stores.redis import RedisOnlineStore, _versioned_fv_name
    from feast.infra.online_stores.sqlite import SqliteOnlineStore
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.type_map import python_values_to_proto_values

    online = store._get_provider().online_store  # noqa: SLF001 - the configured online store instance
    if timestamps_only and isinstance(online, SqliteOnlineStore):  # its writer replaces a row whatever its timestamp
        return len(entity_rows)
    view = store.get_feature_view(view_name)
    config = store.config
    columns = {field.name: field.dtype.to_value_type() for field in view.entity_columns}
    values = {name: python_values_to_proto_values([row[name] for row in entity_rows], value_type)
              for name, value_type in columns.items()}
    keys = [EntityKey(join_keys=list(columns), entity_values=[values[name][i] for name in columns])
            for i in range(len(entity_rows))]
    versioning = config.registry.enable_online_feature_view_versioning
    if isinstance(online, SqliteOnlineStore):
        conn = online._get_conn(config)  # noqa: SLF001
        table = compute_table_id(config.project, view, versioning)
        with conn:
            for start in range(0, len(keys), _DELETE_CHUNK):
                conn.executemany(f'delete from "{table}" where entity_key = ?',
                                 [(serialize_entity_key(key, config.entity_key_serialization_version),)
                                  for key in keys[start:start + _DELETE_CHUNK]])
    elif isinstance(online, RedisOnlineStore):
        client = online._get_client(config.online_store)  # noqa: SLF001
        name = _versioned_fv_name(view, config)
        fields = [] if timestamps_only else [_mmh3(f"{name}:{feature.name}") for feature in view.features]
        fields.append(f"_ts:{name}".encode())
        for start in range(0, len(keys), _DELETE_CHUNK):
            with client.pipeline(transaction=False) as pipe:
                for key in keys[start:start + _DELETE_CHUNK]:
                    # Only this view's fields: other views with the same entities share the hash.
                    pipe.hdel(_redis_key(config.project, key, config.entity_key_serialization_version), *fields)
                pipe.execute()
    else:
        raise NotImplementedError(f"deleting online rows is written for the SQLite and Redis online stores, "
                                  f"not {type(online).__name__}")
    return len(keys)
