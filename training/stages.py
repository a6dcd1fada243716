"""The training run as typed steps on files. ``run_training`` calls them in one process; the KFP
pipeline (``training/pipeline.py``) runs each as a component with the same files as artefacts.

dataset (Feast, point in time) → graph embeddings (training-window engagement graph) → text
encodings (MiniLM adapted on the training window's query→product pairs, cached by content hash) →
train (unified model + no-history ablation) → evaluate (test window, vs popularity, BM25, MiniLM) →
gate (not worse than production, sane embeddings, ANN recall) → export (bundle registered, product embeddings to
Feast, then the production pointer moved), only when the gate promotes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import BaseModel, Field

from feature_repo.warehouse import EMBEDDINGS, EMBEDDINGS_SCHEMA, read_published, write_version
from retrieval_core.settings import Settings
from training.batching import product_batch, product_text, query_batch
from training.boosting import (
    BOOST_FEATURES,
    PROJECTION_FILE,
    BoostConfig,
    augment,
    fit_boost_weights,
    fit_projection,
    project_queries,
    quality_vectors,
    top_k_kept,
)
from training.calibration import CalibrationConfig, calibrate_channels
from training.dataset import load_training_data, product_features, validation_purchases
from training.evaluate import Retriever, bm25_retriever, evaluate, model_retriever, popularity_retriever
from training.export import register_model
from training.gate import (
    Decision,
    GateConfig,
    decide,
    pointer_metrics,
    pointer_version,
    promote,
    read_pointer,
    without_stale_production,
    write_decision,
)
from training.graph import graph_embeddings
from training.model import ModelConfig, UnifiedModel
from training.report import write_report
from training.text_encoder import (
    EmbeddingCache,
    TextEncoderConfig,
    adapt,
    encode,
    load_minilm,
    save_adapted,
    title_spans,
    version_cache,
)
from training.train import TrainConfig, encode_products, train

ENGAGED = ("add_to_cart", "purchase")
SCORED_POINTER = "production_pointer"  # beside metrics.json: the production pointer its production row scored


class TrainingRunConfig(BaseModel):
    train: TrainConfig = Field(default_factory=TrainConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    use_text: bool = True
    graph_dim: int = 64
    adapt_pairs_max: int = Field(20_000, ge=0, description="pre-training pairs drawn from the training window")
    distill_texts_max: int = Field(20_000, ge=0, description="query-like texts (the training queries, then title "
                                   "spans) the text step encodes for the semantic distiller; 0: titles only")
    distill_spans_per_product: int = Field(1, ge=0, description="title spans per product among those texts")
    distill_span_words: tuple[int, int] = (1, 4)
    boost: BoostConfig = Field(default_factory=BoostConfig)
    calibrate: bool = Field(True, description="re-fit the channel weights on the validation window's purchases "
                            "after training (training.calibration)")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    ablations: tuple[Literal["history", "text", "graph", "lexical", "semantic"], ...] = Field(
        ("history",), description="components removed one at a time: each is one more model trained and "
        "evaluated as no_<component> (the ablation table); the default keeps the nightly run to one extra model")

    def model_config_(self) -> ModelConfig:
        return self.train.model.model_copy(update={"graph_dim": self.graph_dim,
                                                   "text_dim": 384 if self.use_text else 0})

    def ablated(self, component: str) -> ModelConfig:
        """The model config without ``component``."""
        off = {"history": {"use_history": False}, "text": {"text_dim": 0}, "graph": {"graph_dim": 0},
               "lexical": {"lexical_dim": 0}, "semantic": {"semantic_channel": False}}[component]
        return self.model_config_().model_copy(update=off)


@dataclass
class TrainingRunReport:
    version: str
    directory: Path
    metrics: dict
    promoted: bool
    examples_per_s: float
    train_seconds: float


# --------------------------------------------------------------------------------------------------
# Steps: each reads and writes files only (the artefacts of the KFP components)
# --------------------------------------------------------------------------------------------------


def step_dataset(settings: Settings, out: Path) -> dict:
    """examples.parquet, train_products.parquet (as of training end), eval_products.parquet (as of the
    test window's start; later listings as of their listing: ``product_features``), edges.parquet (training
    window) and meta.json."""
    out.mkdir(parents=True, exist_ok=True)
    data = load_training_data(settings)
    test = data.split("test")
    test_start = dt.datetime.combine(pd.Timestamp(test["ds"].min()).date(), dt.time(), tzinfo=dt.UTC)
    data.examples.to_parquet(out / "examples.parquet")
    data.products.to_parquet(out / "train_products.parquet")
    product_features(settings, test_start).to_parquet(out / "eval_products.parquet")
    edges = read_published(settings, "query_product_edges")
    edges[pd.to_datetime(edges["ds"]).dt.date < data.products_as_of.date()].to_parquet(out / "edges.parquet")
    meta = {"products_as_of": data.products_as_of.isoformat(), "test_start": test_start.isoformat(),
            "query_class": data.query_class, "examples": len(data.examples)}
    (out / "meta.json").write_text(json.dumps(meta))
    return meta


def step_graph(dataset: Path, dim: int, out: Path) -> int:
    """graph.parquet: product_id → graph_embedding for every product with engagement in the window."""
    graph = graph_embeddings(pd.read_parquet(dataset / "edges.parquet"), dim=dim)
    pd.DataFrame({"product_id": graph.product_ids, "graph_embedding": list(graph.products)}).to_parquet(out)
    return len(graph.product_ids)


DISTILL_TEXTS = "distill_texts.parquet"  # beside text.parquet: query-like texts and their encodings


def distillation_texts(dataset: Path, config: TrainingRunConfig) -> list[str]:
    """The query-like texts the semantic distiller learns from besides titles: the distinct queries of
    the training split (in a seeded random order), then spans of the catalogue's titles, at most
    ``distill_texts_max`` in all."""
    if not config.distill_texts_max:
        return []
    examples = pd.read_parquet(dataset / "examples.parquet", columns=["query", "split"])
    queries = examples.loc[examples["split"] == "train", "query"].astype(str).str.strip().str.lower().unique()
    texts = [str(q) for q in np.random.default_rng(config.text.seed).permutation(queries)]
    titles = pd.read_parquet(dataset / "eval_products.parquet", columns=["title"])["title"].fillna("").astype(str)
    spans = title_spans(titles.tolist(), config.distill_spans_per_product, config.distill_span_words,
                        config.text.seed)
    seen = set(texts)
    texts += [t for t in dict.fromkeys(s for _, s in spans) if t not in seen]
    return texts[: config.distill_texts_max]


def step_text(dataset: Path, config: TrainingRunConfig, cache_dir: Path, version: str, out: Path) -> int:
    """text.parquet: product_id → adapted MiniLM encoding, minilm_base.parquet (off the shelf), and
    distill_texts.parquet: query-like texts (``distillation_texts``) → adapted MiniLM encoding."""
    products = pd.read_parquet(dataset / "eval_products.parquet")
    texts = [product_text(r) for r in products.to_dict("records")]
    base = load_minilm(config.text)
    base_key = f"minilm-base-{config.text.max_seq_length}"  # encodings differ by sequence length
    base_vectors, _ = EmbeddingCache(cache_dir / f"{base_key}.parquet", base_key).encode(
        texts, lambda t: encode(base, t, config.text))
    examples = pd.read_parquet(dataset / "examples.parquet")
    engaged = examples[(examples["split"] == "train") & examples["interaction"].isin(ENGAGED)]
    by_id = dict(zip(products["product_id"], texts, strict=True))
    pairs = [(q, by_id[p]) for q, p in zip(engaged["query"], engaged["product_id"], strict=True) if p in by_id]
    adapted = load_minilm(config.text)
    adapt(adapted, pairs[: config.adapt_pairs_max], config.text)
    # Kept with the model version: the nightly index refresh encodes new products with it.
    fingerprint = save_adapted(adapted, out.with_name("text_encoder"))
    vectors, _ = version_cache(cache_dir, version, fingerprint).encode(texts, lambda t: encode(adapted, t, config.text))
    ids = products["product_id"].to_numpy()
    pd.DataFrame({"product_id": ids, "text_embedding": list(vectors)}).to_parquet(out)
    # Not cached: the adapted encoder is new every day, so are its encodings.
    write_distillation_texts(distillation_texts(dataset, config), lambda t: encode(adapted, t, config.text),
                             out.with_name(DISTILL_TEXTS))
    base_frame = pd.DataFrame({"product_id": ids, "text_embedding": list(base_vectors)})
    base_frame.to_parquet(out.with_name("minilm_base.parquet"))
    return len(ids)


def write_distillation_texts(texts: list[str], encode_fn: Callable[[list[str]], np.ndarray], out: Path) -> int:
    """distill_texts.parquet: text → the product side's transformer encoding of it (the teacher)."""
    vectors = list(encode_fn(texts)) if texts else []
    pd.DataFrame({"text": texts, "text_embedding": vectors}).to_parquet(out)
    return len(texts)


def read_distillation_texts(text: Path | None) -> pd.DataFrame | None:
    """The query-like distillation texts written beside ``text`` (None: titles only, as before)."""
    path = None if text is None else text.with_name(DISTILL_TEXTS)
    return pd.read_parquet(path) if path is not None and path.exists() else None


def _with_encodings(products: pd.DataFrame, graph: Path | None, text: Path | None) -> pd.DataFrame:
    out = products.drop(columns=["text_embedding", "graph_embedding"], errors="ignore")
    for path in (graph, text):
        if path is not None and path.exists():
            out = out.merge(pd.read_parquet(path), on="product_id", how="left")
    return out


def step_train(dataset: Path, graph: Path, text: Path | None, config: TrainingRunConfig, out: Path) -> dict:
    """model/ and one ablation_<component>/ per ablation: weights + model config; returns throughput figures."""
    examples = pd.read_parquet(dataset / "examples.parquet")
    products = _with_encodings(pd.read_parquet(dataset / "train_products.parquet"), graph, text)
    figures = {}
    models = [("model", config.model_config_())]
    models += [(f"ablation_{component}", config.ablated(component)) for component in config.ablations]
    validation = validation_purchases(examples)
    for name, mc in models:
        result = train(examples[examples["split"] == "train"], products,
                       config.train.model_copy(update={"model": mc}), show_progress=False,
                       distill_texts=read_distillation_texts(text))
        calibration = calibrate_channels(result.model, validation, products, config.calibration) \
            if config.calibrate else None
        save_model(result.model, out / name)
        figures[name] = {"examples_per_s": result.examples_per_s, "seconds": result.seconds,
                         "final_loss": float(np.mean(result.losses[-20:])),
                         "channel_calibration": calibration.as_dict() if calibration is not None else None}
    return figures


def save_model(model: UnifiedModel, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "weights.pt")
    (directory / "model_config.json").write_text(model.config.model_dump_json(indent=2))


def load_model(directory: Path) -> UnifiedModel:
    saved = json.loads((directory / "model_config.json").read_text())
    # Versions saved before the history expansion existed have no such key: they were trained without it,
    # and yesterday's production model must still load (serving, the evaluation's production row).
    saved.setdefault("history_expansion", 0.0)
    saved.setdefault("featurizer", {}).setdefault("unicode_folding", False)  # likewise: read text unfolded
    model = UnifiedModel(ModelConfig.model_validate(saved))
    model.load_state_dict(torch.load(directory / "weights.pt", weights_only=True))
    return model.eval()


def _product_vectors(model: UnifiedModel, products: pd.DataFrame) -> np.ndarray:
    return encode_products(model, product_batch(products.to_dict("records"), model.config)).numpy()


def _query_vectors(model: UnifiedModel, rows: pd.DataFrame, batch_size: int = 512) -> np.ndarray:
    if rows.empty:
        return np.zeros((0, model.config.embedding_dim), dtype=np.float32)
    with torch.no_grad():
        return torch.cat([model.query_tower(query_batch(rows.iloc[i:i + batch_size].to_dict("records"), model.config))
                          for i in range(0, len(rows), batch_size)]).numpy()


def step_boost(dataset: Path, graph: Path, text: Path | None, models: Path, config: TrainingRunConfig,
               out: Path) -> dict:
    """boost.json: quality-feature weights fit by optuna on the validation window's purchases, on the
    vectors the index will serve; with ``boost.serving_dim``, first the projection to that width
    (projection.npy beside boost.json), fitted on the training catalogue."""
    examples = pd.read_parquet(dataset / "examples.parquet")
    products = _with_encodings(pd.read_parquet(dataset / "train_products.parquet"), graph, text)
    rows = validation_purchases(examples)
    row_of = pd.Series(np.arange(len(products)), index=products["product_id"].to_numpy())
    rows = rows[rows["product_id"].isin(row_of.index)]
    model = load_model(models / "model")
    p, q = _product_vectors(model, products), _query_vectors(model, rows)
    narrowing: dict[str, object] = {"serving_dim": 0}
    if 0 < config.boost.serving_dim < p.shape[1]:
        projection = fit_projection(p, config.boost.serving_dim, config.boost.seed)
        np.save(out.with_name(PROJECTION_FILE), projection)
        narrowing = {"serving_dim": config.boost.serving_dim,
                     "validation_top_100_kept": top_k_kept(q, p, projection, config.boost.k)}
        p, q = p @ projection, project_queries(q, projection)
    weights, boosted, plain = fit_boost_weights(q, p, quality_vectors(products),
                                                row_of[rows["product_id"]].to_numpy(), config.boost)
    result = {"features": list(BOOST_FEATURES), "weights": weights.tolist(), "validation_recall": boosted,
              "validation_recall_unboosted": plain, "validation_purchases": int(len(rows)), **narrowing}
    out.write_text(json.dumps(result, indent=2))
    return result


def load_projection(models: Path) -> np.ndarray | None:
    """The run's serving projection (``boost.serving_dim``), if it has one."""
    path = models / PROJECTION_FILE
    return np.load(path).astype(np.float32) if path.exists() else None


def boosted_retriever(model: UnifiedModel, products: pd.DataFrame, weights: np.ndarray,
                      projection: np.ndarray | None = None) -> Retriever:
    """The unified model as the ANN index will serve it: narrowed (if the run has a projection), with the
    boosting vectors appended."""
    p, quality = _product_vectors(model, products), quality_vectors(products)

    def retrieve(rows: pd.DataFrame, k: int) -> np.ndarray:
        p_aug, q_aug = augment(p, quality, _query_vectors(model, rows), weights, projection)
        return torch.from_numpy(q_aug @ p_aug.T).topk(min(k, len(p_aug)), dim=1).indices.numpy()

    return retrieve


def minilm_retriever(model: torch.nn.Module, product_vectors: np.ndarray, config: TextEncoderConfig) -> Retriever:
    """Queries and products encoded by the same (off-the-shelf) MiniLM, scored by cosine."""
    def retrieve(rows: pd.DataFrame, k: int) -> np.ndarray:
        q = encode(model, rows["query"].astype(str).tolist(), config)
        scores = torch.from_numpy(q) @ torch.from_numpy(product_vectors).T
        return scores.topk(min(k, len(product_vectors)), dim=1).indices.numpy()

    return retrieve


def production_retriever(settings: Settings, dataset: Path, pointer: bytes | None = None) -> Retriever | None:
    """The model serving now (``pointer``: production as already read, ``training.gate.read_pointer``; the
    registration it names), as it serves (its own text encoder and graph, boosting appended), on this run's
    evaluation catalogue. None before the first promotion, and None
    (with a warning) when the production bundle no longer loads with this code — after an architecture change the
    new model must still be evaluated and gated, not fail on yesterday's weights — or its product embeddings are
    gone from the warehouse (``EncodingsMissing``)."""
    from serving.bundle import ModelBundle, ModelNotFound
    from serving.refresh import EncodingsMissing, registration_named, with_version_encodings

    if (named := registration_named(settings, pointer or read_pointer(settings.artifacts_dir / "models"))) is None:
        return None
    version, bundle_id = named
    try:
        bundle = ModelBundle.load(settings, version, bundle_id)
    except (ModelNotFound, RuntimeError, ValueError, KeyError) as exc:
        logging.getLogger(__name__).warning("production model %s not evaluated: it does not load (%s)", version, exc)
        return None
    try:
        products, _, _ = with_version_encodings(settings, bundle, pd.read_parquet(dataset / "eval_products.parquet"))
    except EncodingsMissing as exc:
        logging.getLogger(__name__).warning("production model %s not evaluated: %s", version, exc)
        return None
    p = bundle.product_vectors(products)

    def retrieve(rows: pd.DataFrame, k: int) -> np.ndarray:
        q = bundle.query_vectors(rows.to_dict("records"))
        return torch.from_numpy(q @ p.T).topk(min(k, len(p)), dim=1).indices.numpy()

    return retrieve


def step_evaluate(dataset: Path, graph: Path, text: Path | None, models: Path, config: TrainingRunConfig,
                  out: Path, settings: Settings | None = None, scored_pointer: Path | None = None) -> dict:
    """metrics.json: every system on the test window's purchases, overall and by slice; with
    ``settings``, the production model too (as ``production``), and the production pointer it scored in
    ``scored_pointer`` (default: ``SCORED_POINTER`` beside ``out``; empty when nothing is in production)."""
    examples = pd.read_parquet(dataset / "examples.parquet")
    meta = json.loads((dataset / "meta.json").read_text())
    train_rows = examples[examples["split"] == "train"]
    test = examples[(examples["split"] == "test") & (examples["interaction"] == "purchase")]
    products = _with_encodings(pd.read_parquet(dataset / "eval_products.parquet"), graph, text)
    model = load_model(models / "model")
    systems = {"unified": model_retriever(model, products),
               "popularity": popularity_retriever(products, train_rows), "bm25": bm25_retriever(products)}
    for ablation in sorted(models.glob("ablation_*")):
        systems["no_" + ablation.name.removeprefix("ablation_")] = model_retriever(load_model(ablation), products)
    boost = models / "boost.json"
    if boost.exists():
        weights = np.array(json.loads(boost.read_text())["weights"], dtype=np.float32)
        systems["unified_boosted"] = boosted_retriever(model, products, weights, load_projection(models))
    base = text.with_name("minilm_base.parquet") if text is not None else None
    if base is not None and base.exists():
        vectors = np.stack(pd.read_parquet(base)["text_embedding"].to_numpy()).astype(np.float32)
        systems["minilm"] = minilm_retriever(load_minilm(config.text), vectors, config.text)
    # The pointer read once, and the model it names scored: the gate uses that row only if production is unchanged.
    scored = read_pointer(settings.artifacts_dir / "models") if settings is not None else None
    if scored is not None and (production := production_retriever(settings, dataset, scored)):
        systems["production"] = production
    (scored_pointer or out.with_name(SCORED_POINTER)).write_bytes(scored or b"")
    metrics = evaluate(systems, test, products, meta["query_class"])
    out.write_text(json.dumps(metrics, indent=2))
    write_report(metrics, out.with_name("report.html"), "Unified retrieval: evaluation on the test window",
                 {"test_purchases": int(len(test)), "products": int(len(products)), **{
                     k: meta[k] for k in ("products_as_of", "test_start")}})
    return metrics


def step_gate(dataset: Path, graph: Path, text: Path | None, models: Path, metrics: Path, models_dir: Path,
              version: str, out: Path, gate: GateConfig | None = None, scored_pointer: Path | None = None) -> Decision:
    """Decide whether this run replaces production (decision.json). The pointer moves in ``step_export``, once the
    model is registered: production must never name a version that cannot be loaded."""
    gate = gate or GateConfig()
    model = load_model(models / "model")
    products = _with_encodings(pd.read_parquet(dataset / "eval_products.parquet"), graph, text)
    examples = pd.read_parquet(dataset / "examples.parquet")
    test = examples[examples["split"] == "test"].head(gate.ann_queries)
    compared_with = read_pointer(models_dir)  # read once: the export promotes only if it still holds
    scored = scored_pointer or metrics.with_name(SCORED_POINTER)  # what the evaluate step wrote
    scores = without_stale_production(json.loads(metrics.read_text()),
                                      scored.read_bytes() if scored.exists() else None, compared_with)
    decision = decide(scores, pointer_metrics(compared_with),
                      _product_vectors(model, products), _query_vectors(model, test), gate,
                      projection=load_projection(models))
    decision.production_pointer = None if compared_with is None else compared_with.decode()
    write_decision(decision, out)
    return decision


def step_export(settings: Settings, dataset: Path, graph: Path, text: Path | None, models: Path,
                version: str, metrics: Path, decision: Path) -> str:
    """For a run its gate promoted: register the model bundle in the BentoML model store, publish the run's product
    embeddings (text, graph) to Feast's product_embeddings source, then point production at the version. Production
    moves last, so a failure before leaves it where it was; the registration comes first, so from then on the
    version is a live candidate and a concurrent prune (``serving.retention``) keeps its embeddings. If production
    changed since the gate compared against it (``decision``; an operator's rollback meanwhile), the version stays a
    registered candidate and production is left alone. Returns the BentoML tag."""
    from serving.bundle import delete_registration, registered_bundle_id, registrations

    tag = register_model(settings, version, models, text.with_name("text_encoder") if text is not None else None)
    try:
        products = _with_encodings(pd.read_parquet(dataset / "eval_products.parquet")[["product_id"]], graph, text)
        bundle_id = registered_bundle_id(settings, version, tag)
        publish_product_embeddings(settings, products, bundle_id)
    except BaseException:
        # Withdrawn: readers take a version's newest registration (the evaluation's production row, a rerun's
        # awaiting_publication), and a day retrained under its name would leave this unexported one newest.
        for registration in registrations(settings, version):
            if registration.tag == tag:
                delete_registration(settings, registration)
        raise
    models_dir = settings.artifacts_dir / "models"
    compared_with = json.loads(decision.read_text()).get("production_pointer")
    now = read_pointer(models_dir)
    if (None if now is None else now.decode()) != compared_with:
        logging.getLogger(__name__).warning(
            "not promoting %s: production changed since its gate compared against it (now %s); it stays a registered "
            "candidate, and the next run is gated against what serves now", version, pointer_version(now))
        return tag
    # the time makes a day's repeated promotion a new pointer (``training.pipeline.run_pipeline`` compares them)
    promote(models_dir, version, metrics, {"promoted_at": dt.datetime.now(dt.UTC).isoformat(), "bundle_id": bundle_id})
    return tag


def publish_product_embeddings(settings: Settings, products: pd.DataFrame, bundle_id: str) -> int:
    """Write text and graph embeddings as the ``product_embeddings`` source of one model bundle (a registration,
    ``serving.bundle.bundle_id_of``: a day retrained under its version name trains another graph, and the first
    registration, a rollback target, must keep reading its own)."""
    now = pd.Timestamp(dt.datetime.now(dt.UTC))

    def column(name: str) -> list:
        if name not in products:
            return [None] * len(products)
        return [None if v is None or isinstance(v, float) else list(v) for v in products[name]]

    table = pa.table({"product_id": products["product_id"].astype("int64"),
                      "event_timestamp": pa.array([now] * len(products), pa.timestamp("us", "UTC")),
                      "text_embedding": pa.array(column("text_embedding"), pa.list_(pa.float32())),
                      "graph_embedding": pa.array(column("graph_embedding"), pa.list_(pa.float32())),
                      "embedding_version": [bundle_id] * len(products)}, schema=EMBEDDINGS_SCHEMA)
    return write_version(settings, EMBEDDINGS, table, bundle_id)


# --------------------------------------------------------------------------------------------------
# One process, every step
# --------------------------------------------------------------------------------------------------


def run_training(settings: Settings, config: TrainingRunConfig, version: str | None = None) -> TrainingRunReport:
    version = version or f"{dt.datetime.now(dt.UTC):%Y%m%d%H%M}-{uuid.uuid4().hex[:6]}"
    out = settings.artifacts_dir / "models" / version
    dataset = out / "dataset"
    step_dataset(settings, dataset)
    step_graph(dataset, config.graph_dim, out / "graph.parquet")
    text = out / "text.parquet" if config.use_text else None
    if text is not None:
        step_text(dataset, config, settings.artifacts_dir / "encoder_cache", version, text)
    figures = step_train(dataset, out / "graph.parquet", text, config, out)
    step_boost(dataset, out / "graph.parquet", text, out, config, out / "boost.json")
    metrics = step_evaluate(dataset, out / "graph.parquet", text, out, config, out / "metrics.json", settings)
    decision = step_gate(dataset, out / "graph.parquet", text, out, out / "metrics.json", out.parent, version,
                         out / "decision.json")
    if decision.promote:
        step_export(settings, dataset, out / "graph.parquet", text, out, version, out / "metrics.json",
                    out / "decision.json")
    (out / "run_config.json").write_text(config.model_dump_json(indent=2))
    return TrainingRunReport(version=version, directory=out, metrics=metrics, promoted=decision.promote,
                             examples_per_s=figures["model"]["examples_per_s"],
                             train_seconds=figures["model"]["seconds"])
