"""The feature chain on the embedded profile: simulated world → dbt → GX → Feast (DuckDB + SQLite)."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from feature_repo import store
from feature_repo.stages import FIRST_MATERIALIZATION_START, build_feature_day, closed_at
from feature_repo.warehouse import (
    DayRejected,
    features_dir,
    noted_keys,
    published_days,
    published_path,
    published_rows,
    read_published,
)
from retrieval_core.contract import partition_path, read_table
from retrieval_core.settings import Settings
from tests.feature_helpers import (
    FIRST_BUILD,
    HELD_OUT,
    NEXT_DAY,
    VIEW_KEYS,
    assert_online_is_point_in_time,
    correct_raw_day,
    online_snapshot,
)


@pytest.fixture(scope="module")
def local(tiny_features: Settings) -> Settings:
    return tiny_features


def _digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_lookup_command_reads_a_feature_service_and_lists_the_known_ones_for_an_unknown(
        local: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    from typer.testing import CliRunner

    from retrieval_core import cli

    monkeypatch.setattr(cli, "get_settings", lambda: local)
    found = CliRunner().invoke(cli.app, ["features", "lookup", "--user-id", "1"])
    assert found.exit_code == 0 and "recent_queries" in found.output, found.output
    unknown = CliRunner().invoke(cli.app, ["features", "lookup", "--user-id", "1", "--service", "query_tower_v9"])
    flat = re.sub(r"[\s│╭╮╰╯─]+", "", unknown.output)  # the message as typer boxes it, unwrapped
    assert unknown.exit_code == 2, unknown.output  # a usage error, not a traceback (exit code 1)
    assert "nofeatureservice'query_tower_v9'" in flat and "'query_tower_v1'" in flat, unknown.output
    # Each service is read by its own entity: other teams' product service by product id.
    products = CliRunner().invoke(cli.app, ["features", "lookup", "--service", "product_insights_v1",
                                            "--product-id", "1", "--product-id", "2"])
    assert products.exit_code == 0, products.output
    read = json.loads(products.output)
    assert read["product_id"] == [1, 2] and read["category_path"][0], read
    wrong = CliRunner().invoke(cli.app, ["features", "lookup", "--service", "product_insights_v1", "--user-id", "1"])
    flat = re.sub(r"[\s│╭╮╰╯─]+", "", wrong.output)
    assert wrong.exit_code == 2, wrong.output
    assert "missing--product-id" in flat and "notakeyofit:--user-id" in flat, wrong.output


def test_backlog_and_next_day_are_published(local: Settings) -> None:
    assert published_days(local) == [FIRST_BUILD.replace(day=d) for d in range(1, 6)]
    history = pd.read_parquet(published_path(local, "user_history", NEXT_DAY))
    assert len(history) > 50 and history.user_id.is_unique
    assert (history.recent_queries.map(len) <= 10).all()


def test_online_history_is_the_latest_published_row(local: Settings) -> None:
    history = pd.concat(pd.read_parquet(published_path(local, "user_history", d)) for d in published_days(local))
    latest = history.sort_values("ds").groupby("user_id").tail(1).set_index("user_id")
    users = latest.index[:20].tolist()
    online = store.online_user_history(local, [*users, 10_000_000])
    for i, user in enumerate(users):
        assert online["recent_queries"][i] == list(latest.loc[user, "recent_queries"])
        assert online["country"][i] == latest.loc[user, "country"]
    assert online["recent_queries"][-1] is None  # an unknown user has no history, not an error


def test_product_tower_service_serves_profile_and_quality(local: Settings) -> None:
    feast = store.get_store(local)
    catalogue = read_table(local.raw_dir, "catalogue").drop_duplicates("product_id", keep="last")
    ids = catalogue.product_id.head(5).tolist()
    got = feast.get_online_features(features=feast.get_feature_service("product_tower_v1"),
                                    entity_rows=[{"product_id": p} for p in ids]).to_dict()
    assert got["title"] == catalogue.title.head(5).tolist()
    assert any(v is not None for v in got["ctr"])


def test_history_never_contains_events_after_the_example(local: Settings) -> None:
    """Point-in-time: the history joined to an example holds only queries the user issued before it."""
    examples = pd.read_parquet(published_path(local, "training_examples")).dropna(subset=["user_id"])
    examples = examples.sample(min(len(examples), 400), random_state=0)
    entity = pd.DataFrame({"user_id": examples.user_id.astype("int64").to_numpy(),
                           "event_timestamp": examples.event_timestamp.to_numpy()})
    feast = store.get_store(local)
    service = feast.get_feature_service("query_tower_v1")
    joined = feast.get_historical_features(entity_df=entity, features=service).to_df()
    events = read_table(local.raw_dir, "events")
    events = events[events.event_type == "impression"].dropna(subset=["user_id"])
    checked = 0
    for row in joined.itertuples():
        queries = row.recent_queries
        if queries is None or (isinstance(queries, float) and np.isnan(queries)) or len(queries) == 0:
            continue
        mine = events[(events.user_id == row.user_id)]
        before = set(mine[mine.ts < row.event_timestamp]["query"].str.strip().str.lower())
        leaked = set(queries) - before
        assert not leaked, f"user {row.user_id} at {row.event_timestamp} sees future queries {leaked}"
        checked += 1
    assert checked >= 50, "too few examples with history to check the join"


def test_rerunning_a_day_changes_nothing(local: Settings) -> None:
    files = [published_path(local, m, NEXT_DAY) for m in ("user_history", "product_quality", "query_product_edges")]
    before = _digest(files)
    online_before = store.online_user_history(local, list(range(1, 40)))
    build_feature_day(local, NEXT_DAY)
    assert _digest(files) == before
    assert store.online_user_history(local, list(range(1, 40))) == online_before


def test_rebuilding_an_earlier_day_works_and_keeps_the_newer_rows_online(local: Settings) -> None:
    """An earlier day built again after later ones (an Airflow clear of that day, a backfill): dbt's relationships
    tests used to fail on later days' rows naming users and listings that the day's staging does not know yet,
    and its materialisation wrote the day's rows over the newer ones online. Now it builds, publishes only its
    own partitions (the whole-table marts, training examples and query stats, stay as of the latest day), and
    every entity keeps its newest row online: the offline and online stores are exactly as before."""
    days = published_days(local)
    files = sorted(features_dir(local).rglob("*.parquet"))
    assert published_path(local, "training_examples") in files
    before, online_before = _digest(files), online_snapshot(local)
    report = build_feature_day(local, days[-2])
    assert report.published_days == [days[-2]]
    assert _digest(files) == before and online_snapshot(local) == online_before


def test_a_corrected_earlier_day_built_again_after_a_crash_takes_back_what_it_no_longer_holds(
        local: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier day's raw events corrected after later days were published, and the day built again, with a crash
    between its publish and its materialisation: the rerun still knows which entities the replaced rows named (noted
    before the publish), so every online row is again the point-in-time join at the last window's end — a user whose
    events went falls back to their older row, one with no row left has none. Restoring the events and building the
    day once more gives back the original offline and online stores."""
    days = published_days(local)
    files = sorted(features_dir(local).rglob("*.parquet"))
    before, online_before = _digest(files), online_snapshot(local)
    end = store.get_store(local).get_feature_view("user_history").most_recent_end_time
    backup, users = correct_raw_day(local, days[-2])
    try:
        with monkeypatch.context() as crash:
            crash.setattr(store, "materialize", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
            with pytest.raises(RuntimeError, match="killed"):
                build_feature_day(local, days[-2])
        assert noted_keys(local, "user_history") >= set(users.values())  # kept for the rerun
        build_feature_day(local, days[-2])
        for view in store.PIPELINE_VIEWS:
            assert assert_online_is_point_in_time(local, end, view) > 50
            assert noted_keys(local, view) == set()
        dropped, gone, renamed = store.online_user_history(local, list(users.values()))["recent_queries"]
        assert renamed[0] == "corrected lamp query" and dropped and gone is None
    finally:  # the session's later tests read the original day
        shutil.move(backup, backup.with_suffix(".parquet"))
        build_feature_day(local, days[-2])
    assert _digest(files) == before and online_snapshot(local) == online_before


def test_an_entity_a_rebuilt_day_no_longer_holds_takes_back_only_a_row_inside_the_views_ttl(local: Settings) -> None:
    """The take-back's bound: a noted entity that the window did not write gets its newest row back only if that row
    is inside the view's TTL at the window's end (the point-in-time join returns nothing older); past it, the entity
    leaves the online store."""
    feast = store.get_store(local)
    view = feast.get_feature_view("user_history")
    end = view.most_recent_end_time
    timestamp = view.batch_source.timestamp_field
    columns = ["user_id", *(f.name for f in view.features), timestamp]
    history = read_published(local, "user_history")
    user = int(history["user_id"].iloc[0])
    newest = pd.Timestamp(history.loc[history["user_id"] == user, timestamp].max()).to_pydatetime()
    before = online_snapshot(local)

    def take_back(window_end: dt.datetime) -> list | None:
        assert store._take_back_replaced(local, feast, "user_history", columns, {user}, set(), window_end, 100) == 1
        return store.online_user_history(local, [user])["recent_queries"][0]

    try:
        assert take_back(newest + view.ttl) is not None  # the newest row is just inside the TTL (inclusive, as Feast)
        assert take_back(newest + view.ttl + dt.timedelta(microseconds=1)) is None  # and just outside it
    finally:  # at the real end, the newest row comes back: the online store as it was
        assert take_back(end) is not None
    assert online_snapshot(local) == before


def test_a_second_feature_build_is_refused_while_one_holds_the_lock(local: Settings) -> None:
    """Two builds at once (a hand-run `uer features build` beside the DAG) would interleave their publishes and
    online writes; the second is refused at once, saying why, and changes nothing."""
    from typer.testing import CliRunner

    from feature_repo.stages import FeatureBuildInProgress, feature_build_lock
    from retrieval_core import cli

    online_before, days = online_snapshot(local), published_days(local)
    with feature_build_lock(local):
        with pytest.raises(FeatureBuildInProgress, match="run this again once it has finished"):
            build_feature_day(local, days[-1])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cli, "get_settings", lambda: local)
            refused = CliRunner().invoke(cli.app, ["features", "materialize", "--ds", str(days[-1])])
        assert isinstance(refused.exception, FeatureBuildInProgress), refused.output  # `uer`: its message, exit 3
    assert online_snapshot(local) == online_before and published_days(local) == days
    with feature_build_lock(local):  # released: taken again
        pass


def test_chunked_online_write_matches_feast_materialize(local: Settings, tmp_path: Path) -> None:
    """The chunked writer leaves the online store exactly as Feast's own materialize did: the same
    values and event timestamps for every entity, after a backlog window and an incremental one, and
    the same windows recorded in the registry."""
    days = published_days(local)
    windows = [(FIRST_MATERIALIZATION_START, closed_at(days[-2]) + dt.timedelta(seconds=1)),
               (closed_at(days[-2]) - dt.timedelta(days=1), closed_at(days[-1]) + dt.timedelta(seconds=1))]
    copies = {}
    for label in ("feast", "chunked"):
        copies[label] = Settings(profile="local", data_dir=tmp_path / label / "data",
                                 artifacts_dir=tmp_path / label / "artifacts")
        shutil.copytree(features_dir(local), features_dir(copies[label]))
        store.apply(copies[label])
    feast = store.get_store(copies["feast"])
    written: list[dict[str, int]] = []
    for start, end in windows:
        with contextlib.redirect_stdout(io.StringIO()):
            feast.materialize(start_date=start, end_date=end, feature_views=list(store.PIPELINE_VIEWS))
        written.append(store.materialize(copies["chunked"], start, end, chunk_rows=97))
    assert written[0]["product_profile"] > 97 * 3, "the backlog window should take several chunks"
    assert 0 < written[1]["user_history"] <= sum(published_rows(local, "user_history", d) for d in days[-2:])
    chunked, reference = online_snapshot(copies["chunked"]), online_snapshot(copies["feast"])
    for view in store.PIPELINE_VIEWS:
        assert chunked[view] == reference[view], f"{view} differs from Feast's materialize"
        timestamps = next(values for name, values in chunked[view].items()
                          if name.endswith("__ts") and name != f"{VIEW_KEYS[view]}__ts")
        assert sum(ts > 0 for ts in timestamps) > 50  # event timestamps (seconds) compared too
    for view in store.PIPELINE_VIEWS:
        intervals = [store.get_store(s).get_feature_view(view).materialization_intervals for s in copies.values()]
        assert intervals[0] == intervals[1] == [(s.astimezone(dt.UTC), e.astimezone(dt.UTC)) for s, e in windows]
    # materialize-incremental carries on from the recorded end: nothing new up to it, then a next window.
    assert store.materialize_incremental(copies["chunked"], windows[-1][1]) == dict.fromkeys(store.PIPELINE_VIEWS, 0)
    later = windows[-1][1] + dt.timedelta(days=1)
    store.materialize_incremental(copies["chunked"], later)
    assert store.get_store(copies["chunked"]).get_feature_view("user_history").most_recent_end_time == later


def test_online_history_equals_the_point_in_time_join_at_the_window_end(local: Settings) -> None:
    """What the pipeline wrote online is, for every user, the history a point-in-time join returns at
    the end of the last materialised window (all rows are inside the 30-day TTL)."""
    end = store.get_store(local).get_feature_view("user_history").most_recent_end_time
    assert end == closed_at(published_days(local)[-1]) + dt.timedelta(seconds=1)
    assert assert_online_is_point_in_time(local, end) > 50


def test_entities_aged_past_the_ttl_leave_the_online_store(local: Settings, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Feast applies no TTL on online reads: the materialisation deletes the entities whose newest row aged
    past its view's TTL, so at each window end the online store (what the API and other teams read) still
    equals the point-in-time join training uses — for users inactive longer than 30 days, nothing. Also after
    a gap (days never built), and once `uer features expire` has run on a store materialised before."""
    copy = Settings(profile="local", data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    shutil.copytree(features_dir(local), features_dir(copy))
    store.apply(copy)
    end = closed_at(published_days(local)[-1]) + dt.timedelta(seconds=1)
    store.materialize(copy, FIRST_MATERIALIZATION_START, end)
    views = ("user_history", "product_quality", "product_profile")
    at_end = {view: assert_online_is_point_in_time(copy, end, view) for view in views}
    # No new day, but the clock moves on: the 30-day TTL now ends inside the published days. First as a store
    # materialised before expiry existed, then mended by `uer features expire`.
    later = end + dt.timedelta(days=27, hours=12)
    monkeypatch.setattr(store, "expire_online_rows", lambda *args, **kwargs: 0)
    assert store.materialize_incremental(copy, later) == dict.fromkeys(store.PIPELINE_VIEWS, 0)
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="online .* != point-in-time"):
        assert_online_is_point_in_time(copy, later)
    assert store.expire_all(copy)["user_history"] > 0
    at_later = {view: assert_online_is_point_in_time(copy, later, view) for view in views}
    assert 0 < at_later["user_history"] < at_end["user_history"], (at_later, at_end)
    assert 0 < at_later["product_quality"] <= at_end["product_quality"], (at_later, at_end)
    assert at_later["product_profile"] == at_end["product_profile"] > 50  # a 10-year TTL: every listing stays
    # A gap: the next window starts 40 days on (the days between never built). Its own expiry reads back to the
    # last recorded end, so the entities that aged out meanwhile go too.
    gap = end + dt.timedelta(days=40)
    store.materialize(copy, gap, gap + dt.timedelta(days=1))
    aged = {view: assert_online_is_point_in_time(copy, gap + dt.timedelta(days=1), view) for view in views}
    assert aged == {"user_history": 0, "product_quality": 0, "product_profile": at_end["product_profile"]}


def _null_product_keys(table: pa.Table) -> pa.Table:
    ids = table["product_id"].to_pylist()
    ids[::50] = [None] * len(ids[::50])
    return table.set_column(table.column_names.index("product_id"), "product_id", pa.array(ids, pa.int64()))


def _negative_prices(table: pa.Table) -> pa.Table:
    return table.set_column(table.column_names.index("price"), "price", pc.negate(table["price"]))


def _tenth_of_the_sessions(table: pa.Table) -> pa.Table:
    sessions = pc.unique(table["session_id"])
    keep = sessions.take(pa.array(np.arange(0, len(sessions), 10)))
    return table.filter(pc.is_in(table["session_id"], value_set=keep))


CORRUPTIONS: dict[str, tuple[str, Callable[[pa.Table], pa.Table], str]] = {
    "null keys": ("events", _null_product_keys, "not_null_stg_events_product_id"),
    "negative price": ("catalogue", _negative_prices, "price"),
    "10x fewer events": ("events", _tenth_of_the_sessions, "expect_table_row_count_to_be_between"),
}


@pytest.fixture
def corrupt_held_out_day(local: Settings, request: pytest.FixtureRequest) -> Iterator[str]:
    """Write a corrupted partition straight into raw (as a source that skips landing would)."""
    table, corrupt, expected = CORRUPTIONS[request.param]
    path = partition_path(local.raw_dir, table, HELD_OUT)
    backup = path.with_suffix(".orig")
    shutil.copy(path, backup)
    pq.write_table(corrupt(pq.read_table(path)), path)
    yield expected
    shutil.move(backup, path)


@pytest.mark.parametrize("corrupt_held_out_day", list(CORRUPTIONS), indirect=True)
def test_corrupted_day_is_stopped_and_yesterday_keeps_serving(local: Settings, corrupt_held_out_day: str) -> None:
    users = list(range(1, 60))
    online_before = store.online_user_history(local, users)
    days_before = published_days(local)
    with pytest.raises(DayRejected) as refused:
        build_feature_day(local, HELD_OUT)
    assert corrupt_held_out_day in str(refused.value), str(refused.value)
    assert "2026-10-06" in str(refused.value)
    assert published_days(local) == days_before
    assert store.online_user_history(local, users) == online_before


def test_clean_held_out_day_then_builds(local: Settings) -> None:
    report = build_feature_day(local, HELD_OUT)
    assert report.published_days == [HELD_OUT]
    assert HELD_OUT in published_days(local)
    assert (local.artifacts_dir / "gx" / "data_docs" / "index.html").exists()
