"""The daily DAG: land → features (dbt → GX gate → Feast) → the serving model's user states, and
training pipeline (KFP) → gate branch → the new model's user states + index publish (check + alias swap) →
smoke query; then what versions that no longer serve left behind (user states, product embeddings, files) is
pruned. Every task is idempotent for its logical date."""

from __future__ import annotations

from airflow.sdk import dag, get_current_context, task
from airflow.timetables.interval import CronDataIntervalTimetable

from dags.common import START_DATE, day_of, default_args, index_pool


# A run's logical date is the day it processes, so it starts once that day is over: Airflow 3's plain "@daily" (a
# CronTriggerTimetable) dates each run by its start, the day that has just begun and has no data yet.
@dag(dag_id="uer_daily_retraining", schedule=CronDataIntervalTimetable("@daily", timezone="UTC"), start_date=START_DATE,
     catchup=False, max_active_runs=1,
     default_args=default_args(), tags=["uer"],
     params={"run_config": {}, "train": True},
     doc_md=__doc__)
def uer_daily_retraining() -> None:
    @task
    def land_raw_partitions(ds: str | None = None) -> dict[str, str]:
        """Validate and land the day's raw partitions (already landed: checked and kept)."""
        from retrieval_core.contract import land_day
        from retrieval_core.settings import get_settings

        s = get_settings()
        return land_day(day_of(ds), s.raw_dir, s.landing_dir, s.quarantine_dir)

    @task
    def build_features(landed: dict[str, str], ds: str | None = None) -> dict:
        """dbt build → great-expectations gate → publish → Feast materialisation for the day."""
        from feature_repo.stages import build_feature_day
        from retrieval_core.settings import get_settings

        report = build_feature_day(get_settings(), day_of(ds))
        return {"ds": str(report.ds), "rows": report.rows, "seconds": report.seconds}

    @task
    def refresh_user_states(features: dict) -> dict:
        """The serving model's user states from the day's features (the API reads them on a cache miss)."""
        from retrieval_core.settings import get_settings
        from serving.bundle import ModelNotFound
        from serving.user_states import publish_user_states

        try:
            report = publish_user_states(get_settings())
        except ModelNotFound as exc:  # before the first model there is nothing to compute them with
            return {"skipped": str(exc)}
        return {"bundle": report.bundle_id, "users": report.users, "seconds": report.seconds}

    @task
    def train_and_validate(features: dict, ds: str | None = None) -> dict:
        """The KFP training pipeline; its validation gate decides promotion. Not for an earlier day built again."""
        from feature_repo.stages import later_day_published
        from retrieval_core.settings import get_settings
        from training.pipeline import run_pipeline
        from training.stages import TrainingRunConfig

        params = get_current_context()["params"]
        if not params.get("train", True):
            return {"version": None, "promoted": False}
        # One version per data day: rerunning the day retrains under the same name.
        version = f"daily-{day_of(ds):%Y%m%d}"
        if (later := later_day_published(get_settings(), day_of(ds))) is not None:
            # The version still goes to the branch: an earlier run of the day may have promoted it unpublished.
            return {"version": version, "promoted": False,
                    "skipped": f"{later} is published already: features rebuilt, no model trained on an earlier day"}
        config = TrainingRunConfig.model_validate(params.get("run_config") or {})
        return run_pipeline(get_settings(), config.model_dump_json(), version)

    @task.branch
    def promoted(outcome: dict) -> str:
        """Publish what this run promoted, or its day's version that production names but no collection serves (an
        earlier run of the day promoted it and its publication failed; this rerun's gate refused its own model)."""
        if outcome["promoted"]:
            return "publish_index"
        if outcome["version"] is not None:
            from retrieval_core.settings import get_settings
            from serving.refresh import awaiting_publication

            if awaiting_publication(get_settings(), outcome["version"]):
                return "publish_index"
        return "keep_serving_index"

    @task(pool=index_pool())
    def publish_index(outcome: dict) -> dict:
        """The new version's user states, then its catalogue embedded, the collection checked, the alias swapped
        (nothing if production was rolled back since the gate)."""
        from retrieval_core.settings import get_settings
        from serving.refresh import publish_promoted

        if (published := publish_promoted(get_settings(), outcome["version"])) is None:
            return {"skipped": f"production no longer names {outcome['version']} (rolled back): not published"}
        report = published.refresh
        return {"collection": report.index.collection, "checks": report.checks, "seconds": report.seconds,
                "user_states": published.user_states}

    @task
    def prune_retired_versions(published: dict) -> dict[str, list[str]]:
        """The user states, product embeddings and files of versions no kept collection serves any more (its own task:
        a failure here must not fail, and on retry re-run, the publish before it)."""
        from retrieval_core.settings import get_settings
        from serving.retention import prune_retired_versions as prune

        return prune(get_settings())

    @task
    def keep_serving_index() -> str:
        return "the gate kept the production model: the index and the service are unchanged"

    @task(trigger_rule="none_failed_min_one_success")
    def smoke_query() -> dict:
        """What the service now serves answers a query (the service follows the alias by itself)."""
        from retrieval_core.settings import get_settings
        from serving.index import IndexLifecycle
        from serving.retriever import smoke_query as run_smoke

        settings = get_settings()
        if IndexLifecycle(settings).serving() is None:  # e.g. a features-only backfill before the first model
            return {"skipped": f"nothing is published under {settings.milvus.alias!r} yet"}
        return run_smoke(settings)

    features = build_features(land_raw_partitions())
    refresh_user_states(features)
    outcome = train_and_validate(features)
    branch = promoted(outcome)
    published = publish_index(outcome)
    branch >> [published, keep_serving_index()] >> smoke_query()
    prune_retired_versions(published)


uer_daily_retraining()

