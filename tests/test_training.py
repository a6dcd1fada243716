"""Training reads point-in-time data from Feast, learns, and beats popularity and its no-history ablation;
metrics are exact."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feature_repo.warehouse import read_published
from retrieval_core.settings import Settings
from training.dataset import load_training_data, product_features
from training.evaluate import evaluate, metrics, model_retriever, popularity_retriever
from training.featurizer import FeaturizerConfig
from training.model import ModelConfig
from training.train import TrainConfig, train


def test_metrics_are_exact_on_a_handmade_ranking() -> None:
    ranked = np.array([[5, 1, 2], [9, 8, 7], [3, 4, 5]])
    got = metrics(ranked, np.array([1, 6, 3]), ks=(1, 3))
    assert got["recall@1"] == pytest.approx(1 / 3) and got["recall@3"] == pytest.approx(2 / 3)
    assert got["ndcg@10"] == pytest.approx((1 / np.log2(3) + 0 + 1) / 3)


def test_training_data_is_point_in_time_and_later_listings_carry_their_listing(tiny_features: Settings) -> None:
    """Each product's features are the newest version known at the cut-off, or, for a product listed later, at
    its listing: the catalogue the nightly index serves through the window. Later listings used to be rows of
    nulls (no title, no category), so their purchases in the window could not be retrieved offline."""
    data = load_training_data(tiny_features)
    assert set(data.examples["split"]) == {"train", "validation", "test"}
    assert data.examples["has_history"].any() and not data.examples["has_history"].all()
    profile = read_published(tiny_features, "product_profile").sort_values("event_timestamp")
    first_seen = profile.groupby("product_id")["event_timestamp"].min()
    listed_later = first_seen[first_seen > data.products_as_of].index
    assert len(listed_later) > 0 and (first_seen <= data.products_as_of).any()
    products = data.products.set_index("product_id")
    assert products.index.equals(first_seen.sort_index().index) and products["title"].notna().all()
    # The expected version, found independently of Feast: the last one at or before each product's moment.
    moment = first_seen.clip(lower=pd.Timestamp(data.products_as_of))
    known = profile[profile["event_timestamp"] <= profile["product_id"].map(moment)]
    expected = known.groupby("product_id").last()
    for column in ("title", "category_path", "price", "shop_country"):
        assert (products[column] == expected[column]).all(), column
    changed_after = profile[profile["event_timestamp"] > profile["product_id"].map(moment)]["product_id"].unique()
    assert len(changed_after) > 0  # some listings did change after their moment: the check above can tell


def test_model_learns_and_beats_popularity_and_the_no_history_ablation_on_broad_queries(
        tiny_features: Settings) -> None:
    data = load_training_data(tiny_features)
    train_rows = data.split("train")
    model_config = ModelConfig(featurizer=FeaturizerConfig(n_buckets=1 << 15), text_dim=0, graph_dim=0)
    config = TrainConfig(model=model_config, steps=150, batch_size=128, warmup_steps=50, ramp_steps=50,
                         hard_refresh_steps=50)
    trained = {name: train(train_rows, data.products, config.model_copy(update={"model": mc}), show_progress=False)
               for name, mc in (("unified", model_config),
                                ("no_history", model_config.model_copy(update={"use_history": False})))}
    test = data.split("test")
    test = test[test["interaction"] == "purchase"]
    start = dt.datetime.combine(test["ds"].min().date(), dt.time(), tzinfo=dt.UTC)
    products = product_features(tiny_features, start)
    systems = {name: model_retriever(result.model, products) for name, result in trained.items()}
    systems["popularity"] = popularity_retriever(products, train_rows)
    report = evaluate(systems, test, products, data.query_class)
    assert report["unified"]["all"]["recall@100"] > 2 * report["popularity"]["all"]["recall@100"], report
    # Broad (head) queries by users with a history: where popularity is the natural fallback, and where
    # only the user's history can tell which of the many matching products this user will buy.
    broad = test[test["query"].map(data.query_class).eq("head") & test["has_history"]]
    assert len(broad) >= 50, len(broad)
    on_broad = {name: values["all"] for name, values in evaluate(systems, broad, products, data.query_class).items()}
    assert on_broad["unified"]["recall@100"] > 2 * on_broad["popularity"]["recall@100"], on_broad
    # The tiny world has 2,000 products: its top 10 is the share of the catalogue (0.5%) that the top 100 is
    # in the default world, where the history's gain shows at recall@100 (its top 100 here is 5% of the
    # catalogue and holds most purchases with or without history).
    assert on_broad["unified"]["recall@10"] > on_broad["no_history"]["recall@10"], on_broad


def test_training_run_writes_artefacts_metrics_and_embeddings(tiny_features: Settings,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from feature_repo import store
    from feature_repo.warehouse import read_published
    from training.stages import TrainingRunConfig, run_training
    from training.text_encoder import TextEncoderConfig

    config = TrainingRunConfig(
        train=TrainConfig(model=ModelConfig(featurizer=FeaturizerConfig(n_buckets=1 << 14)), steps=40,
                          distill_warm_start_steps=20, batch_size=64,
                          warmup_steps=10, ramp_steps=10, hard_refresh_steps=20),
        text=TextEncoderConfig(adapt_batch_size=32), adapt_pairs_max=128, graph_dim=16, boost={"trials": 8})
    report = run_training(tiny_features, config, version="test-run")
    for name in ("model/weights.pt", "model/model_config.json", "ablation_history/weights.pt", "metrics.json",
                 "graph.parquet", "text.parquet", "dataset/examples.parquet", "run_config.json", "decision.json",
                 "report.html"):
        assert (report.directory / name).exists(), name
    assert report.promoted  # the first model has no production to beat
    bento = tiny_features.artifacts_dir / "bentoml" / "models" / "unified_retrieval"
    assert list(bento.glob("*/model/weights.pt")) and list(bento.glob("*/boost.json"))
    metrics = json.loads((report.directory / "metrics.json").read_text())
    assert set(metrics) == {"unified", "unified_boosted", "no_history", "popularity", "bm25", "minilm"}
    page = (report.directory / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "unified_boosted" in page
    boost = json.loads((report.directory / "boost.json").read_text())
    assert boost["validation_recall"] >= boost["validation_recall_unboosted"]  # never worse than no boosting
    # narrowed by default (boost.serving_dim), gated on what the narrowing keeps, and exported with the bundle
    assert boost["serving_dim"] == 256 and list(bento.glob("*/projection.npy"))
    checks = json.loads((report.directory / "decision.json").read_text())["checks"]
    assert checks["projection_top_100_kept"] >= 0.9 and "served_recall@100" in checks
    assert {"head", "tail", "with_history", "without_history"} <= set(metrics["unified"])
    assert metrics["bm25"]["all"]["recall@1000"] >= metrics["bm25"]["all"]["recall@100"] > 0
    embeddings = read_published(tiny_features, "product_embeddings")
    written = embeddings[embeddings["embedding_version"].str.startswith("test-run@")]  # keyed by its bundle
    assert len(written) > 1000 and written["text_embedding"].map(len).eq(384).all()
    assert written["graph_embedding"].notna().any()
    feast = store.get_store(tiny_features)
    offline = feast.get_historical_features(
        entity_df=written[["product_id"]].head(3).assign(event_timestamp=pd.Timestamp.now(tz="UTC")),
        features=["product_embeddings:text_embedding"]).to_df()
    assert offline["text_embedding"].map(len).eq(384).all()

    # Production moves last in the export: one that fails (here writing the embeddings) leaves it as it was, on a
    # version that loads, instead of naming one that was never registered or exported, and withdraws its bundle.
    from training import stages
    from training.gate import pointer_record, read_pointer

    models_dir, run = tiny_features.artifacts_dir / "models", report.directory
    before = read_pointer(models_dir)
    assert pointer_record(before)["version"] == "test-run" and "promoted_at" in pointer_record(before)

    def unavailable(*args: object, **kwargs: object) -> None:
        raise OSError("warehouse unavailable")

    monkeypatch.setattr(stages, "publish_product_embeddings", unavailable)
    with pytest.raises(OSError, match="warehouse unavailable"):
        stages.step_export(tiny_features, run / "dataset", run / "graph.parquet", run / "text.parquet", run,
                           "test-run-export-failed", run / "metrics.json", run / "decision.json")
    assert read_pointer(models_dir) == before
    from serving.bundle import registrations

    assert registrations(tiny_features, "test-run-export-failed") == []  # withdrawn: never newest of its version
    monkeypatch.undo()
    # Production changed after the gate compared against it (an operator's rollback while the run exported): the
    # export completes, the version stays a registered candidate, and the rollback stands.
    moved = run / "decision-before-a-rollback.json"
    moved.write_text(json.dumps({**json.loads((run / "decision.json").read_text()),
                                 "production_pointer": json.dumps({"version": "rolled-back-from"})}))
    stages.step_export(tiny_features, run / "dataset", run / "graph.parquet", run / "text.parquet", run,
                       "test-run-superseded", run / "metrics.json", moved)
    assert read_pointer(models_dir) == before


def test_kfp_pipeline_compiles_and_runs_every_component_locally(tiny_features: Settings, tmp_path) -> None:
    import yaml

    from training.pipeline import compile_pipeline, run_locally
    from training.stages import TrainingRunConfig
    from training.text_encoder import TextEncoderConfig

    spec = yaml.safe_load(compile_pipeline(tmp_path / "pipeline.yaml").read_text())
    components = set(spec["deploymentSpec"]["executors"])
    assert components == {f"exec-{c}-op" for c in ("dataset", "graph", "text", "train", "boost", "evaluate", "gate",
                                                           "export")}
    config = TrainingRunConfig(
        train=TrainConfig(model=ModelConfig(featurizer=FeaturizerConfig(n_buckets=1 << 14)), steps=20,
                          distill_warm_start_steps=10, batch_size=32,
                          warmup_steps=5, ramp_steps=5, hard_refresh_steps=10),
        text=TextEncoderConfig(adapt_batch_size=16), adapt_pairs_max=32, graph_dim=8, boost={"trials": 5},
        ablations=("history", "lexical"))
    from training.gate import production_pointer

    in_production = production_pointer(tiny_features.artifacts_dir / "models").exists()
    # an earlier finished run (e.g. yesterday's refused candidate): its data and models go, its reports stay
    earlier = tiny_features.artifacts_dir / "kfp" / "refused-yesterday" / "run-1"
    for produced in ("dataset-op/dataset/examples.parquet", "graph-op/graph", "train-op/models/model/weights.pt",
                     "boost-op/boosted/boost.json", "evaluate-op/metrics", "gate-op/decision"):
        (earlier / produced).parent.mkdir(parents=True, exist_ok=True)
        (earlier / produced).write_text("{}")
    import tempfile

    def leftovers() -> set[Path]:  # kfp.local's per-step `mktemp -d`, never removed by kfp itself
        return {p.parent for p in Path(tempfile.gettempdir()).glob("*/ephemeral_component.py")}

    before = leftovers()
    root = run_locally(tiny_features, config.model_dump_json(), version="kfp-test")
    assert leftovers() == before  # the run's temporary directory went with it
    [run] = list(root.iterdir())
    for produced in ("dataset-op/dataset/examples.parquet", "graph-op/graph", "text-op/text/text.parquet",
                     "train-op/models/model/weights.pt", "evaluate-op/metrics", "evaluate-op/report_html",
                     "gate-op/decision"):
        assert (run / produced).exists(), produced
    assert sorted(str(p.relative_to(earlier)) for p in earlier.rglob("*") if p.is_file()) == [
        "evaluate-op/metrics", "gate-op/decision"]
    import json
    metrics = json.loads((run / "evaluate-op" / "metrics").read_text())
    expected = {"unified", "unified_boosted", "no_history", "no_lexical", "popularity", "bm25", "minilm"}
    assert expected | ({"production"} if in_production else set()) == set(metrics)


def test_every_dataset_and_model_output_is_pruned_including_those_under_a_condition() -> None:
    """What a finished run's prune deletes comes from the pipeline's spec: a step added later, or one that runs
    only under a ``dsl.If`` (like the export), is covered; reports (Metrics, HTML, plain artefacts) are not."""
    from tests.kfp_shapes import shape
    from training.pipeline import bulky_outputs

    assert bulky_outputs(shape) == {("make", "data"), ("fit", "model")}
    assert {("train-op", "models"), ("dataset-op", "dataset"), ("boost-op", "boosted")} <= bulky_outputs()
    assert not {task for task, _ in bulky_outputs()} & {"evaluate-op", "gate-op"}


def test_a_second_local_training_run_is_refused_while_one_holds_the_lock(tmp_path) -> None:
    """A run finishing deletes the data and models of every run it saw: two at once would delete a running one's
    inputs. The second is refused before it starts, with a message, and runs nothing."""
    import threading

    from training.pipeline import TrainingRunInProgress, local_run_lock, run_locally

    settings = Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    refused: list[Exception] = []

    def second_run() -> None:  # another thread: a lock held by this one is not re-entered
        try:
            run_locally(settings, "{}", version="by-hand")
        except TrainingRunInProgress as exc:
            refused.append(exc)

    with local_run_lock(settings):
        thread = threading.Thread(target=second_run)
        thread.start()
        thread.join(timeout=60)
    assert len(refused) == 1 and "another local training run holds" in str(refused[0])
    assert not (settings.kfp_local_dir / "by-hand").exists()


def test_ddp_training_with_two_gloo_processes_learns_and_stays_in_sync(tiny_features: Settings, tmp_path) -> None:
    import json
    import socket
    import subprocess
    import sys

    from training.stages import TrainingRunConfig, step_dataset

    with socket.socket() as free:  # a free loopback port for the rendezvous
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    step_dataset(tiny_features, tmp_path / "dataset")
    # No lexical channel: its IDF start already ranks well, so the loss would start too low to show learning.
    config = TrainingRunConfig(train=TrainConfig(
        model=ModelConfig(featurizer=FeaturizerConfig(n_buckets=1 << 14), lexical_dim=0), steps=60, batch_size=64,
        uniform_negatives=64, warmup_steps=20, ramp_steps=20, hard_refresh_steps=20))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={port}", "-m", "training.ddp", "--dataset", str(tmp_path / "dataset"),
                    "--run-config", config.model_dump_json(), "--out", str(tmp_path / "out")],
                   check=True, timeout=600, capture_output=True)
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # gradients were averaged
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank saw its own batches
    for r in ranks:
        assert np.mean(r["losses"][-10:]) < 0.6 * np.mean(r["losses"][:10])
    assert (tmp_path / "out" / "model" / "weights.pt").exists()
