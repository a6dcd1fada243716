"""The training stage as typed functions (the CLI calls them; the KFP components will wrap them).

One run: training data from Feast (point in time) → graph embeddings of the training window's
engagement graph → MiniLM adapted on the training window's (query → engaged product) pairs, products
encoded through the content-hash cache → the unified model and its no-history ablation trained →
evaluation on the test window against popularity, BM25 and MiniLM off the shelf → artefacts under
``artifacts/models/<version>/`` and the product embeddings published to Feast's
``product_embeddings`` view.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import BaseModel, Field

from feature_repo.warehouse import EMBEDDINGS, EMBEDDINGS_SCHEMA, features_dir, postgres, read_published
from retrieval_core.contract import write_atomic
from retrieval_core.settings import Settings
from training.batching import product_text
from training.dataset import load_training_data, product_features
from training.evaluate import bm25_retriever, evaluate, model_retriever, popularity_retriever
from training.graph import graph_embeddings
from training.text_encoder import EmbeddingCache, TextEncoderConfig, adapt, encode, load_minilm
from training.train import TrainConfig, train

ENGAGED = ("add_to_cart", "purchase")


class TrainingRunConfig(BaseModel):
    train: TrainConfig = Field(default_factory=TrainConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    use_text: bool = True
    graph_dim: int = 64
    adapt_pairs_max: int = Field(20_000, ge=0, description="pre-training pairs drawn from the training window")


@dataclass
class TrainingRunReport:
    version: str
    directory: Path
    metrics: dict
    examples_per_s: float
    train_seconds: float


def _vectors_column(matrix: np.ndarray) -> list[list[float] | None]:
    return [None if np.isnan(row).any() else row.tolist() for row in matrix]


def minilm_retriever(model: torch.nn.Module, product_vectors: np.ndarray, config: TextEncoderConfig):  # noqa: ANN201
    """Queries and products encoded by the same (off-the-shelf) MiniLM, scored by cosine."""
    def retrieve(rows: pd.DataFrame, k: int) -> np.ndarray:
        q = encode(model, rows["query"].astype(str).tolist(), config)
        scores = torch.from_numpy(q) @ torch.from_numpy(product_vectors).T
        return scores.topk(min(k, len(product_vectors)), dim=1).indices.numpy()

    return retrieve


def run_training(settings: Settings, config: TrainingRunConfig, version: str | None = None) -> TrainingRunReport:
    data = load_training_data(settings)
    train_rows, test = data.split("train"), data.split("test")
    test = test[test["interaction"] == "purchase"]
    test_start = dt.datetime.combine(pd.Timestamp(test["ds"].min()).date(), dt.time(), tzinfo=dt.UTC)
    eval_products = product_features(settings, test_start)
    version = version or f"{data.products_as_of:%Y%m%d}-{uuid.uuid4().hex[:6]}"
    out = settings.artifacts_dir / "models" / version
    out.mkdir(parents=True, exist_ok=True)

    edges = read_published(settings, "query_product_edges")
    edges = edges[pd.to_datetime(edges["ds"]).dt.date < data.products_as_of.date()]
    graph = graph_embeddings(edges, dim=config.graph_dim)
    for frame in (data.products, eval_products):
        frame["graph_embedding"] = _vectors_column(graph.for_products(frame["product_id"].to_numpy()))

    systems = {"popularity": popularity_retriever(eval_products, train_rows), "bm25": bm25_retriever(eval_products)}
    model_config = config.train.model.model_copy(update={"graph_dim": config.graph_dim,
                                                         "text_dim": 384 if config.use_text else 0})
    if config.use_text:
        texts = [product_text(r) for r in eval_products.to_dict("records")]
        base = load_minilm(config.text)
        base_cache = EmbeddingCache(settings.artifacts_dir / "encoder_cache" / "minilm-base.parquet", "minilm-base")
        base_vectors, _ = base_cache.encode(texts, lambda t: encode(base, t, config.text))
        systems["minilm"] = minilm_retriever(base, base_vectors, config.text)
        engaged = train_rows[train_rows["interaction"].isin(ENGAGED)]
        by_id = dict(zip(eval_products["product_id"], texts, strict=True))
        pairs = [(q, by_id[p]) for q, p in zip(engaged["query"], engaged["product_id"], strict=True) if p in by_id]
        pairs = pairs[: config.adapt_pairs_max]
        adapted = load_minilm(config.text)
        adapt(adapted, pairs, config.text)
        cache = EmbeddingCache(settings.artifacts_dir / "encoder_cache" / f"minilm-{version}.parquet", version)
        vectors, _ = cache.encode(texts, lambda t: encode(adapted, t, config.text))
        text_of = dict(zip(eval_products["product_id"], vectors.tolist(), strict=True))
        for frame in (data.products, eval_products):
            frame["text_embedding"] = frame["product_id"].map(text_of)

    train_config = config.train.model_copy(update={"model": model_config})
    result = train(train_rows, data.products, train_config, show_progress=False)
    ablation = train(train_rows, data.products,
                     train_config.model_copy(update={"model": model_config.model_copy(update={"use_history": False})}),
                     show_progress=False)
    systems = {"unified": model_retriever(result.model, eval_products),
               "no_history": model_retriever(ablation.model, eval_products), **systems}
    metrics = evaluate(systems, test, eval_products, data.query_class)

    torch.save(result.model.state_dict(), out / "query_and_product_towers.pt")
    (out / "config.json").write_text(json.dumps({"version": version, "model": model_config.model_dump(),
                                                 "train": config.train.model_dump(),
                                                 "products_as_of": data.products_as_of.isoformat()}, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    publish_product_embeddings(settings, eval_products, version)
    return TrainingRunReport(version=version, directory=out, metrics=metrics,
                             examples_per_s=result.examples_per_s, train_seconds=result.seconds)


def publish_product_embeddings(settings: Settings, products: pd.DataFrame, version: str) -> int:
    """Write the run's text and graph embeddings as the ``product_embeddings`` source (one version)."""
    now = pd.Timestamp(dt.datetime.now(dt.UTC))
    def column(name: str) -> list:  # noqa: E306
        return products[name].tolist() if name in products else [None] * len(products)

    table = pa.table({"product_id": products["product_id"].astype("int64"),
                      "event_timestamp": pa.array([now] * len(products), pa.timestamp("us", "UTC")),
                      "text_embedding": pa.array(column("text_embedding"), pa.list_(pa.float32())),
                      "graph_embedding": pa.array(column("graph_embedding"), pa.list_(pa.float32())),
                      "embedding_version": [version] * len(products)}, schema=EMBEDDINGS_SCHEMA)
    if settings.offline_store == "duckdb":
        write_atomic(table, features_dir(settings) / EMBEDDINGS / f"version={version}" / "part-0.parquet")
        return table.num_rows
    with postgres(settings) as conn:
        conn.execute(f"delete from uer_features.{EMBEDDINGS} where embedding_version = %s", (version,))
        with conn.cursor().copy(f"copy uer_features.{EMBEDDINGS} from stdin") as copy:
            for row in table.to_pylist():
                copy.write_row(list(row.values()))
        conn.commit()
    return table.num_rows
