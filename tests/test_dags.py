"""The Airflow DAGs: they import cleanly, and `airflow dags test` runs the daily DAG end to end on a
tiny world (real dbt, GX, Feast, KFP local, Milvus Lite, smoke query); a failed gate keeps serving
the previous model and index; rerunning a day changes nothing; a three-day backfill runs."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval_core.settings import PROJECT_ROOT, Settings
from tests.feature_helpers import HELD_OUT, NEXT_DAY, simulate_tiny
from tests.serving_helpers import free_port, milvus_server, with_milvus

DAILY = "uer_daily_retraining"


DAGBAG_REPORT = """
import json
import pendulum
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.encoders import coerce_to_core_timetable
from airflow.timetables.base import TimeRestriction
bag = DagBag(dag_folder=DAGS, include_examples=False)

def first_scheduled(dag):
    since = TimeRestriction(earliest=pendulum.datetime(2026, 12, 1, tz="UTC"), latest=None, catchup=True)
    run = coerce_to_core_timetable(dag.timetable).next_dagrun_info(last_automated_data_interval=None,
                                                                   restriction=since)
    return [run.logical_date.isoformat(), run.run_after.isoformat()]

print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {
    d: {"max_active_runs": dag.max_active_runs, "tasks": {t.task_id: [t.retries, t.retry_exponential_backoff,
        t.on_failure_callback is not None] for t in dag.tasks}, "pools": {t.task_id: t.pool for t in dag.tasks},
    "first_scheduled": first_scheduled(dag)}
    for d, dag in bag.dags.items()}}))
"""


def test_every_dag_imports_without_errors(tmp_path: Path) -> None:
    from dags.common import airflow_environment

    env = {**os.environ, **airflow_environment(Settings(data_dir=tmp_path / "data"))}
    script = DAGBAG_REPORT.replace("DAGS", repr(str(PROJECT_ROOT / "dags")))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    assert set(report["dags"]) == {DAILY, "uer_nightly_index_refresh"}
    for dag in report["dags"].values():
        assert dag["max_active_runs"] == 1
        assert all(retries >= 1 and backoff and callback for retries, backoff, callback in dag["tasks"].values())
    assert {"land_raw_partitions", "build_features", "refresh_user_states", "train_and_validate", "promoted",
            "publish_index", "keep_serving_index", "smoke_query", "prune_retired_versions"} == set(
        report["dags"][DAILY]["tasks"])
    assert {"refresh_index", "smoke_query", "prune_retired_versions"} == set(
        report["dags"]["uer_nightly_index_refresh"]["tasks"])
    # the daily run of a day starts once that day is over (its logical date, which names the day, is not its start)
    logical, run_after = report["dags"][DAILY]["first_scheduled"]
    assert (logical, run_after) == ("2026-12-01T00:00:00+00:00", "2026-12-02T00:00:00+00:00")
    # the two tasks that publish a collection share one pool (they must not build side by side), and only they
    pool = Settings().airflow.index_pool
    in_pool = {(d, t) for d, dag in report["dags"].items() for t, p in dag["pools"].items() if p == pool}
    assert in_pool == {(DAILY, "publish_index"), ("uer_nightly_index_refresh", "refresh_index")}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("dags")
    settings = with_milvus(Settings(profile="local", data_dir=root / "data", artifacts_dir=root / "artifacts"),
                           free_port())
    simulate_tiny(settings)
    with milvus_server(settings):
        yield settings


def dags_test(settings: Settings, day: object, conf: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "UER_DATA_DIR": str(settings.data_dir), "UER_ARTIFACTS_DIR": str(settings.artifacts_dir),
           "UER_MILVUS__URI": settings.milvus.uri, "UER_AIRFLOW__RETRIES": "0"}
    done = subprocess.run([str(Path(sys.executable).with_name("uer")), "airflow", "test", "--ds", str(day),
                           "--conf", json.dumps(conf)], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=1500)
    (settings.artifacts_dir / f"dags-test-{day}.log").parent.mkdir(parents=True, exist_ok=True)
    (settings.artifacts_dir / f"dags-test-{day}.log").write_text(done.stdout + done.stderr)
    return done


TINY_RUN = {"train": {"model": {"featurizer": {"n_buckets": 16384}}, "steps": 40, "batch_size": 64,
                      "warmup_steps": 10, "ramp_steps": 10, "hard_refresh_steps": 20},
            "use_text": False, "graph_dim": 16, "boost": {"trials": 5}}


def test_three_day_backfill_runs(world: Settings) -> None:
    """The first three days, one run each, in order (features only: nothing is served yet)."""
    import datetime as dt

    from feature_repo.warehouse import published_days

    days = [dt.date(2026, 10, 1) + dt.timedelta(days=i) for i in range(3)]
    airflow_db = world.data_dir / "airflow" / "airflow.db"
    for day in days:
        done = dags_test(world, day, {"train": False})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if day == days[0]:  # as in a metadata DB made before the pool existed: the next `uer airflow` adds it
            with sqlite3.connect(airflow_db) as db:
                db.execute("delete from slot_pool where pool = ?", (world.airflow.index_pool,))
    assert published_days(world) == days
    # `uer airflow` created the publishing tasks' pool with one slot (a scheduler never runs a task of a missing pool)
    with sqlite3.connect(airflow_db) as db:
        slots = db.execute("select slots from slot_pool where pool = ?", (world.airflow.index_pool,)).fetchall()
    assert slots == [(1,)]


def test_daily_dag_end_to_end_then_failed_gate_and_rerun_keep_serving(world: Settings) -> None:
    import pandas as pd

    from feature_repo.warehouse import (
        EMBEDDINGS,
        EMBEDDINGS_SCHEMA,
        USER_STATES,
        USER_STATES_SCHEMA,
        features_dir,
        write_version,
        written_versions,
    )
    from serving.bundle import ModelBundle
    from serving.index import IndexLifecycle
    from serving.retriever import Retriever, smoke_query

    # what a version that serves nowhere left behind (e.g. a registration since retrained, a version whose
    # collections were dropped) is pruned after the swap
    write_version(world, USER_STATES, USER_STATES_SCHEMA.empty_table(), "retired@bundle")
    write_version(world, EMBEDDINGS, EMBEDDINGS_SCHEMA.empty_table(), "retired")
    assert "retired@bundle" in written_versions(world, USER_STATES) and "retired" in written_versions(world, EMBEDDINGS)
    done = dags_test(world, NEXT_DAY, {"run_config": TINY_RUN})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lifecycle = IndexLifecycle(world)
    first = lifecycle.serving()
    assert first is not None and first.model_version == f"daily-{NEXT_DAY:%Y%m%d}"
    assert smoke_query(world)["model_version"] == first.model_version
    # the new model's user states were written before its alias swap, for the users the API looks up
    bundle = ModelBundle.load(world, first.model_version)
    users = pd.read_parquet(features_dir(world) / USER_STATES / f"version={bundle.bundle_id}")["user_id"].tolist()
    assert len(users) > 20 and set(Retriever(world).stored_states(bundle, users[:20])) == set(users[:20])
    assert written_versions(world, USER_STATES) == [bundle.bundle_id]
    assert written_versions(world, EMBEDDINGS) == [bundle.bundle_id]

    # A model that cannot pass the gate (one optimiser step, and no lexical channel, which is a fair
    # tf-idf matcher before any training): the branch keeps the previous pair.
    bad = {**TINY_RUN, "train": {**TINY_RUN["train"], "steps": 1, "warmup_steps": 0, "ramp_steps": 0,
                                 "model": {**TINY_RUN["train"]["model"], "lexical_dim": 0}}}
    # First as a rerun of the promoted day: production already names the day's version, and the run must still not
    # count as promoted (it used to publish a new collection of the old model).
    collections = [v.collection for v in lifecycle.versions()]
    done = dags_test(world, NEXT_DAY, {"run_config": bad})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [v.collection for v in lifecycle.versions()] == collections and lifecycle.serving() == first
    # Then on the next day.
    done = dags_test(world, HELD_OUT, {"run_config": bad})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    decision = json.loads(next((world.artifacts_dir / "kfp" / f"daily-{HELD_OUT:%Y%m%d}").glob(
        "*/gate-op/decision")).read_text())
    assert decision["promote"] is False
    assert lifecycle.serving() == first and smoke_query(world)["index_version"] == first.index_version
    # the promoted run's data and models went when this one finished (the model serves from its bundle); its
    # reports stay, and the refused run, the newest, keeps everything
    earlier_runs = list((world.artifacts_dir / "kfp" / first.model_version).iterdir())  # promoted, refused rerun
    assert len(earlier_runs) == 2 and all(not (run / "train-op" / "models").exists()
                                          and (run / "gate-op" / "decision").exists() for run in earlier_runs)
    assert next((world.artifacts_dir / "kfp" / f"daily-{HELD_OUT:%Y%m%d}").glob("*/train-op/models/model"))

    # Rerunning a day without training changes nothing that serves.
    before = [v.collection for v in lifecycle.versions()]
    done = dags_test(world, HELD_OUT, {"train": False})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [v.collection for v in lifecycle.versions()] == before and lifecycle.serving() == first
    # An earlier day run again after a later one (a clear of that day): its features are rebuilt (dbt's
    # relationships tests used to fail on the later day's rows), and no model is trained on it.
    done = dags_test(world, NEXT_DAY, {"run_config": TINY_RUN})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((world.artifacts_dir / "kfp" / first.model_version).iterdir())) == 2  # no third run
    assert [v.collection for v in lifecycle.versions()] == before and lifecycle.serving() == first
