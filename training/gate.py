"""The validation gate: promote a trained model only if it is at least as good as production (within a
tolerance), its embeddings are sane, and an ANN index built from them keeps its recall.

The decision and every reason are written as an artefact (``decision.json``), with the production pointer it was
compared against; the pointer (``artifacts/models/production.json``) moves only after a promoted run's export
(``training.stages.step_export``), and only if it is still the one the gate compared against.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from training.boosting import exact_top_k, project_queries, top_k_kept


class GateConfig(BaseModel):
    recall_metric: str = "recall@100"
    recall_tolerance: float = 0.02  # may be this much worse than production and still promote
    min_ann_recall_at_100: float = 0.97
    norm_tolerance: float = 1e-3
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 200
    ann_queries: int = 1000
    # With a serving projection (boost.serving_dim): share of each query's exact top-100 that exact search of
    # the narrowed vectors must still return, and how much worse than the full-width model the served
    # (narrowed + boosted) ranking's recall may be.
    min_projection_top_100_kept: float = 0.9
    served_recall_tolerance: float = 0.01


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, float] = field(default_factory=dict)
    production_pointer: str | None = None  # the pointer compared against, as read (None: nothing in production)


def ann_recall_at_100(products: np.ndarray, queries: np.ndarray, config: GateConfig) -> float:
    """Recall@100 of an HNSW index (inner product) against exact search, on the given queries."""
    import faiss

    products = np.ascontiguousarray(products, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(100, len(products))
    index = faiss.IndexHNSWFlat(products.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.hnsw_ef_construction
    index.add(products)
    index.hnsw.efSearch = config.hnsw_ef_search
    _, approx = index.search(queries, k)
    exact = exact_top_k(queries, products, k)
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]))


def decide(metrics: dict, production: dict | None, products: np.ndarray, queries: np.ndarray,
           config: GateConfig, projection: np.ndarray | None = None) -> Decision:
    """``products``/``queries``: the towers' outputs; ``projection``: the run's serving projection, if any
    (the ANN index then holds the narrowed vectors, and the narrowing is checked too)."""
    decision = Decision(promote=True)

    def fail(reason: str) -> None:
        decision.promote = False
        decision.reasons.append(reason)

    finite = bool(np.isfinite(products).all() and np.isfinite(queries).all())
    decision.checks["finite"] = float(finite)
    if not finite:
        fail("embeddings contain NaN or infinite values")
    else:
        worst = float(max(np.abs(np.linalg.norm(products, axis=1) - 1).max(),
                          np.abs(np.linalg.norm(queries, axis=1) - 1).max()))
        decision.checks["max_norm_error"] = worst
        if worst > config.norm_tolerance:
            fail(f"embeddings are not unit length (max |norm - 1| = {worst:.4f} > {config.norm_tolerance})")
        sample = queries[: config.ann_queries]
        if projection is not None:
            kept = top_k_kept(sample, products, projection)
            decision.checks["projection_top_100_kept"] = kept
            if kept < config.min_projection_top_100_kept:
                fail(f"the serving projection to {projection.shape[1]} dimensions keeps {kept:.3f} of the exact "
                     f"top-100 < {config.min_projection_top_100_kept}: raise boost.serving_dim (0: full width)")
            products, sample = products @ projection, project_queries(sample, projection)
        recall = ann_recall_at_100(products, sample, config)
        decision.checks["ann_recall_at_100"] = recall
        if recall < config.min_ann_recall_at_100:
            fail(f"HNSW recall@100 vs exact search is {recall:.3f} < {config.min_ann_recall_at_100}")
    new = metrics["unified"]["all"][config.recall_metric]
    decision.checks[f"new_{config.recall_metric}"] = new
    if projection is not None and "unified_boosted" in metrics:
        served = metrics["unified_boosted"]["all"][config.recall_metric]
        decision.checks[f"served_{config.recall_metric}"] = served
        if served < new - config.served_recall_tolerance:
            fail(f"the served vectors (narrowed to {projection.shape[1]} dimensions, boosted) reach "
                 f"{config.recall_metric} {served:.3f}, worse than the full-width model's {new:.3f} beyond "
                 f"{config.served_recall_tolerance}: raise boost.serving_dim (0: full width)")
    if "production" in metrics:
        # Paired: production's served ranking scored on this run's test window (the evaluate step), against this
        # run's served ranking, so a window's difficulty weighs on both sides alike.
        ours = metrics.get("unified_boosted", metrics["unified"])["all"][config.recall_metric]
        old = metrics["production"]["all"][config.recall_metric]
        decision.checks[f"served_{config.recall_metric}"] = ours
        _compare(decision, ours, old, "on this run's test window", config, fail)
    elif production is not None:  # not scored today (its encodings are gone, or it changed since): its own window
        old = production["unified"]["all"][config.recall_metric]
        _compare(decision, new, old, "on its own promotion's test window", config, fail)
    else:
        decision.reasons.append("no model in production yet: nothing to compare against")
    if decision.promote:
        decision.reasons.append("promoted")
    return decision


def _compare(decision: Decision, new: float, old: float, where: str, config: GateConfig,
             fail: Callable[[str], None]) -> None:
    decision.checks[f"production_{config.recall_metric}"] = old
    if new < old - config.recall_tolerance:
        fail(f"{config.recall_metric} {new:.3f} is worse than production's {old:.3f} ({where}) "
             f"beyond the tolerance {config.recall_tolerance}")
    else:
        decision.reasons.append(f"{config.recall_metric} {new:.3f} vs production {old:.3f} ({where}): "
                                f"within tolerance")


def without_stale_production(metrics: dict, scored_pointer: bytes | None, current_pointer: bytes | None) -> dict:
    """``metrics`` as the gate may use them: without the ``production`` row when it scored another production than
    the one the gate compares against now (``scored_pointer``, recorded by the evaluate step, differs from
    ``current_pointer``: a rollback or another promotion landed in between), so ``decide`` falls back to the
    current production's stored score rather than compare with a model this run does not replace."""
    if "production" not in metrics or scored_pointer == (current_pointer or b""):
        return metrics
    return {system: scores for system, scores in metrics.items() if system != "production"}


def write_decision(decision: Decision, path: Path) -> None:
    path.write_text(json.dumps(asdict(decision), indent=2))


def production_pointer(models_dir: Path) -> Path:
    return models_dir / "production.json"


def read_pointer(models_dir: Path) -> bytes | None:
    """The production pointer as it is now, read once (``None``: nothing promoted yet): what ``restore_pointer``
    puts back, and what ``pointer_record`` parses."""
    try:
        return production_pointer(models_dir).read_bytes()
    except FileNotFoundError:
        return None


def pointer_record(saved: bytes | None) -> dict | None:
    """``{"version", "metrics", …}`` of a pointer read by ``read_pointer``."""
    return None if saved is None else json.loads(saved)


def pointer_version(saved: bytes | None) -> str | None:
    """The version a pointer read by ``read_pointer`` names (``None``: nothing promoted)."""
    record = pointer_record(saved)
    return None if record is None else record["version"]


def pointer_bundle_id(saved: bytes | None) -> str | None:
    """The registration a pointer read by ``read_pointer`` names (``serving.bundle.bundle_id_of``): a day retrained
    under its version name is registered again, and a rollback can make the first registration production. None:
    nothing promoted, or a pointer written before it recorded one (its version's newest registration is meant)."""
    record = pointer_record(saved)
    return None if record is None else record.get("bundle_id")


def production_version(models_dir: Path) -> str | None:
    """The version in production, if any."""
    return pointer_version(read_pointer(models_dir))


def production_metrics(models_dir: Path) -> dict | None:
    """Metrics of the model currently in production, if any."""
    return pointer_metrics(read_pointer(models_dir))


def pointer_metrics(saved: bytes | None) -> dict | None:
    """The kept metrics of the version a pointer read by ``read_pointer`` names (``None``: nothing promoted)."""
    record = pointer_record(saved)
    return None if record is None else json.loads(Path(record["metrics"]).read_text())


def kept_metrics(models_dir: Path, version: str, bundle_id: str | None = None) -> Path:
    """Where a promoted version's metrics (and their ``report.html`` beside them) are kept, whatever run
    directory they came from: a rollback finds them here to make that version production again. With
    ``bundle_id``, that registration's own when its promotion kept them (a day retrained under its version name
    and promoted again replaces the version's; a rollback to the first registration must take the first's). A
    registration never promoted has none: the returned path does not exist."""
    if bundle_id is not None:
        own = _registration_metrics(models_dir, version, bundle_id)
        # the version's own only when no promotion of it recorded its registration (promoted before they were):
        # otherwise it holds another registration's, and this one was never promoted
        if own.exists() or own.parent.parent.exists():
            return own
    return models_dir / version / "metrics.json"


def _registration_metrics(models_dir: Path, version: str, bundle_id: str) -> Path:
    return models_dir / version / "registrations" / bundle_id.rpartition("@")[2] / "metrics.json"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def promote(models_dir: Path, version: str, metrics_path: Path, record: dict[str, str] | None = None) -> None:
    """Point production at ``version`` (written atomically), its metrics and their report copied to
    ``kept_metrics`` first (a KFP run leaves them under its pipeline root), and to its registration's own when
    ``record`` names one (``bundle_id``); ``record`` also says why when it is not the gate (a rollback)."""
    bundle_id = (record or {}).get("bundle_id")
    places = [models_dir / version / "metrics.json"]
    if bundle_id is not None:
        places.append(_registration_metrics(models_dir, version, bundle_id))
    for kept in places:
        if metrics_path.resolve() != kept.resolve():
            report = metrics_path.with_name("report.html")
            if report.exists():
                _write_atomically(kept.with_name(report.name), report.read_bytes())
            _write_atomically(kept, metrics_path.read_bytes())
    pointer = {"version": version, "metrics": str(places[-1]), **(record or {})}
    _write_atomically(production_pointer(models_dir), json.dumps(pointer).encode())


def restore_pointer(models_dir: Path, saved: bytes | None) -> None:
    """Put back the production pointer as it was read before a ``promote`` (``None``: there was none), when
    the step that had to go with the promotion failed (a rollback's alias swap)."""
    pointer = production_pointer(models_dir)
    if saved is None:
        pointer.unlink(missing_ok=True)
    else:
        _write_atomically(pointer, saved)
