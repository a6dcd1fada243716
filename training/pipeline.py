"""The training run as a Kubeflow Pipelines (v2) pipeline: one component per step of
``training.stages``, files passed as typed artefacts.

* ``compile_pipeline`` writes the YAML a production run submits to a KFP cluster (``kfp.Client``).
* ``run_locally`` executes the same pipeline on this machine with ``kfp.local`` (SubprocessRunner,
  no venv per task, offline: components import the project's packages from the current environment).

Components read the platform settings from the environment (``UER_*``), like every other stage.
(No ``from __future__ import annotations`` here: KFP reads the artefact annotations at import.)
"""


import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout
from kfp import compiler, dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output
from kfp.dsl.graph_component import GraphComponent

from retrieval_core.errors import OperatorError
from retrieval_core.settings import Settings

log = logging.getLogger(__name__)


class TrainingRunInProgress(OperatorError, RuntimeError):
    """Another local training run holds the lock: running now would delete that run's inputs when it finished."""


# In a cluster the image carries the project; locally the current environment does.
COMPONENT = {"base_image": "ghcr.io/uer/unified-retrieval:latest", "install_kfp_package": False}


@dsl.component(**COMPONENT)
def dataset_op(dataset: Output[Dataset]) -> int:
    """Examples with point-in-time history, products as of training end and test start, edges."""
    from pathlib import Path

    from retrieval_core.settings import get_settings
    from training.stages import step_dataset

    return int(step_dataset(get_settings(), Path(dataset.path))["examples"])


@dsl.component(**COMPONENT)
def graph_op(dataset: Input[Dataset], run_config: str, graph: Output[Dataset]) -> int:
    """Graph embeddings of products in the training window's engagement graph."""
    from pathlib import Path

    from training.stages import TrainingRunConfig, step_graph

    config = TrainingRunConfig.model_validate_json(run_config)
    return step_graph(Path(dataset.path), config.graph_dim, Path(graph.path))


@dsl.component(**COMPONENT)
def text_op(dataset: Input[Dataset], run_config: str, version: str, text: Output[Dataset]) -> int:
    """MiniLM adapted on (query → engaged product) pairs; product text encoded through the cache."""
    from pathlib import Path

    from retrieval_core.settings import get_settings
    from training.stages import TrainingRunConfig, step_text

    config = TrainingRunConfig.model_validate_json(run_config)
    out = Path(text.path)
    out.mkdir(parents=True, exist_ok=True)
    if not config.use_text:
        return 0
    cache = get_settings().artifacts_dir / "encoder_cache"
    return step_text(Path(dataset.path), config, cache, version, out / "text.parquet")


@dsl.component(**COMPONENT)
def train_op(dataset: Input[Dataset], graph: Input[Dataset], text: Input[Dataset], run_config: str,
             models: Output[Model], throughput: Output[Metrics]) -> float:
    """The unified model and its ablations (one model per component removed)."""
    from pathlib import Path

    from training.stages import TrainingRunConfig, step_train

    config = TrainingRunConfig.model_validate_json(run_config)
    figures = step_train(Path(dataset.path), Path(graph.path), Path(text.path) / "text.parquet", config,
                         Path(models.path))
    throughput.log_metric("examples_per_s", figures["model"]["examples_per_s"])
    throughput.log_metric("train_seconds", figures["model"]["seconds"])
    return float(figures["model"]["examples_per_s"])


@dsl.component(**COMPONENT)
def boost_op(dataset: Input[Dataset], graph: Input[Dataset], text: Input[Dataset], models: Input[Model],
             run_config: str, boosted: Output[Model]) -> float:
    """ANN boosting weights fit by optuna on the validation window; the model files travel with them."""
    import shutil
    from pathlib import Path

    from training.stages import TrainingRunConfig, step_boost

    config = TrainingRunConfig.model_validate_json(run_config)
    shutil.copytree(models.path, boosted.path)
    result = step_boost(Path(dataset.path), Path(graph.path), Path(text.path) / "text.parquet", Path(models.path),
                        config, Path(boosted.path) / "boost.json")
    return float(result["validation_recall"])


@dsl.component(**COMPONENT)
def evaluate_op(dataset: Input[Dataset], graph: Input[Dataset], text: Input[Dataset], models: Input[Model],
                run_config: str, metrics: Output[Artifact], summary: Output[Metrics],
                report_html: Output[HTML], scored_production: Output[Artifact]) -> float:
    """Recall@K / NDCG@10 on the test window for the model, its ablations, production and the baselines."""
    import shutil
    from pathlib import Path

    from retrieval_core.settings import get_settings
    from training.stages import TrainingRunConfig, step_evaluate

    config = TrainingRunConfig.model_validate_json(run_config)
    report = step_evaluate(Path(dataset.path), Path(graph.path), Path(text.path) / "text.parquet",
                           Path(models.path), config, Path(metrics.path), get_settings(),
                           Path(scored_production.path))
    shutil.copy(Path(metrics.path).with_name("report.html"), report_html.path)
    for system, slices in report.items():
        summary.log_metric(f"{system}_recall_at_100", slices["all"]["recall@100"])
    return float(report["unified"]["all"]["recall@100"])


@dsl.component(**COMPONENT)
def gate_op(dataset: Input[Dataset], graph: Input[Dataset], text: Input[Dataset], models: Input[Model],
            metrics: Input[Artifact], scored_production: Input[Artifact], version: str,
            decision: Output[Artifact]) -> bool:
    """Promote only if not worse than production, embeddings sane, ANN recall kept; reasons written."""
    from pathlib import Path

    from retrieval_core.settings import get_settings
    from training.stages import step_gate

    models_dir = get_settings().artifacts_dir / "models"
    result = step_gate(Path(dataset.path), Path(graph.path), Path(text.path) / "text.parquet", Path(models.path),
                       Path(metrics.path), models_dir, version, Path(decision.path),
                       scored_pointer=Path(scored_production.path))
    return result.promote


@dsl.component(**COMPONENT)
def export_op(dataset: Input[Dataset], graph: Input[Dataset], text: Input[Dataset], models: Input[Model],
              metrics: Input[Artifact], decision: Input[Artifact], version: str) -> str:
    """Register the model in the BentoML store, publish the run's product embeddings to Feast, then promote it
    (unless production changed since the gate decided)."""
    from pathlib import Path

    from retrieval_core.settings import get_settings
    from training.stages import step_export

    return step_export(get_settings(), Path(dataset.path), Path(graph.path), Path(text.path) / "text.parquet",
                       Path(models.path), version, Path(metrics.path), Path(decision.path))


@dsl.pipeline(name="unified-retrieval-training",
              description="Dataset → graph + text encoders → unified two-tower model → ANN boosting → evaluation "
                          "→ gate → export.")
def training_pipeline(run_config: str = "{}", version: str = "dev") -> None:
    data = dataset_op()
    graph = graph_op(dataset=data.outputs["dataset"], run_config=run_config)
    text = text_op(dataset=data.outputs["dataset"], run_config=run_config, version=version)
    trained = train_op(dataset=data.outputs["dataset"], graph=graph.outputs["graph"], text=text.outputs["text"],
                       run_config=run_config)
    boosted = boost_op(dataset=data.outputs["dataset"], graph=graph.outputs["graph"], text=text.outputs["text"],
                       models=trained.outputs["models"], run_config=run_config)
    evaluated = evaluate_op(dataset=data.outputs["dataset"], graph=graph.outputs["graph"],
                            text=text.outputs["text"], models=boosted.outputs["boosted"], run_config=run_config)
    gate = gate_op(dataset=data.outputs["dataset"], graph=graph.outputs["graph"], text=text.outputs["text"],
                   models=boosted.outputs["boosted"], metrics=evaluated.outputs["metrics"],
                   scored_production=evaluated.outputs["scored_production"], version=version)
    with dsl.If(gate.outputs["Output"] == True):  # noqa: E712 - a KFP condition, not a Python comparison
        export_op(dataset=data.outputs["dataset"], graph=graph.outputs["graph"], text=text.outputs["text"],
                  models=boosted.outputs["boosted"], metrics=evaluated.outputs["metrics"],
                  decision=gate.outputs["decision"], version=version)


def compile_pipeline(path: Path) -> Path:
    """The YAML a production run submits to Kubeflow Pipelines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(training_pipeline, str(path))
    return path


def run_locally(settings: Settings, run_config_json: str, version: str) -> Path:
    """Execute the pipeline on this machine with kfp.local; returns the pipeline root of the run. Once it has
    finished, the data and model files of every earlier local run go (``prune_earlier_runs``)."""
    from kfp import local

    root = settings.kfp_local_dir / version
    # One local run at a time: a run finishing deletes the inputs of every other run it saw.
    lock = local_run_lock(settings)
    try:
        lock.acquire()
    except Timeout:
        raise TrainingRunInProgress(
            f"another local training run holds {lock.lock_file} (the daily DAG or a `uer train`): wait for it to "
            f"finish and run again; nothing was run or deleted") from None
    try:
        earlier = set(runs(settings))
        # kfp.local leaves a workspace directory per run and, per step, a `mktemp -d` holding the component's
        # source: the run gets a temporary directory of its own for both, deleted with all in it afterwards.
        # Created before TMPDIR points into it, so this process's cached tempfile.tempdir stays the system one.
        scratch = tempfile.TemporaryDirectory(prefix=f"uer-kfp-{version}-", ignore_cleanup_errors=True)
        saved = dict(os.environ)
        try:
            # Components run `python3` from PATH: make it this environment's, with the settings exported.
            os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            os.environ.update({"UER_PROFILE": settings.profile, "UER_DATA_DIR": str(settings.data_dir),
                               "UER_ARTIFACTS_DIR": str(settings.artifacts_dir), "TMPDIR": scratch.name})
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                       workspace_root=scratch.name, raise_on_error=True)
            training_pipeline(run_config=run_config_json, version=version)
        finally:
            os.environ.clear()
            os.environ.update(saved)
            scratch.cleanup()
        prune_earlier_runs(settings, earlier)
    finally:
        lock.release()
    return root


def local_run_lock(settings: Settings) -> FileLock:
    """The lock every local run holds from start to prune: flock, released with a killed process (on a
    filesystem without flock filelock falls back to a marker file, which a killed run leaves behind)."""
    settings.kfp_local_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(settings.kfp_local_dir / ".run.lock", timeout=0)


# What a run's own later steps read and nothing after it: its dataset, encodings and models (~1.8 GB a day on the
# default world; the model a version serves is its BentoML registration). Its reports (metrics, HTML, the gate's
# decision: kilobytes) say why it was promoted or refused and are kept.
BULKY_ARTEFACT_TYPES = ("system.Dataset", "system.Model")


def bulky_outputs(pipeline: GraphComponent | None = None) -> set[tuple[str, str]]:
    """(task, output) of every Dataset and Model artefact of the pipeline's tasks (default: the training
    pipeline), those under ``dsl.If`` included: where kfp.local writes them in a run. Read from the pipeline's
    spec, so a step added to the pipeline is covered without being listed here."""
    from google.protobuf.json_format import MessageToDict

    spec = MessageToDict((pipeline or training_pipeline).pipeline_spec)
    components = spec["components"]
    dags = [spec["root"]["dag"], *(component["dag"] for component in components.values() if "dag" in component)]
    return {(task, name)
            for dag in dags for task, body in dag["tasks"].items()
            for name, artifact in components[body["componentRef"]["name"]].get("outputDefinitions", {})
            .get("artifacts", {}).items()
            if artifact["artifactType"]["schemaTitle"].startswith(BULKY_ARTEFACT_TYPES)}


def runs(settings: Settings) -> list[Path]:
    """Every local run's directory: ``artifacts/kfp/<version>/<run>``."""
    return sorted(path for path in settings.kfp_local_dir.glob("*/*") if path.is_dir())


def prune_earlier_runs(settings: Settings, earlier: set[Path]) -> list[Path]:
    """Delete the Dataset and Model artefacts of the given finished runs (a refused candidate's, a rerun day's
    first try, a failed run's), keeping their reports; returns what was deleted. The newest run keeps all of its
    files for a person to inspect. Only under ``local_run_lock``: a run still going would lose its inputs. A file
    that cannot be deleted is logged and left: the training succeeded."""
    pruned, bulky = [], sorted(bulky_outputs())
    for run in sorted(earlier):
        for task, output in bulky:
            path = run / task / output
            if not path.exists():
                continue
            try:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            except OSError as exc:
                log.warning("could not delete %s of a finished training run: %s", path, exc)
                continue
            pruned.append(path)
    if pruned:
        runs_pruned = len({path.parent.parent for path in pruned})
        log.info("deleted the data and model files of %d earlier training run(s)", runs_pruned)
    return pruned


def run_pipeline(settings: Settings, run_config_json: str, version: str) -> dict:
    """Run the training pipeline where the settings say (kfp.local here; a KFP cluster in production)
    and report ``{"version", "promoted", "pipeline_root"}``; a promoted run's export moves the production pointer."""
    from training.gate import pointer_version, read_pointer

    models_dir = settings.artifacts_dir / "models"
    before = read_pointer(models_dir)
    if settings.kfp.mode == "local":
        root = run_locally(settings, run_config_json, version)
    else:  # submit exactly the compiled YAML to the cluster and wait for it
        import kfp

        package = compile_pipeline(settings.kfp_local_dir / "training_pipeline.yaml")
        token = settings.kfp.token.get_secret_value() if settings.kfp.token else None
        client = kfp.Client(host=settings.kfp.host, existing_token=token)
        run = client.create_run_from_pipeline_package(str(package), arguments={"run_config": run_config_json,
                                                                                "version": version})
        client.wait_for_run_completion(run.run_id, timeout=6 * 3600)
        root = Path(settings.kfp.pipeline_root)
    # Promoted by this run: its export rewrote the pointer. A rerun of a promoted day that its gate refused finds
    # production naming the version already (and must not publish the old model again as if it were new).
    after = read_pointer(models_dir)
    promoted = after != before and pointer_version(after) == version
    return {"version": version, "promoted": promoted, "pipeline_root": str(root)}
