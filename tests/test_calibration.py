"""Channel calibration: re-fit on held-out rows, it moves the score's weight to the channel that
finds the purchased products, and the model it leaves ranks exactly as the calibration measured."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from training.batching import product_batch, query_batch
from training.calibration import CalibrationConfig, calibrate_channels
from training.featurizer import FeaturizerConfig
from training.model import ModelConfig, UnifiedModel

CONFIG = ModelConfig(featurizer=FeaturizerConfig(n_buckets=1 << 14), text_dim=16, graph_dim=0, dropout=0.0,
                     lexical_dim=128, use_history=False)
WORDS = [f"w{i}" for i in range(600)]


def world(n: int = 300) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Products with distinct two-word titles and a *random* text encoding (a third have none: their
    vectors are normalised over fewer channels, which the calibration must reproduce); each held-out
    row asks for a product by its title's words: the lexical channel finds it, the semantic one is noise."""
    rng = np.random.default_rng(0)
    titles = [f"{WORDS[2 * i]} {WORDS[2 * i + 1]}" for i in range(n)]
    text = [None if i % 3 == 0 else v for i, v in enumerate(rng.normal(size=(n, 16)).astype(np.float32))]
    products = pd.DataFrame({"product_id": np.arange(n) + 1000, "title": titles, "text_embedding": text})
    rows = pd.DataFrame({"query": titles[:200], "product_id": products["product_id"][:200]})
    return products, rows


def recall_at(model: UnifiedModel, products: pd.DataFrame, rows: pd.DataFrame, k: int) -> float:
    with torch.no_grad():
        p = model.product_tower(product_batch(products.to_dict("records"), model.config))
        q = model.query_tower(query_batch(rows.to_dict("records"), model.config))
    top = (q @ p.T).topk(k, dim=1).indices.numpy()
    want = products.reset_index(drop=True).index[products["product_id"].isin(rows["product_id"])].to_numpy()
    return float(np.mean([w in t for w, t in zip(want, top, strict=True)]))


def test_calibration_moves_weight_to_the_channel_that_finds_the_products() -> None:
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG).eval()
    products, rows = world()
    # As if training had trusted the noisy channels: the semantic one (last) dominates.
    model.mix.set_weights(torch.tensor([1.0, 0.1, 1.0]))
    before = recall_at(model, products, rows, k=5)
    result = calibrate_channels(model, rows, products, CalibrationConfig(k=5))
    assert result is not None and result.rows == 200 and result.pool == len(products)
    learned, lexical, semantic = result.weights
    assert lexical > learned and lexical > semantic
    after = recall_at(model, products, rows, k=5)
    assert after > before + 0.3
    # What the calibration measured is what the calibrated model does (ties aside).
    assert abs(after - result.recall) < 0.02
    assert result.recall >= result.recall_as_trained


def test_calibration_keeps_the_trained_mix_when_nothing_beats_it() -> None:
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG).eval()
    products, rows = world()
    model.mix.set_weights(torch.tensor([1e-6, 1.0, 1e-6]))  # lexical only: already perfect here
    trained = model.mix.weights().clone()
    result = calibrate_channels(model, rows, products, CalibrationConfig(k=5))
    assert result is not None and result.recall == result.recall_as_trained == 1.0
    assert torch.allclose(model.mix.weights(), trained)


def test_a_single_channel_model_or_no_usable_row_is_left_alone() -> None:
    products, rows = world()
    single = UnifiedModel(CONFIG.model_copy(update={"lexical_dim": 0, "semantic_channel": False}))
    assert calibrate_channels(single, rows, products) is None
    assert calibrate_channels(UnifiedModel(CONFIG), rows.assign(product_id=-1), products) is None


def test_the_last_channel_can_be_switched_off() -> None:
    """An adversarial semantic channel (last): each product's text encoding is where the distiller puts
    the *previous* product's title, so any share of it ranks the wrong product first."""
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG).eval()
    products, rows = world()
    with torch.no_grad():
        read = model.query_tower.semantic(query_batch(products.rename(columns={"title": "query"})
                                                      .to_dict("records"), CONFIG).terms)
    products["text_embedding"] = list(torch.roll(read, 1, dims=0).numpy())
    model.mix.set_weights(torch.tensor([1.0, 1.0, 1.0]))
    result = calibrate_channels(model, rows, products, CalibrationConfig(k=1, grid=(0.0, 1.0)))
    assert result is not None and result.recall_as_trained < 0.9
    assert result.weights == [0.0, 1.0, 0.0]
    assert abs(recall_at(model, products, rows, k=1) - result.recall) < 0.02


def test_a_catalogue_larger_than_the_pool_is_sampled_with_the_relevant_rows_and_k_scaled() -> None:
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG).eval()
    products, rows = world()
    result = calibrate_channels(model, rows.head(50), products, CalibrationConfig(k=30, pool=100, max_rows=40))
    assert result is not None and result.rows == 40
    assert 100 <= result.pool <= 140 and result.k == round(30 * result.pool / len(products))
