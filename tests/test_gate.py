"""The validation gate promotes only sane, not-worse models whose ANN index keeps its recall."""

from __future__ import annotations

import numpy as np

from training.gate import GateConfig, decide, production_metrics, promote, without_stale_production

CONFIG = GateConfig(ann_queries=200)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _vectors(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=(3000, 32))), _unit(rng.normal(size=(200, 32)))


def _metrics(recall: float) -> dict:
    return {"unified": {"all": {"recall@100": recall}}}


def test_first_model_is_promoted_when_sane() -> None:
    products, queries = _vectors()
    decision = decide(_metrics(0.5), None, products, queries, CONFIG)
    assert decision.promote, decision.reasons
    assert decision.checks["ann_recall_at_100"] >= 0.97


def test_worse_than_production_beyond_tolerance_is_refused() -> None:
    products, queries = _vectors()
    assert decide(_metrics(0.69), _metrics(0.70), products, queries, CONFIG).promote
    refused = decide(_metrics(0.60), _metrics(0.70), products, queries, CONFIG)
    assert not refused.promote and any("worse than production" in r for r in refused.reasons)


def test_production_is_compared_on_this_runs_window_when_the_evaluation_scored_it() -> None:
    """The evaluate step scores production on the run's own test window (``metrics["production"]``, its served
    ranking): the gate compares the run's served ranking with that, not with production's score on the window it
    was promoted on — an easier window then would refuse every later model, a harder one pass a worse model."""
    products, queries = _vectors()
    stored = _metrics(0.50)  # production's score on its own, easier or harder, window
    worse_today = {**_metrics(0.60), "production": {"all": {"recall@100": 0.70}}}
    refused = decide(worse_today, stored, products, queries, CONFIG)
    assert not refused.promote and any("0.600 is worse than production's 0.700 (on this run's test window)" in r
                                       for r in refused.reasons), refused.reasons
    better_today = {**_metrics(0.60), "production": {"all": {"recall@100": 0.55}}}
    assert decide(better_today, _metrics(0.90), products, queries, CONFIG).promote
    # served against served: this run's boosted ranking, when it has one
    boosted = {**_metrics(0.70), "unified_boosted": {"all": {"recall@100": 0.60}},
               "production": {"all": {"recall@100": 0.65}}}
    decision = decide(boosted, stored, products, queries, CONFIG)
    assert not decision.promote and decision.checks["served_recall@100"] == 0.60
    assert decision.checks["production_recall@100"] == 0.65


def test_a_production_row_that_scored_another_production_is_not_used() -> None:
    """The evaluate step records the pointer its production row scored; a rollback or promotion before the gate
    makes that row another model's, and the gate then uses the stored score of the production it compares with."""
    metrics = {**_metrics(0.60), "production": {"all": {"recall@100": 0.70}}}
    pointer = b'{"version": "daily-20261201"}'
    assert without_stale_production(metrics, pointer, pointer) is metrics
    assert without_stale_production(metrics, b"", None) is metrics  # nothing in production either time
    moved = without_stale_production(metrics, pointer, b'{"version": "daily-20261130"}')
    assert "production" not in moved and moved["unified"] == metrics["unified"]
    products, queries = _vectors()
    decision = decide(moved, _metrics(0.59), products, queries, CONFIG)
    assert decision.promote and decision.checks["production_recall@100"] == 0.59


def test_nan_or_unnormalised_embeddings_are_refused() -> None:
    products, queries = _vectors()
    products[5, 0] = np.nan
    assert not decide(_metrics(0.5), None, products, queries, CONFIG).promote
    products, queries = _vectors()
    refused = decide(_metrics(0.5), None, products * 2, queries, CONFIG)
    assert not refused.promote and any("unit length" in r for r in refused.reasons)


def test_poor_ann_recall_is_refused() -> None:
    products, queries = _vectors()
    strict = GateConfig(ann_queries=200, hnsw_ef_search=4, hnsw_m=4, hnsw_ef_construction=8)
    refused = decide(_metrics(0.5), None, products, queries, strict)
    assert not refused.promote and refused.checks["ann_recall_at_100"] < 0.97


def _projection(products: np.ndarray, width: int) -> np.ndarray:
    from training.boosting import fit_projection

    return fit_projection(products, width, seed=0)


def test_a_serving_projection_is_gated_on_what_it_keeps_and_on_the_served_recall() -> None:
    """Products in a 16-d subspace of 32: a 16-d projection keeps every top-100 and its narrowed index is
    what the ANN check measures; 4-d keeps too little; a served ranking worse than the full-width model's
    beyond the tolerance is refused even when the projection keeps the top-100."""
    rng = np.random.default_rng(5)
    products = _unit(rng.normal(size=(3000, 16)) @ np.linalg.qr(rng.normal(size=(32, 16)))[0].T)
    _, queries = _vectors()
    metrics = {**_metrics(0.5), "unified_boosted": {"all": {"recall@100": 0.5}}}
    kept = decide(metrics, None, products, queries, CONFIG, projection=_projection(products, 16))
    assert kept.promote, kept.reasons
    assert kept.checks["projection_top_100_kept"] > 0.99 and kept.checks["ann_recall_at_100"] >= 0.97
    narrow = decide(metrics, None, products, queries, CONFIG, projection=_projection(products, 4))
    assert not narrow.promote and narrow.checks["projection_top_100_kept"] < 0.9
    assert any("raise boost.serving_dim" in r for r in narrow.reasons)
    worse = {**_metrics(0.5), "unified_boosted": {"all": {"recall@100": 0.48}}}
    refused = decide(worse, None, products, queries, CONFIG, projection=_projection(products, 16))
    assert not refused.promote and any("served vectors" in r for r in refused.reasons)
    # without a projection the served ranking is not held to the full-width one (boosting may trade it)
    assert decide(worse, None, products, queries, CONFIG).promote


def test_promotion_moves_the_production_pointer(tmp_path) -> None:
    assert production_metrics(tmp_path) is None
    (tmp_path / "v1.json").write_text('{"unified": {"all": {"recall@100": 0.4}}}')
    promote(tmp_path, "v1", tmp_path / "v1.json")
    assert production_metrics(tmp_path)["unified"]["all"]["recall@100"] == 0.4


def test_promotion_keeps_the_metrics_and_their_report_beside_the_version(tmp_path) -> None:
    """A KFP run leaves its metrics and report.html under the pipeline root: production keeps its own copies
    (a rollback finds the metrics there, and the demo prints the report beside them)."""
    import json

    from training.gate import kept_metrics, production_pointer, production_version

    run = tmp_path / "kfp" / "run-1" / "evaluate-op"
    run.mkdir(parents=True)
    (run / "metrics").write_text('{"unified": {"all": {"recall@100": 0.5}}}')
    (run / "report.html").write_text("<html>recall curves</html>")
    models = tmp_path / "models"
    assert production_version(models) is None
    promote(models, "v2", run / "metrics")
    kept = kept_metrics(models, "v2")
    assert json.loads(production_pointer(models).read_text()) == {"version": "v2", "metrics": str(kept)}
    assert production_version(models) == "v2"
    assert kept.read_text() == (run / "metrics").read_text()
    assert kept.with_name("report.html").read_text() == "<html>recall curves</html>"
    assert not list(models.rglob("*.tmp"))


def test_a_production_model_that_no_longer_loads_is_left_out_of_the_evaluation(tmp_path, caplog) -> None:
    """The pointer names a version the model store cannot give back (deleted, or weights of an older
    architecture): the new run is still evaluated and gated, with a warning, instead of failing."""
    import json

    from retrieval_core.settings import Settings
    from training.gate import production_pointer
    from training.stages import production_retriever

    settings = Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    assert production_retriever(settings, tmp_path / "dataset") is None  # nothing promoted yet
    pointer = production_pointer(settings.artifacts_dir / "models")
    pointer.parent.mkdir(parents=True)
    pointer.write_text(json.dumps({"version": "gone-20261001", "metrics": str(tmp_path / "metrics.json")}))
    assert production_retriever(settings, tmp_path / "dataset") is None
    assert "gone-20261001" in caplog.text and "does not load" in caplog.text


def test_a_registration_never_promoted_has_no_kept_metrics_once_promotions_record_registrations(tmp_path) -> None:
    """A rollback moves production only to a registration that was promoted (its kept metrics exist); the version's
    shared file holds whichever registration was promoted last, so it stands in only for promotions recorded
    before registrations were."""
    from training.gate import kept_metrics, promote

    models, metrics = tmp_path / "models", tmp_path / "metrics.json"
    metrics.write_text('{"run": 1}')
    promote(models, "v", metrics)  # before promotions recorded their registration
    assert kept_metrics(models, "v", "v@earlier") == models / "v" / "metrics.json"
    promote(models, "v", metrics, {"bundle_id": "v@first"})
    own = kept_metrics(models, "v", "v@first")
    assert own.exists() and own != models / "v" / "metrics.json"
    assert not kept_metrics(models, "v", "v@never").exists()
