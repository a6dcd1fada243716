"""Shapes and invariants of the two towers: unit vectors, signed-out users, history matters."""

from __future__ import annotations

import pytest
import torch

from training.batching import product_batch, query_batch
from training.featurizer import FeaturizerConfig
from training.model import ModelConfig, UnifiedModel

CONFIG = ModelConfig(featurizer=FeaturizerConfig(n_buckets=1 << 14), text_dim=8, graph_dim=4, dropout=0.0)
SIGNED_IN = {"query": "necklace", "country": "US", "recent_queries": ["boho necklace", "pearl earrings"],
             "recent_shops": [12, 40], "recent_click_terms": ["boho", "pearl"], "purchased_tags": ["boho"]}
SIGNED_OUT = {"query": "necklace"}
PRODUCT = {"title": "Boho Pearl Necklace", "tags": ["necklace", "boho"], "category_path": "jewelry > necklaces",
           "shop_country": "US", "ctr_bucket": 3, "price_bucket": None, "text_embedding": [0.1] * 8}


def test_towers_return_unit_vectors_for_signed_in_and_signed_out_users() -> None:
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG).eval()
    with torch.no_grad():
        q = model.query_tower(query_batch([SIGNED_IN, SIGNED_OUT], CONFIG))
        p = model.product_tower(product_batch([PRODUCT, {"title": "mug"}], CONFIG))
    assert q.shape == (2, CONFIG.embedding_dim) and p.shape == (2, CONFIG.embedding_dim)
    assert torch.allclose(q.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(p.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.isfinite(q).all() and torch.isfinite(p).all()


def test_history_changes_the_query_vector_and_the_ablation_ignores_it() -> None:
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG).eval()
    with torch.no_grad():
        q = model.query_tower(query_batch([SIGNED_IN, SIGNED_OUT], CONFIG))
    assert not torch.allclose(q[0], q[1])
    no_history = CONFIG.model_copy(update={"use_history": False})
    torch.manual_seed(0)
    ablated = UnifiedModel(no_history).eval()
    with torch.no_grad():
        q = ablated.query_tower(query_batch([{**SIGNED_IN, "country": None}, SIGNED_OUT], no_history))
    assert torch.allclose(q[0], q[1])


def test_a_batch_gives_the_same_vectors_as_rows_one_by_one() -> None:
    """Padding and scatter in the history transformer must not leak between rows."""
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG).eval()
    with torch.no_grad():
        together = model.query_tower(query_batch([SIGNED_IN, SIGNED_OUT], CONFIG))
        alone = torch.cat([model.query_tower(query_batch([r], CONFIG)) for r in (SIGNED_IN, SIGNED_OUT)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_products_without_graph_embedding_use_the_learned_fallback() -> None:
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG).eval()
    with torch.no_grad():
        model.product_tower.graph_fallback.fill_(0.5)
        rows = [{**PRODUCT, "graph_embedding": [0.5] * 4}, {**PRODUCT, "graph_embedding": None},
                {**PRODUCT, "graph_embedding": [float("nan")] * 4}, {**PRODUCT, "graph_embedding": [0.0] * 4}]
        p = model.product_tower(product_batch(rows, CONFIG))
    assert torch.allclose(p[0], p[1]) and torch.allclose(p[1], p[2])  # missing = fallback = [0.5]*4
    assert not torch.allclose(p[0], p[3])


def test_lexical_weights_start_at_idf_so_a_shared_rare_word_outscores_a_shared_common_one() -> None:
    torch.manual_seed(0)
    model = UnifiedModel(CONFIG).eval()
    titles = [f"{colour} ceramic mug" for colour in ("red", "blue", "green", "black", "white", "teal")]
    titles.append("zanzibar lamp")
    catalogue = product_batch([{"title": t} for t in titles], CONFIG)
    model.lexical.init_idf(catalogue.terms)
    weight = lambda word: float(torch.nn.functional.softplus(  # noqa: E731
        model.lexical.weights(product_batch([{"title": word}], CONFIG).terms[:, :1]))[0, 0, 0])
    assert weight("zanzibar") > 2 * weight("mug")  # in 1 of 7 titles vs all but one


def test_distillation_warm_start_brings_the_query_side_towards_the_text_encodings() -> None:
    from training.train import TrainConfig, warm_start_distillation

    torch.manual_seed(0)
    model = UnifiedModel(CONFIG)
    rows = [{"title": f"item {i} {w}", "text_embedding": torch.randn(8).tolist()}
            for i, w in enumerate(["mug", "lamp", "rug", "vase"] * 8)]
    catalogue = product_batch(rows, CONFIG)
    losses = warm_start_distillation(model, catalogue, TrainConfig(model=CONFIG, distill_warm_start_steps=60,
                                                                   distill_batch_size=32))
    assert len(losses) == 60 and losses[-1] < 0.5 * losses[0]


def test_history_expansion_moves_a_broad_query_toward_the_users_taste_before_any_training() -> None:
    """The lexical channel of "dress" from a user who bought linen things favours the linen dress; the
    same query signed out (no history) scores both dresses alike, and so does the no-history ablation."""
    config = CONFIG.model_copy(update={"text_dim": 0, "graph_dim": 0})
    torch.manual_seed(0)
    model = UnifiedModel(config).eval()
    dresses = product_batch([{"title": "linen midi dress"}, {"title": "velvet party dress"}], config)
    linen_fan = {"query": "dress", "purchased_tags": ["linen", "linen shirt"], "recent_click_terms": ["linen"]}
    with torch.no_grad():
        linen, velvet = model.lexical(dresses.terms)
        for row, expected_gap in ((linen_fan, True), ({"query": "dress"}, False)):
            batch = query_batch([row], config)
            q = model.query_tower.expand_lexical(model.lexical(batch.terms), model.lexical(batch.history_terms),
                                                 batch)[0]
            gap = float(q @ linen - q @ velvet)
            assert (gap > 0.1) if expected_gap else abs(gap) < 0.05, (row, gap)
    ablated = UnifiedModel(config.model_copy(update={"use_history": False}))
    assert ablated.query_tower.expand_lexical is None and ablated.query_tower.expand_semantic is None


def test_a_model_saved_before_the_history_expansion_still_loads(tmp_path) -> None:
    """Yesterday's production bundle has no expansion weights and no ``history_expansion`` key."""
    import json

    from training.stages import load_model, save_model

    torch.manual_seed(0)
    old = UnifiedModel(CONFIG.model_copy(update={"history_expansion": 0.0})).eval()
    save_model(old, tmp_path)
    saved = json.loads((tmp_path / "model_config.json").read_text())
    del saved["history_expansion"]
    (tmp_path / "model_config.json").write_text(json.dumps(saved))
    loaded = load_model(tmp_path)
    with torch.no_grad():
        batch = query_batch([SIGNED_IN], CONFIG)
        assert torch.allclose(loaded.query_tower(batch), old.query_tower(batch))


def test_a_model_saved_before_text_folding_still_reads_text_unfolded(tmp_path) -> None:
    """Its product vectors were encoded from unfolded titles: folding its queries now would be skew."""
    import json

    from training.stages import load_model, save_model

    save_model(UnifiedModel(CONFIG).eval(), tmp_path)
    saved = json.loads((tmp_path / "model_config.json").read_text())
    assert saved["featurizer"].pop("unicode_folding") is True  # what a model trained today saves
    (tmp_path / "model_config.json").write_text(json.dumps(saved))
    assert load_model(tmp_path).config.featurizer.unicode_folding is False


def test_a_hard_negative_pool_smaller_than_the_negatives_it_must_hold_is_refused() -> None:
    import pytest
    from pydantic import ValidationError

    from training.train import TrainConfig

    with pytest.raises(ValidationError, match="hard_pool .* must exceed hard_negatives"):
        TrainConfig(hard_pool=8, hard_negatives=8)
    assert TrainConfig(hard_pool=8, hard_negatives=0).hard_pool == 8  # no mining, no pool needed


def test_hashed_tables_get_the_sparse_optimiser_and_dense_gradients_turn_it_off() -> None:
    from training.model import hashed_tables, sparse_parameters, use_dense_gradients
    from training.train import Optimizer, TrainConfig

    model = UnifiedModel(CONFIG)
    tables = hashed_tables(model)
    assert len(tables) == 4  # term bag, lexical weights, distiller bag, shops
    assert {id(p) for p in sparse_parameters(model)} == {id(p) for p in tables}
    kinds = [type(o).__name__ for o in Optimizer(model, TrainConfig(model=CONFIG)).optimizers]
    assert kinds == ["AdamW", "SparseAdam"]
    use_dense_gradients(model)
    assert sparse_parameters(model) == []
    (optimizer,) = Optimizer(model, TrainConfig(model=CONFIG)).optimizers
    assert [g["weight_decay"] for g in optimizer.param_groups] == [TrainConfig().weight_decay, 0.0]


@pytest.mark.parametrize("change", [{}, {"use_history": False}, {"lexical_dim": 0}, {"semantic_channel": False},
                                    {"history_expansion": 0.0}, {"lexical_dim": 0, "semantic_channel": False}])
def test_cached_user_states_give_the_training_vector(change: dict) -> None:
    """The service's path — each user's state computed alone, stacked in the batch's order — equals
    the tower run on the whole rows, for histories, shop-only histories, unknown and signed-out users."""
    from training.model import PackedUserState, UserState

    config = CONFIG.model_copy(update=change)
    torch.manual_seed(0)
    model = UnifiedModel(config).eval()
    shop_only = {"query": "mug", "country": "DE", "recent_shops": [3]}
    unknown = {"query": "mug", "country": None, "recent_queries": None, "recent_shops": None}
    rows = [SIGNED_IN, SIGNED_OUT, shop_only, unknown, SIGNED_IN]
    with torch.inference_mode():
        trained = model.query_tower(query_batch(rows, config))
        states = [model.query_tower.user_state(query_batch([{k: v for k, v in r.items() if k != "query"}], config))
                  for r in rows]
        served = model.query_tower(query_batch([{"query": r["query"]} for r in rows], config),
                                   UserState.stack([s.row(0) for s in states]))
        # as a feature store keeps them: one flat vector per user, unpacked with the signed-out layout
        layout = model.query_tower.user_state(query_batch([{}], config)).row(0)
        stored = model.query_tower(query_batch([{"query": r["query"]} for r in rows], config),
                                   UserState.stack([PackedUserState.from_flat(s.row(0).flat(), layout)
                                                    for s in states]))
    assert torch.allclose(served, trained, atol=1e-6)
    assert torch.allclose(stored, trained, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit this model's layout"):
        PackedUserState.from_flat([*layout.flat(), 0.0], layout)
