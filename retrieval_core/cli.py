"""``uer``: one command line for every stage of the platform.

Each subcommand is a thin shell over a typed stage function; the Airflow DAGs call the same
functions. Run ``uer --help`` or ``uer COMMAND --help``.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from retrieval_core.contract import TABLES, ContractViolation, land_partition
from retrieval_core.errors import OPERATOR_EXIT_CODE, OperatorError
from retrieval_core.settings import get_settings

app = typer.Typer(
    help="Unified-embedding personalized retrieval: simulate, land, and run the platform's stages.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


@app.command()
def settings() -> None:
    """Print the effective settings (profile defaults + UER_* environment), secrets masked."""
    print(json.dumps(get_settings().masked(), indent=2, default=str))


@app.command()
def simulate(
    world: Annotated[str, typer.Option(help="named world: tiny, default or large")] = "default",
    seed: Annotated[int | None, typer.Option(help="override the world's seed")] = None,
    days: Annotated[int | None, typer.Option(help="override the number of days")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="override any world knob, e.g. --set tail_gap_rate=0.3 (repeatable)")] = None,
) -> None:
    """Generate a simulated marketplace and land it, day by day, as raw-data contract partitions.

    Writes data_dir/raw/<table>/ds=YYYY-MM-DD/ (catalogue, users, events) and the latent truth to
    data_dir/diagnostics/ (for tests and analysis; training never reads it).
    """
    from retrieval_core.simulator import simulate as run_simulation
    from retrieval_core.simulator import world_config

    overrides: dict[str, object] = {}
    for item in set_ or []:
        key, _, value = item.partition("=")
        if not _:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    if seed is not None:
        overrides["seed"] = seed
    if days is not None:
        overrides["days"] = days
    try:
        config = world_config(world, **overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    s = get_settings()
    summary = run_simulation(config, s.raw_dir, s.landing_dir, s.quarantine_dir, s.diagnostics_dir)
    console.print(f"[green]landed[/] {summary.products:,} products, {summary.users:,} users, "
                  f"{summary.events:,} events over {len(summary.days)} days into {s.raw_dir}")


@app.command()
def land(
    table: Annotated[str, typer.Argument(help=f"one of {', '.join(TABLES)}")],
    day: Annotated[str, typer.Argument(help="the partition's day, YYYY-MM-DD")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a parquet file in the contract")],
) -> None:
    """Validate a file against the raw-data contract and publish it as TABLE's partition for DAY.

    A file that breaks the contract is moved to data_dir/quarantine/ with a reason.json, and
    nothing is published: the partition already landed for that day (if any) stays as it was.
    """
    if table not in TABLES:
        raise typer.BadParameter(f"table must be one of {TABLES}, got {table!r}")
    try:
        partition = dt.date.fromisoformat(day)
    except ValueError as exc:
        raise typer.BadParameter(f"DAY must be YYYY-MM-DD, got {day!r}") from exc
    s = get_settings()
    try:
        dest = land_partition(file, table, partition, s.raw_dir, s.quarantine_dir)
    except ContractViolation as violation:
        console.print(f"[red]rejected[/] {violation}")
        raise typer.Exit(code=2) from violation
    console.print(f"[green]landed[/] {dest}")


@app.command("land-homedepot")
def land_homedepot() -> None:
    """Land the Home Depot judgments (read from settings.homedepot_dir, never copied) in the contract."""
    from retrieval_core.adapters.homedepot import land_homedepot as run

    s = get_settings()
    try:
        counts = run(s.homedepot_dir, s.raw_dir, s.landing_dir, s.quarantine_dir)
    except FileNotFoundError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    except ContractViolation as violation:  # the adapted tables break the contract: none was landed
        console.print(f"[red]rejected[/] {violation}")
        raise typer.Exit(code=2) from violation
    console.print(f"[green]landed[/] Home Depot: {counts}")


features = typer.Typer(help="The feature pipeline: dbt marts → quality gate → Feast.", no_args_is_help=True)
app.add_typer(features, name="features")


def _day(value: str | None) -> dt.date:
    """A YYYY-MM-DD option, defaulting to the latest landed day of events."""
    from retrieval_core.contract import landed_days

    if value:
        try:
            return dt.date.fromisoformat(value)
        except ValueError as exc:
            raise typer.BadParameter(f"--ds must be YYYY-MM-DD, got {value!r}") from exc
    days = landed_days(get_settings().raw_dir, "events")
    if not days:
        raise typer.BadParameter("no landed events: run `uer simulate` (or land your data) first")
    return days[-1]


DsOption = Annotated[str | None, typer.Option("--ds", help="the day, YYYY-MM-DD (default: latest landed day)")]


@features.command("build")
def features_build(ds: DsOption = None) -> None:
    """Build one day's features: dbt build (+ dbt tests) → GX gate → publish → Feast apply → materialise.

    A refused day (failed dbt test or critical expectation) exits with code 3 and publishes nothing:
    the offline and online stores keep the previous day's state.
    """
    from feature_repo.stages import build_feature_day

    day = _day(ds)
    with console.status(f"building features for {day}"):
        report = build_feature_day(get_settings(), day)
    console.print(f"[green]published[/] {', '.join(map(str, report.published_days))}: {report.rows}")
    for warning in report.warnings:
        console.print(f"[yellow]warning[/] {warning}")
    console.print(f"timings (s): {report.seconds}")


@features.command("apply")
def features_apply() -> None:
    """Register Feast entities, feature views and feature services (idempotent)."""
    from feature_repo.store import apply

    console.print(f"[green]applied[/] {', '.join(apply(get_settings()))}")


@features.command("materialize")
def features_materialize(ds: DsOption = None) -> None:
    """Load published feature rows up to the close of DS into the online store."""
    from feature_repo.stages import FIRST_MATERIALIZATION_START, closed_at, feature_build_lock
    from feature_repo.store import materialize

    day = _day(ds)
    with feature_build_lock(get_settings()):
        materialize(get_settings(), FIRST_MATERIALIZATION_START, closed_at(day) + dt.timedelta(seconds=1))
    console.print(f"[green]materialised[/] up to {closed_at(day)} (or the later end already online)")


@features.command("expire")
def features_expire() -> None:
    """Delete online rows older than their view's TTL, reading every published row (once, after upgrading from
    a version that did not expire them; each materialisation expires what aged out since the previous one)."""
    from feature_repo.stages import feature_build_lock
    from feature_repo.store import expire_all

    with feature_build_lock(get_settings()):
        console.print(f"[green]expired[/] entities per view: {expire_all(get_settings())}")


@features.command("lookup")
def features_lookup(
    user_id: Annotated[list[int] | None, typer.Option("--user-id", help="repeatable; services keyed by user")] = None,
    product_id: Annotated[list[int] | None,
                          typer.Option("--product-id", help="repeatable; services keyed by product")] = None,
    model_bundle: Annotated[str | None, typer.Option(help="the bundle id, for query_tower_state_v1")] = None,
    service: Annotated[str, typer.Option(help="feature service")] = "query_tower_v1",
) -> None:
    """Read entities' features from the online store through a feature service, as JSON."""
    from feast.errors import FeatureServiceNotFoundException

    from feature_repo.store import get_store, service_join_keys

    store = get_store(get_settings())
    try:
        feature_service = store.get_feature_service(service)
    except FeatureServiceNotFoundException as exc:
        known = sorted(s.name for s in store.list_feature_services())
        raise typer.BadParameter(f"no feature service {service!r}; the registry has {known}") from exc
    keys = service_join_keys(store, feature_service)
    given = {"user_id": user_id or [], "product_id": product_id or [],
             "model_bundle": [model_bundle] if model_bundle else []}
    options = {key: "--" + key.replace("_", "-") for key in given}
    extra = [options[key] for key, values in given.items() if values and key not in keys]
    missing = [options.get(key, key) for key in keys if not given.get(key)]
    if extra or missing:
        raise typer.BadParameter(f"{service} is keyed by {', '.join(options.get(k, k) for k in keys)}"
                                 + (f"; missing {', '.join(missing)}" if missing else "")
                                 + (f"; not a key of it: {', '.join(extra)}" if extra else ""))
    ids = next(key for key in keys if key != "model_bundle")  # the repeated key; a bundle applies to every row
    rows = [{ids: value, **({"model_bundle": model_bundle} if "model_bundle" in keys else {})} for value in given[ids]]
    print(json.dumps(store.get_online_features(features=feature_service, entity_rows=rows).to_dict(),
                     indent=2, default=str))


@features.command("serve")
def features_serve(port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 6566) -> None:
    """Run Feast's feature server on 127.0.0.1 for other teams (Ctrl-C stops it)."""
    import os
    import subprocess
    import sys

    from feature_repo.store import write_store_yaml

    s = get_settings()
    repo = write_store_yaml(s)
    env = dict(os.environ)
    for name, secret in (("UER_POSTGRES__PASSWORD", s.postgres.password), ("UER_REDIS__PASSWORD", s.redis.password)):
        if secret is not None:
            env[name] = secret.get_secret_value()
    feast = [sys.executable, "-m", "feast.cli.cli", "-c", str(repo), "serve", "-h", "127.0.0.1", "-p", str(port),
             "--no-access-log"]
    console.print(f"feature server on http://127.0.0.1:{port} (repo {repo})")
    raise typer.Exit(subprocess.call(feast, env=env))


@app.command("train")
def train_command(
    steps: Annotated[int, typer.Option(help="optimiser steps of the unified model")] = 600,
    adapt_pairs: Annotated[int, typer.Option(help="query→product pairs for MiniLM pre-training")] = 20_000,
    text: Annotated[bool, typer.Option(help="use the (adapted) MiniLM product encodings")] = True,
    version: Annotated[str | None, typer.Option(help="model version id (default: date + random)")] = None,
    kfp: Annotated[bool, typer.Option(help="run as the Kubeflow pipeline (kfp.local) or in this process")] = True,
) -> None:
    """Train, evaluate and register the unified model on the published features.

    With --kfp (default) the compiled Kubeflow pipeline runs locally (kfp.local, one subprocess per
    component, artefacts under artifacts/kfp/<version>/); --no-kfp runs the same steps in this
    process under artifacts/models/<version>/. Either way the product embeddings are published to
    Feast and Recall@10/100/1000 and NDCG@10 are printed per system and slice.
    """
    import datetime as dt_
    import uuid

    from rich.table import Table

    from training.pipeline import compile_pipeline, run_locally
    from training.stages import TrainingRunConfig, run_training
    from training.train import TrainConfig

    s = get_settings()
    config = TrainingRunConfig(train=TrainConfig(steps=steps), adapt_pairs_max=adapt_pairs, use_text=text)
    version = version or f"{dt_.datetime.now(dt_.UTC):%Y%m%d%H%M}-{uuid.uuid4().hex[:6]}"
    if kfp:
        yaml_path = compile_pipeline(s.kfp_local_dir / "training_pipeline.yaml")
        console.print(f"compiled {yaml_path}; running it with kfp.local")
        root = run_locally(s, config.model_dump_json(), version)
        metrics = json.loads(next(root.glob("*/evaluate-op/metrics")).read_text())
        where = root
    else:
        with console.status("training and evaluating"):
            report = run_training(s, config, version)
        metrics, where = report.metrics, report.directory
    table = Table(title=f"test window, model {version}")
    for column in ("system", "slice", "n", "recall@10", "recall@100", "recall@1000", "ndcg@10"):
        table.add_column(column)
    for system, slices in metrics.items():
        for name, m in slices.items():
            table.add_row(system, name, str(m["n"]), *(f"{m[k]:.3f}" for k in
                                                       ("recall@10", "recall@100", "recall@1000", "ndcg@10")))
    Console().print(table)
    console.print(f"artefacts: {where}")


index = typer.Typer(help="The Milvus product index: publish (refresh), status, rollback, rollforward, prune.",
                    no_args_is_help=True)
app.add_typer(index, name="index")


@index.command("publish")
def index_publish(
    model_version: Annotated[str | None, typer.Option(help="model version (default: the one serving)")] = None,
) -> None:
    """Embed the catalogue with a model version, check the new collection, swap the alias (nightly refresh)."""
    from serving.refresh import refresh_index

    report = refresh_index(get_settings(), model_version)
    console.print(f"alias {get_settings().milvus.alias} → {report.index.collection}: {report.products} products, "
                  f"{report.newly_encoded} newly encoded, ANN recall@100 {report.checks['ann_recall_at_100']:.3f}, "
                  f"{report.seconds['total']:.1f} s")


@index.command("status")
def index_status() -> None:
    """The collections kept, which one the alias serves, their model versions, and the registration production
    names (what the next training run is gated against, and what a publication of its version publishes)."""
    from serving.bundle import ModelNotFound
    from serving.index import IndexLifecycle
    from serving.refresh import awaiting_publication, production_registration

    settings = get_settings()
    lifecycle = IndexLifecycle(settings)
    serving = lifecycle.serving()
    for v in lifecycle.versions():
        mark = "→" if serving is not None and v.collection == serving.collection else " "
        console.print(f"{mark} {v.collection}  model={v.model_version}  bundle={v.bundle_id}  state={v.state}  "
                      f"created={v.created_at}", soft_wrap=True)
    try:
        version, bundle_id = production_registration(settings)
    except ModelNotFound:
        console.print("production: nothing promoted yet")
        return
    waiting = "  (awaiting publication: the alias serves another)" if awaiting_publication(settings, version) else ""
    console.print(f"production: {version}  bundle={bundle_id or 'none registered'}{waiting}", soft_wrap=True)


@index.command("prune")
def index_prune() -> None:
    """Drop the collections no rollback can reach: crashed builds and publications older than the serving one (once
    older than ``milvus.unfinished_grace_s``) and served ones beyond the newest ``milvus.keep_previous``; never one an
    alias points to. Each publication does this after its swap; this is for a crash nothing published after."""
    from serving.index import IndexLifecycle

    dropped = IndexLifecycle(get_settings()).prune()
    console.print(f"dropped {len(dropped)} collection(s){': ' + ', '.join(dropped) if dropped else ''}", soft_wrap=True)


def _re_point(forward: bool) -> None:
    from serving.refresh import roll_back

    target, production = roll_back(get_settings(), forward=forward)
    console.print(f"alias {get_settings().milvus.alias} → {target.collection} (model {target.model_version}); "
                  f"{production}")


@index.command("rollback")
def index_rollback() -> None:
    """Point the alias back at the previous served collection, and production at its model (what the next
    training run is gated against)."""
    _re_point(forward=False)


@index.command("rollforward")
def index_rollforward() -> None:
    """Undo a rollback: point the alias at the next served collection (kept after a rollback), and production at
    its model."""
    _re_point(forward=True)


@app.command("user-states")
def user_states_command(
    model_version: Annotated[str | None, typer.Option(help="model version (default: the one serving)")] = None,
) -> None:
    """Precompute every materialised user's query-tower state with a model version, into the online store
    (what the API reads first on a cache miss); run after each materialisation and before each alias swap."""
    from serving.user_states import publish_user_states

    report = publish_user_states(get_settings(), model_version)
    console.print(f"{report.users} user states of {report.bundle_id} ({report.personalized} with a history) "
                  f"in {report.seconds:.1f} s")


@app.command("prune-retired")
def prune_retired_command() -> None:
    """Delete what model versions that can no longer serve (neither production, nor the model of a kept
    collection, nor a candidate registered after production) left behind: their user states (online and
    offline), product embeddings (offline) and files (bundle, encoding cache, KFP root); the DAGs do it after
    each alias swap."""
    from serving.retention import prune_retired_versions

    pruned = prune_retired_versions(get_settings())
    for what, names in pruned.items():
        console.print(f"{what}: pruned {len(names)}{': ' + ', '.join(names) if names else ''}")


@app.command("serve")
def serve_command(
    port: Annotated[int | None, typer.Option(help="port on the settings' host (default: serving.port)")] = None,
) -> None:
    """Run the retrieval API (BentoML) on the settings' loopback host; Ctrl-C stops it."""
    import os
    import subprocess
    import sys

    from retrieval_core.settings import PROJECT_ROOT
    from serving.engine import ensure_server
    from training.export import bentoml_home

    s = get_settings()
    ensure_server(s)  # the embedded Milvus Lite server (local profile), if it is not running yet
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home(s))}
    command = [str(Path(sys.executable).with_name("bentoml")), "serve", "serving.service:RetrievalService",
               "--host", s.serving.host, "--port", str(port or s.serving.port)]
    console.print(f"retrieval API on http://{s.serving.host}:{port or s.serving.port} (POST /retrieve)")
    raise typer.Exit(subprocess.call(command, env=env, cwd=PROJECT_ROOT))


airflow = typer.Typer(help="Run the platform's Airflow DAGs on this machine (SQLite metadata DB).",
                      no_args_is_help=True)
app.add_typer(airflow, name="airflow")


def _airflow(args: list[str]) -> int:
    import contextlib
    import os
    import sqlite3
    import subprocess
    import sys

    from dags.common import airflow_environment

    settings = get_settings()
    env = {**os.environ, **airflow_environment(settings)}
    binary = str(Path(sys.executable).with_name("airflow"))
    database = Path(env["AIRFLOW_HOME"]) / "airflow.db"
    if not database.exists() or args[:1] == ["standalone"]:
        subprocess.run([binary, "db", "migrate"], env=env, check=True, capture_output=True)
    # The scheduler never runs a task whose pool is missing (`dags test` ignores pools): a DB made before the pool
    # existed gets it too. Looked up in the SQLite file directly: the airflow CLI takes seconds to start.
    with contextlib.closing(sqlite3.connect(database)) as db:
        has_pool = db.execute("select 1 from slot_pool where pool = ?", (settings.airflow.index_pool,)).fetchone()
    if not has_pool:
        subprocess.run([binary, "pools", "set", settings.airflow.index_pool, "1",
                        "tasks that publish a Milvus collection, one at a time"], env=env, check=True,
                       capture_output=True)
    return subprocess.call([binary, *args], env=env)


@airflow.command("test")
def airflow_test(
    ds: DsOption = None,
    dag_id: Annotated[str, typer.Option(help="which DAG")] = "uer_daily_retraining",
    conf: Annotated[str, typer.Option(help="JSON run conf, e.g. {\"run_config\": {...}}")] = "{}",
) -> None:
    """``airflow dags test`` one run of a DAG for a day (default: the latest landed day)."""
    day = _day(ds)
    console.print(f"airflow dags test {dag_id} {day}")
    start = time.perf_counter()
    code = _airflow(["dags", "test", dag_id, day.isoformat(), "--conf", conf])
    console.print(f"airflow dags test {dag_id} {day} finished in {time.perf_counter() - start:.1f} s (exit {code})",
                  soft_wrap=True)
    raise typer.Exit(code)


@airflow.command("ui")
def airflow_ui() -> None:
    """``airflow standalone`` on http://127.0.0.1:8080 (Ctrl-C stops it)."""
    raise typer.Exit(_airflow(["standalone"]))


def main(args: list[str] | None = None) -> None:
    """The ``uer`` entry point: the app, with an ``OperatorError`` reported as its message and exit code 3
    instead of a traceback."""
    from rich.markup import escape

    try:
        app(args=args)
    except OperatorError as exc:
        console.print(f"[red]error[/] {escape(str(exc))}", soft_wrap=True)
        raise SystemExit(OPERATOR_EXIT_CODE) from None


if __name__ == "__main__":
    main()
