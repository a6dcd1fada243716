"""The feature pipeline's typed stage functions; the CLI and the Airflow DAGs both call these.

One day ``ds``: (production: load raw partitions into Postgres) → dbt build (models + dbt tests)
→ great-expectations gate → publish the day to the offline store → Feast apply → materialise to
the online store. A refused day raises :class:`~feature_repo.warehouse.DayRejected` before
anything is published, so the offline and online stores keep yesterday's state.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg
from filelock import FileLock, Timeout

from feature_repo import store, warehouse
from feature_repo.quality_gate import validate_days
from retrieval_core.errors import OperatorError
from retrieval_core.settings import Settings

FIRST_MATERIALIZATION_START = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
log = logging.getLogger(__name__)


@dataclass
class FeatureDayReport:
    ds: dt.date
    published_days: list[dt.date]
    rows: dict[str, int]
    warnings: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    online_rows: dict[str, int] = field(default_factory=dict)  # rows written to the online store per view


def closed_at(day: dt.date) -> dt.datetime:
    """When a day's features become known: midnight UTC after it (see dbt macro day_closed_at)."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


class FeatureBuildInProgress(OperatorError, RuntimeError):
    """Another process is building features or writing the pipeline's online rows."""


# The advisory lock of feature builds on the production profile's Postgres (any constant of our own).
FEATURE_BUILD_LOCK_KEY = 0x5545_5246  # "UERF"


@contextmanager
def feature_build_lock(settings: Settings) -> Iterator[Callable[[], None]]:
    """Held by whatever publishes features or writes the pipeline's views online (a day's build, ``uer features
    materialize`` / ``expire``): two at once would interleave their publishes and online writes — an older day's
    rows written after a newer day's, one build's note of replaced entities used up by the other. Not waited for:
    the second is refused at once, saying so (an Airflow retry runs it again later). Locally an flock on
    ``data/.features.lock``; in production a Postgres advisory lock, as the warehouse is shared by every worker.
    Both go with the process that holds them, however it ends. Yields a check that raises when the lock was lost
    (production: its connection ended — a Postgres restart, a dropped link — and another worker may hold it now)."""
    what = "another process is building features or writing them online"
    if settings.offline_store == "duckdb":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(settings.data_dir / ".features.lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise FeatureBuildInProgress(f"{what} (the lock {lock.lock_file} is held); run this again once it "
                                         "has finished") from None
        try:
            yield lambda: None  # an flock ends only with its process
        finally:
            lock.release()
        return
    warehouse.ensure_database(settings)
    key = FEATURE_BUILD_LOCK_KEY

    def still_held() -> None:
        try:
            held = conn.execute("select count(*) from pg_locks where locktype = 'advisory' and granted "
                                "and pid = pg_backend_pid() and objid = %s", (key,)).fetchone()[0]
        except psycopg.Error as exc:
            raise FeatureBuildInProgress(f"the feature build lost its Postgres advisory lock ({exc}); another "
                                         "worker may be building: run this again") from exc
        if not held:
            raise FeatureBuildInProgress("the feature build lost its Postgres advisory lock; run this again")

    # Keepalives: a dead link is noticed, and the lock (the session's) goes with it, not hours later.
    with psycopg.connect(settings.postgres.dsn(), autocommit=True, keepalives=1, keepalives_idle=30) as conn:
        if not conn.execute("select pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            raise FeatureBuildInProgress(f"{what} (Postgres advisory lock {key} on {settings.postgres.database} "
                                         "is held: pg_locks names its pid); run this again once it has finished")
        try:
            yield still_held
        finally:
            try:
                conn.execute("select pg_advisory_unlock(%s)", (key,))
            except psycopg.Error:  # the connection is gone, and the lock with it: never hide the build's outcome
                log.warning("the feature build lock's connection ended before its release", exc_info=True)


def build_feature_day(settings: Settings, ds: dt.date) -> FeatureDayReport:
    """Build, check, publish and materialise the features of day ``ds`` (idempotent for ``ds``), holding
    :func:`feature_build_lock`."""
    with feature_build_lock(settings) as still_held:
        return _build_feature_day(settings, ds, still_held)


def _build_feature_day(settings: Settings, ds: dt.date, still_held: Callable[[], None]) -> FeatureDayReport:
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args):  # noqa: ANN001, ANN202 - tiny local helper
        start = time.perf_counter()
        out = fn(*args)
        seconds[name] = round(time.perf_counter() - start, 3)
        return out

    if settings.dbt_target == "postgres":
        log.info("features %s: load raw partitions into Postgres", ds)
        timed("load_raw", warehouse.load_raw_to_postgres, settings, ds)
    log.info("features %s: dbt build", ds)
    timed("dbt", warehouse.run_dbt, settings, ds)
    first_publication = not warehouse.published_days(settings)
    days = warehouse.pending_days(settings, ds)
    log.info("features %s: gate on %d day(s)", ds, len(days))
    report = timed("gx", validate_days, settings, ds, days)
    log.info("features %s: publish", ds)
    # An earlier day built again publishes its own partitions only: the whole-table marts (training examples, query
    # stats) were built as of it, and the offline store keeps them as of the latest day.
    marts = warehouse.DAILY_MARTS if later_day_published(settings, ds) else warehouse.MARTS
    still_held()  # before anything is published
    if republished := sorted(set(days) & set(warehouse.published_days(settings))):
        store.note_replaced_entities(settings, republished)
    rows = timed("publish", warehouse.publish_days, settings, days, marts)
    timed("apply", store.apply, settings)
    log.info("features %s: materialise", ds)
    still_held()
    online = timed("materialize", materialize_days, settings, days, first_publication)
    return FeatureDayReport(ds=ds, published_days=days, rows=rows, warnings=report.warnings, seconds=seconds,
                            online_rows=online)


def later_day_published(settings: Settings, ds: dt.date) -> dt.date | None:
    """The newest published day after ``ds``, if any. A run of ``ds`` is then a rebuild of an earlier day (an
    Airflow clear, a backfill): its features are rebuilt, but a model trained on them would be gated, and may be
    promoted, over one trained on later data, so the daily DAG trains none."""
    later = [day for day in warehouse.published_days(settings) if day > ds]
    return max(later) if later else None


def materialize_days(settings: Settings, days: list[dt.date], first_publication: bool) -> dict[str, int]:
    """Materialise the published days in one window: the latest row per entity goes online, written
    in bounded chunks (:func:`feature_repo.store.materialize`). The first publication also loads
    everything older (first listings keep their creation time)."""
    start = FIRST_MATERIALIZATION_START if first_publication else closed_at(min(days)) - dt.timedelta(days=1)
    return store.materialize(settings, start, closed_at(max(days)) + dt.timedelta(seconds=1))
