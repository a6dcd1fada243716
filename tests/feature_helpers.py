"""Helpers shared by the feature-pipeline tests of both profiles."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_repo import store
from feature_repo.warehouse import read_published
from retrieval_core.contract import partition_path
from retrieval_core.settings import Settings
from retrieval_core.simulator import simulate, world_config

FIRST_BUILD = dt.date(2026, 10, 4)  # builds the backlog 10-01..10-04 in one go
NEXT_DAY = dt.date(2026, 10, 5)
HELD_OUT = dt.date(2026, 10, 6)  # corrupted in the gate tests
VIEW_KEYS = {"user_history": "user_id", "product_profile": "product_id", "product_quality": "product_id"}


def simulate_tiny(settings: Settings) -> None:
    simulate(world_config("tiny"), settings.raw_dir, settings.landing_dir, settings.quarantine_dir,
             settings.diagnostics_dir, show_progress=False)


def _plain(value: Any) -> Any:
    """One feature value as plain Python, so online (lists, None) and offline (arrays, NaN) compare."""
    if isinstance(value, np.ndarray | list | tuple):
        return [_plain(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    return value


def view_ids(settings: Settings, view: str) -> list[int]:
    """Every entity id of a view's published rows, and one id that was never published."""
    key = VIEW_KEYS[view]
    return sorted({int(i) for i in read_published(settings, view)[key]}) + [10**12]


def online_snapshot(settings: Settings, views: tuple[str, ...] = store.PIPELINE_VIEWS) -> dict[str, dict]:
    """Every feature value and event timestamp each view serves online, for all of its ids."""
    feast = store.get_store(settings)
    snapshot = {}
    for name in views:
        key = VIEW_KEYS[name]
        refs = [f"{name}:{f.name}" for f in feast.get_feature_view(name).features]
        got = feast.get_online_features(features=refs, entity_rows=[{key: i} for i in view_ids(settings, name)])
        snapshot[name] = {col: [_plain(v) for v in values]
                          for col, values in got.to_dict(include_event_timestamps=True).items()}
    return snapshot


def assert_online_is_point_in_time(settings: Settings, at: dt.datetime, view: str = "user_history") -> int:
    """The online row of every entity equals Feast's point-in-time join at ``at`` (the end of the last
    materialised window, inside every row's TTL): returns how many entities had features."""
    feast = store.get_store(settings)
    key = VIEW_KEYS[view]
    ids = view_ids(settings, view)
    features = [f.name for f in feast.get_feature_view(view).features]
    online = feast.get_online_features(features=[f"{view}:{f}" for f in features],
                                       entity_rows=[{key: i} for i in ids]).to_dict()
    entity = pd.DataFrame({key: ids, "event_timestamp": [pd.Timestamp(at)] * len(ids)})
    joined = feast.get_historical_features(entity_df=entity, features=[f"{view}:{f}" for f in features]).to_df()
    joined = joined.set_index(key).loc[ids]
    with_features = 0
    for i, entity_id in enumerate(ids):
        expected = {f: _plain(joined.iloc[i][f]) for f in features}
        got = {f: _plain(online[f][i]) for f in features}
        assert got == expected, f"{view} {key}={entity_id}: online {got} != point-in-time {expected}"
        with_features += any(v is not None for v in got.values())
    return with_features


def correct_raw_day(settings: Settings, day: dt.date) -> tuple[Path, dict[str, int]]:
    """Rewrite ``day``'s raw events as a late correction of that day would, in place: every event of a user whose
    newest history row is that day but who was active before it goes (their newest row becomes an older one), every
    event of a user active only that day goes (no row is left), and another user's queries are renamed (their row
    keeps its timestamp with new values). Returns the original partition's backup and those users."""
    history = read_published(settings, "user_history")
    newest = pd.to_datetime(history["ds"]).dt.date.groupby(history["user_id"]).agg(["max", "count"])
    on_day = newest[newest["max"] == day]
    earlier, only_day = on_day[on_day["count"] > 1].index, on_day[on_day["count"] == 1].index
    assert len(earlier) >= 2 and len(only_day) >= 1, "the tiny world should have such users on that day"
    users = {"dropped_with_earlier_rows": int(earlier[0]), "dropped_entirely": int(only_day[0]),
             "renamed_queries": int(earlier[1])}
    path = partition_path(settings.raw_dir, "events", day)
    backup = path.with_suffix(".orig")
    shutil.copy(path, backup)
    events = pq.read_table(path)
    user = events["user_id"]
    keep = pc.invert(pc.fill_null(pc.is_in(user, pa.array([users["dropped_with_earlier_rows"],
                                                          users["dropped_entirely"]])), False))
    renamed = pc.fill_null(pc.equal(user, users["renamed_queries"]), False)
    events = events.set_column(events.schema.get_field_index("query"), "query",
                               pc.if_else(renamed, pa.scalar("corrected lamp query"), events["query"]))
    pq.write_table(events.filter(keep), path)
    return backup, users
