"""Training reads point-in-time data from Feast, learns, and beats popularity; metrics are exact."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

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


def test_training_data_is_point_in_time_and_products_exclude_later_listings(tiny_features: Settings) -> None:
    data = load_training_data(tiny_features)
    assert set(data.examples["split"]) == {"train", "validation", "test"}
    listed_later = data.products["title"].isna()
    created = data.products.loc[~listed_later, "event_timestamp"]
    assert (created <= data.products_as_of).all()
    assert data.examples["has_history"].any() and not data.examples["has_history"].all()


def test_model_learns_and_beats_popularity(tiny_features: Settings) -> None:
    data = load_training_data(tiny_features)
    train_rows = data.split("train")
    config = TrainConfig(model=ModelConfig(featurizer=FeaturizerConfig(n_buckets=1 << 15), text_dim=0, graph_dim=0),
                         steps=150, batch_size=128, warmup_steps=50, ramp_steps=50, hard_refresh_steps=50)
    result = train(train_rows, data.products, config, show_progress=False)
    assert np.mean(result.losses[-20:]) < 0.5 * np.mean(result.losses[:20])
    test = data.split("test")
    test = test[test["interaction"] == "purchase"]
    start = dt.datetime.combine(test["ds"].min().date(), dt.time(), tzinfo=dt.UTC)
    products = product_features(tiny_features, start)
    report = evaluate({"unified": model_retriever(result.model, products),
                       "popularity": popularity_retriever(products, train_rows)}, test, products, data.query_class)
    assert report["unified"]["all"]["recall@100"] > 2 * report["popularity"]["all"]["recall@100"], report
