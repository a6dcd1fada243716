"""Index refresh: embed the catalogue with a model version and publish it as a new Milvus collection.

Runs after a promoted training run (new model version) and nightly without retraining (new and
changed products of the current version). Incremental where it costs: product text is encoded by the
version's adapted encoder only when its content hash is not in the version's encoding cache; the
product tower itself is cheap and runs over the whole catalogue. The new collection is checked before
the alias moves (see ``serving.index``), so a failed refresh leaves yesterday's index serving.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from feature_repo.warehouse import EMBEDDINGS, version_rows
from retrieval_core.errors import OperatorError
from retrieval_core.settings import Settings
from serving.bundle import ModelBundle, ModelNotFound, registrations
from serving.index import IndexLifecycle, IndexVersion, StillWanted
from training.batching import product_text
from training.dataset import product_features
from training.gate import (
    kept_metrics,
    pointer_bundle_id,
    pointer_version,
    production_pointer,
    promote,
    read_pointer,
    restore_pointer,
)
from training.stages import publish_product_embeddings
from training.text_encoder import EmbeddingCache, version_cache, version_cache_path

log = logging.getLogger(__name__)


class EncodingsMissing(OperatorError, LookupError):
    """A model version's product embeddings are not in the warehouse (never exported, or pruned)."""


@dataclass
class RefreshReport:
    model_version: str
    index: IndexVersion
    products: int
    newly_encoded: int
    checks: dict[str, float]
    seconds: dict[str, float]


def _read_production(settings: Settings) -> bytes:
    """The production pointer (``training.gate.read_pointer``); ``ModelNotFound`` before the first promotion."""
    models_dir = settings.artifacts_dir / "models"
    if (saved := read_pointer(models_dir)) is None:
        raise ModelNotFound(f"no production model yet ({production_pointer(models_dir)} is missing): "
                            "run `uer train` first")
    return saved


def production_model_version(settings: Settings) -> str:
    """The version production names; ``ModelNotFound`` before the first promotion."""
    return pointer_version(_read_production(settings))


def registration_named(settings: Settings, saved: bytes | None) -> tuple[str, str | None] | None:
    """What a production pointer read by ``training.gate.read_pointer`` names, as (version, bundle id): the bundle
    it records, or its version's newest registration where it records none (written before it did) or the one it
    records is gone from the model store; None for the bundle when the version has no registration. None: nothing
    promoted. The one reading of a pointer's registration (every caller compares or loads what this returns)."""
    if (version := pointer_version(saved)) is None:
        return None
    found = [r.bundle_id for r in registrations(settings, version)]
    recorded = pointer_bundle_id(saved)
    return version, recorded if recorded in found else (found[-1] if found else None)


def production_registration(settings: Settings) -> tuple[str, str | None]:
    """Production's ``registration_named``; ``ModelNotFound`` before the first promotion."""
    return registration_named(settings, _read_production(settings))


def production_bundle(settings: Settings) -> ModelBundle:
    """Production's registration, loaded."""
    return ModelBundle.load(settings, *production_registration(settings))


def serving_registration(settings: Settings, index: IndexLifecycle | None = None) -> tuple[str, str | None]:
    """The model the nightly work (refresh, user states) keeps up to date, as (version, bundle id): the registration
    that built the collection the alias points to — so an ``uer index rollback`` stays rolled back until a promotion
    publishes a new version, also one back to an earlier registration of a day retrained under its version name —
    or production's registration when nothing serves yet or the served model is not registered (an index the API
    refuses). The bundle id is None where the version's newest registration is meant (or the one recorded is
    gone)."""
    served = (index or IndexLifecycle(settings)).serving()
    found = registrations(settings)
    if served is not None and served.model_version in {r.model_version for r in found}:
        kept = served.bundle_id in {r.bundle_id for r in found}
        return served.model_version, served.bundle_id if kept else None
    return production_registration(settings)


def chosen_registration(settings: Settings, model_version: str | None = None, bundle_id: str | None = None,
                        index: IndexLifecycle | None = None) -> tuple[str, str | None]:
    """The registration a refresh or a user-states job works with, as (version, bundle id): ``model_version``'s
    ``bundle_id``; without one, production's registration when production names that version (a rollback may have
    made an earlier one production), else its newest (None); without a version, ``serving_registration``."""
    if model_version is None:
        return serving_registration(settings, index)
    if bundle_id is None:
        try:
            production, production_bundle = production_registration(settings)
        except ModelNotFound:
            return model_version, None
        bundle_id = production_bundle if production == model_version else None
    return model_version, bundle_id


def serving_model_version(settings: Settings, index: IndexLifecycle | None = None) -> str:
    """The version of ``serving_registration``."""
    return serving_registration(settings, index)[0]


def awaiting_publication(settings: Settings, model_version: str) -> bool:
    """Whether production names ``model_version`` but the alias does not serve production's registration of it: a
    promotion whose publication never happened (the daily DAG's publish_index ran out of retries). A rerun of its
    day must publish it even when that rerun's own gate refuses its new model. A rollback to an earlier
    registration of the version moved production with it, so it is not mistaken for one (and undone)."""
    try:
        version, bundle_id = production_registration(settings)
    except ModelNotFound:
        return False
    if version != model_version or bundle_id is None:  # not production, or nothing to publish it with
        return False
    served = IndexLifecycle(settings).serving()
    return served is None or served.model_version != model_version or served.bundle_id not in (None, bundle_id)


def roll_back(settings: Settings, forward: bool = False) -> tuple[IndexVersion, str]:
    """Point the alias at the previous served collection (``IndexLifecycle.rollback``; ``forward``: the next one,
    undoing a rollback) and production at its model, so the next training run is gated against the model that
    serves, not the one just taken out of service (and ``production_retriever`` evaluates the serving one).
    Production stays where it is when the registration is the same, has no registered bundle or was never promoted
    (no kept metrics); a rollback to another registration of the same version (a day retrained) moves it to that
    one. Production moves first and is put back if the alias cannot move, so a failure of either step
    leaves both as they were. Returns the collection now serving and what became of production, in words."""
    index = IndexLifecycle(settings)
    current, target = index.rollback_target(forward)
    models_dir = settings.artifacts_dir / "models"
    before = read_pointer(models_dir)  # once: the version it names is the one a failed swap puts back
    production, production_bundle = registration_named(settings, before) or (None, None)
    found = registrations(settings)
    newest = {r.model_version: r.bundle_id for r in found}  # oldest first: the newest wins
    registered = {r.bundle_id for r in found}
    metrics = kept_metrics(models_dir, target.model_version, target.bundle_id)
    if target.model_version == production and target.bundle_id in (None, production_bundle):
        said = f"production stays {production}"
    elif target.model_version not in newest or not metrics.exists() or (
            target.bundle_id and target.bundle_id not in registered):
        said = (f"production stays {production}: {target.model_version} has no registered bundle or was never "
                f"promoted (no {metrics}); the next training run is still gated against {production}")
    else:
        moved = "rolled_forward_from" if forward else "rolled_back_from"
        promote(models_dir, target.model_version, metrics,
                {moved: current.model_version, "at": dt.datetime.now(dt.UTC).isoformat(),
                 **({"bundle_id": target.bundle_id} if target.bundle_id else {})})
        try:
            index.swap(target)
        except Exception:
            restore_pointer(models_dir, before)
            raise
        # another registration of the same version (a day retrained): named by its bundle
        change = (f"{production_bundle} → {target.bundle_id}" if target.model_version == production
                  else f"{production} → {target.model_version}")
        log.warning("%s: production %s", "rollforward" if forward else "rollback", change)
        return target, f"production {change}: the next training run is gated against it"
    index.swap(target)
    return target, said


def encoding_cache_path(settings: Settings, model_version: str) -> Path:
    """Where the version's text encodings are cached (the file training's text step fills)."""
    return version_cache_path(settings.artifacts_dir / "encoder_cache", model_version)


def encoding_cache(settings: Settings, bundle: ModelBundle) -> EmbeddingCache:
    """The bundle's text encodings by content hash (and its encoder's fingerprint), opened (read whole)."""
    return version_cache(settings.artifacts_dir / "encoder_cache", bundle.model_version, bundle.text_fingerprint)


def with_version_encodings(settings: Settings, bundle: ModelBundle,
                           products: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, int]:
    """``product_tower_v1`` rows with this version's encodings, whatever Feast's join picked: the graph
    encoding from the bundle's own ``product_embeddings`` rows (keyed by bundle id: a day retrained under its
    version name trains another graph; none for a product its graph never saw: the tower's fallback), and the text
    encoding of each product's *current* text through the version's cache, so only new and changed texts are
    encoded (a product whose title changed since the version encoded it gets its new text's encoding). Returns the
    rows, which rows' encodings differ from the ones Feast read, and how
    many texts were newly encoded. Writes nothing. A version with a graph but no rows at all is refused
    (``EncodingsMissing``): every product would take the tower's fallback, an index quietly worse than the one
    the version was promoted on, which no index check would notice."""
    products = products.copy()
    changed = (products["embedding_version"] != bundle.bundle_id).to_numpy(dtype=bool, na_value=True)
    own = version_rows(settings, EMBEDDINGS, bundle.bundle_id, ["product_id", "graph_embedding"])
    if own.num_rows == 0:  # exported before the rows were keyed by bundle: the version's
        own = version_rows(settings, EMBEDDINGS, bundle.model_version, ["product_id", "graph_embedding"])
    if bundle.model.config.graph_dim and own.num_rows == 0:
        raise EncodingsMissing(
            f"model {bundle.model_version} ({bundle.bundle_id}) has no rows in {EMBEDDINGS} (never exported, or "
            "pruned as retired): its graph encodings are gone, so its product vectors cannot be rebuilt. Serve a "
            "version that has them (`uer index status` lists what is kept) or train a new one; nothing was published")
    graph = dict(zip(own.column("product_id").to_pylist(),
                     own.column("graph_embedding").to_numpy(zero_copy_only=False), strict=True))
    products["graph_embedding"] = [graph.get(product_id) for product_id in products["product_id"]]
    new = 0
    if bundle.model.config.text_dim:
        texts = [product_text(row) for row in products[["title", "tags"]].to_dict("records")]  # what it reads
        vectors, new = encoding_cache(settings, bundle).encode(texts, bundle.encode_texts)
        changed |= np.array([not isinstance(read, list | np.ndarray) or not np.array_equal(read, vector)
                             for read, vector in zip(products["text_embedding"], vectors, strict=True)], dtype=bool)
        products["text_embedding"] = list(vectors)
    products["embedding_version"] = bundle.bundle_id
    return products, changed, new


def catalogue_with_encodings(settings: Settings, bundle: ModelBundle, as_of: dt.datetime) -> tuple[pd.DataFrame, int]:
    """The catalogue as of ``as_of`` with the version's encodings (``with_version_encodings``); where they
    differ from what Feast read, the version's rows are written back to Feast. Returns the rows and how many
    texts were newly encoded."""
    products, changed, new = with_version_encodings(settings, bundle, product_features(settings, as_of))
    if changed.any():
        publish_product_embeddings(settings, products[["product_id", "text_embedding", "graph_embedding"]],
                                   bundle.bundle_id)
    return products, new


def unchanged_since(settings: Settings, model_version: str | None, expected_production: str | None = None,
                    index: IndexLifecycle | None = None) -> StillWanted:
    """A check for ``IndexLifecycle.publish``, taken now: later, the reason a publication built meanwhile must not
    swap, or None. A refresh of what serves (no ``model_version``) must find the alias where it was: had a
    promotion's publication or a rollback moved it, the swap would move it back (a nightly refresh of yesterday's
    model undoing a promotion). A publication of a given version (a promotion's) must find production naming what
    it named now, or ``expected_production``: had an operator rolled back meanwhile (``roll_back`` moves production
    before the alias), the swap would undo that. A rollback that moved only the alias (its model never promoted)
    does not stop a promotion's publication. Rerunning rebuilds on what holds then."""
    if model_version is None:
        alias = (index or IndexLifecycle(settings)).alias_target()

        def alias_moved(now: IndexLifecycle) -> str | None:
            if (target := now.alias_target()) == alias:
                return None
            return (f"alias {settings.milvus.alias!r} moved from {alias or 'nothing'} to {target} while it was built "
                    "(a promotion's publication or a rollback): swapping would move it back. Rerun the refresh (a "
                    "DAG retry does): it rebuilds for what serves now")

        return alias_moved
    models_dir = settings.artifacts_dir / "models"
    named, registration = registration_named(settings, read_pointer(models_dir)) or (None, None)
    production = expected_production or named
    # and its registration: a rollback to another registration of the version moves only that
    registration = registration if named == production else None

    def production_moved(_: IndexLifecycle) -> str | None:
        promoted, promoted_registration = registration_named(settings, read_pointer(models_dir)) or (None, None)
        if promoted == production and registration in (None, promoted_registration):
            return None
        named = (f"{promoted}, not {production}" if promoted != production
                 else f"{promoted_registration}, not {registration}")
        return (f"production names {named} (a rollback or another promotion while it was being published): "
                f"swapping would serve against that choice. Publish {model_version} again only if it should serve "
                "after all")

    return production_moved


def refresh_index(settings: Settings, model_version: str | None = None, as_of: dt.datetime | None = None,
                  expected_production: str | None = None, bundle_id: str | None = None) -> RefreshReport:
    """Embed the catalogue with ``model_version``'s registration (``chosen_registration``: default, the registration
    serving) and publish a new collection. Without ``model_version`` the swap
    happens only if the alias did not move while it ran, with one only if production did not, or still names
    ``expected_production`` when given (``unchanged_since``; ``serving.index.PublicationSuperseded``)."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    # Without a version, the alias is read before it decides the model; with one, Milvus waits until the model
    # has loaded (a version that does not exist is refused without touching, or starting, the engine).
    at_start = IndexLifecycle(settings) if model_version is None else None
    still_wanted = unchanged_since(settings, model_version, expected_production, at_start)
    version, bundle_id = chosen_registration(settings, model_version, bundle_id, at_start)
    bundle = ModelBundle.load(settings, version, bundle_id)
    products, new = catalogue_with_encodings(settings, bundle, as_of or dt.datetime.now(dt.UTC))
    seconds["features_and_text"] = round(time.perf_counter() - start, 3)
    mark = time.perf_counter()
    vectors = bundle.product_vectors(products)
    seconds["product_tower"] = round(time.perf_counter() - mark, 3)
    if not np.isfinite(vectors).all():
        raise ValueError(f"model {version} produced non-finite product vectors: not publishing")
    # Stand-in queries for the ANN check: the products' own tower vectors with the query-side weights.
    rng = np.random.default_rng(settings.seed)
    sample = rng.choice(len(vectors), min(settings.milvus.ann_check_queries, len(vectors)), replace=False)
    out_dim = bundle.dim - len(bundle.boost_weights)  # the (narrowed) tower part
    queries = np.concatenate([vectors[sample, :out_dim],
                              np.broadcast_to(bundle.boost_weights, (len(sample), len(bundle.boost_weights)))], 1)
    mark = time.perf_counter()
    # A connection of its own: the one above has idled through the encoding (long for a catalogue of new texts).
    index, checks = IndexLifecycle(settings).publish(version, products, vectors, queries.astype(np.float32),
                                                     still_wanted, bundle.bundle_id)
    seconds["index"] = round(time.perf_counter() - mark, 3)
    seconds["total"] = round(time.perf_counter() - start, 3)
    log.info("published %s (%d products, %d newly encoded) in %.1f s", index.collection, len(products), new,
             seconds["total"])
    return RefreshReport(version, index, len(products), new, checks, seconds)


@dataclass
class PromotionPublished:
    user_states: int
    refresh: RefreshReport


def publish_promoted(settings: Settings, model_version: str) -> PromotionPublished | None:
    """The daily DAG's publication of the version its gate just promoted: its user states, then its collection
    (states first: the API serves them from its first request on the new version). None, publishing nothing, if
    production no longer names it: an operator rolled back since the gate (a DAG retry must not undo that)."""
    from serving.user_states import publish_user_states  # it reads this module's chosen_registration

    try:
        production, bundle_id = production_registration(settings)
    except ModelNotFound:
        production, bundle_id = None, None
    if production != model_version:
        log.warning("not publishing %s: production is %s (rolled back since the gate promoted it)", model_version,
                    production)
        return None
    # production's registration of it: a rerun's awaiting_publication may concern an earlier one than the newest
    states = publish_user_states(settings, model_version, bundle_id=bundle_id)
    # production must still name it at the swap: a rollback while the states were written is not undone either
    return PromotionPublished(states.users, refresh_index(settings, model_version, expected_production=model_version,
                                                          bundle_id=bundle_id))
