"""What each model version leaves behind, and its removal once the version can no longer serve.

Beside its Milvus collection (pruned by ``serving.index``), every promoted version writes two sources of
its own: its product encodings (``product_embeddings``, keyed by bundle: training's export and each
refresh) and its bundle's user states (``user_query_state``, keyed by bundle, online and offline). Each is a
full copy per version, so without pruning the offline store grows by a catalogue's encodings and a window's
states every day, and every point-in-time read of ``product_tower_v1`` (each refresh) scans them all.

On disk, each version also leaves its BentoML registration (~0.5 GB on the default world), its text-encoding
cache and what its local KFP run kept: those go too (``prune_version_files``). The run's data and models
(~1.8 GB) go sooner, when the next training run finishes (``training.pipeline.prune_earlier_runs``), refused
runs included: the gate's refusal means no export, so they are never registered and never listed here.

A version is *live* while the API serves it or may soon: it is production, it still has a collection (the
alias target, the ones a rollback returns to, a build in progress), or it is a candidate registered after
production's registration (rolled back from). After each alias swap the DAGs' ``prune_retired_versions``
task deletes the rows and files of every version that is not. What is live is looked up once and shared by
all three; with nothing live (no production model, no collection) nothing is deleted.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

from feature_repo.store import get_store
from feature_repo.warehouse import EMBEDDINGS, USER_STATES, delete_version, version_keys, written_versions
from retrieval_core.settings import Settings
from serving.bundle import delete_registration, registrations
from serving.index import IndexLifecycle
from serving.refresh import encoding_cache_path, registration_named
from serving.user_states import delete_online_states
from training.gate import read_pointer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Live:
    """What the API serves or may soon, looked up once for every prune (one listing of Milvus and of the
    model store): model versions, and the registrations (bundle ids) whose user states it may read."""
    versions: set[str]
    bundle_ids: set[str]


def live(settings: Settings) -> Live:
    """Live versions: production, every version with a collection in Milvus, and every *candidate*, a version
    registered after production's version's newest registration: one rolled back from, which ``rollforward`` may serve
    again, or one whose export is under way (it registers before it promotes). Until production is registered
    (a promotion of an unregistered version) every registered version is a candidate. Live bundles: each live
    version's newest registration, production's registration, and the registration that built each kept
    collection (a rollback can serve an earlier registration of a version). Raises if Milvus cannot be listed:
    nothing may be deleted on a guess."""
    collections = IndexLifecycle(settings).versions()
    production, production_bundle = registration_named(settings, read_pointer(settings.artifacts_dir / "models")) or (
        None, None)
    found = registrations(settings)  # oldest first
    promoted_at = max((r.created for r in found if r.model_version == production), default=None)
    versions = {c.model_version for c in collections} | ({production} if production else set()) | {
        r.model_version for r in found if promoted_at is None or r.created > promoted_at}
    newest = {r.model_version: r for r in found}
    bundle_ids = {newest[version].bundle_id for version in versions if version in newest} | {
        c.bundle_id for c in collections if c.bundle_id} | ({production_bundle} - {None})
    return Live(versions, bundle_ids)


def live_model_versions(settings: Settings) -> set[str]:
    """The versions of :func:`live`."""
    return live(settings).versions


def prune_user_states(settings: Settings, *, live_bundles: set[str] | None = None) -> list[str]:
    """Delete the states of every bundle that is not live (:func:`live`) from the online store and from the
    ``user_query_state`` source; returns the bundles pruned. Online rows go first: the offline rows list
    them, so a crash in between leaves them listed for the next run."""
    kept = live(settings).bundle_ids if live_bundles is None else live_bundles
    if not kept:  # nothing registered and published: refuse rather than empty the store
        log.warning("no live model bundle (no production model, no collection): not pruning user states")
        return []
    store = get_store(settings)
    pruned = [bundle for bundle in written_versions(settings, USER_STATES) if bundle not in kept]
    for bundle in pruned:
        delete_online_states(store, bundle, version_keys(settings, USER_STATES, bundle, "user_id"))
        delete_version(settings, USER_STATES, bundle)
    if pruned:
        log.info("pruned the user states of %s (kept %s)", ", ".join(pruned), ", ".join(sorted(kept)))
    return pruned


def prune_product_embeddings(settings: Settings, live_keys: set[str] | None = None) -> list[str]:
    """Delete the ``product_embeddings`` rows of every model bundle that is not live, and the rows written before
    they were keyed by bundle (keyed by version) of every version that is not live or whose live bundles all have
    rows of their own by now (a refresh wrote them); returns the keys pruned. Only the serving bundle's rows are ever
    used as they are (a refresh re-encodes the rest), so a retired one's rows are dead weight. The view is not
    materialised online: offline rows only."""
    if live_keys is None:
        now = live(settings)
        live_keys = now.bundle_ids | now.versions
    if not live_keys:
        log.warning("no live model version (no production model, no collection): not pruning product embeddings")
        return []
    written = written_versions(settings, EMBEDDINGS)
    live_bundles: dict[str, set[str]] = {}  # version → its live bundles
    for key in live_keys:
        if "@" in key:
            live_bundles.setdefault(key.rpartition("@")[0], set()).add(key)
    superseded = {version for version, bundles in live_bundles.items() if bundles <= set(written)}
    pruned = [key for key in written if key not in live_keys or key in superseded]
    for key in pruned:
        delete_version(settings, EMBEDDINGS, key)
    if pruned:
        log.info("pruned the product embeddings of %s (kept %s)", ", ".join(pruned), ", ".join(sorted(live_keys)))
    return pruned


def prune_version_files(settings: Settings, live_versions: set[str] | None = None) -> list[str]:
    """Delete what a retired version left on disk: its text-encoding cache, its local KFP pipeline root (its runs'
    reports, and the newest run's data and models: ``training.pipeline.prune_earlier_runs``) and, last, its
    BentoML registrations (weights and adapted encoder: ~0.5 GB), so a crash in between leaves it listed for the
    next run. A candidate is live (``live_model_versions``): only versions registered before production go. Kept:
    a version's metrics and report under ``artifacts/models/<version>/`` (kilobytes: the history of what was
    promoted). Returns the versions pruned."""
    kept = live(settings).versions if live_versions is None else live_versions
    if not kept:
        log.warning("no live model version (no production model, no collection): not pruning model files")
        return []
    found = registrations(settings)
    retired = sorted({r.model_version for r in found if r.model_version not in kept})
    for version in retired:
        encoding_cache_path(settings, version).unlink(missing_ok=True)
        shutil.rmtree(settings.kfp_local_dir / version, ignore_errors=True)
        for registration in (r for r in found if r.model_version == version):
            delete_registration(settings, registration)
    if retired:
        log.info("pruned the files of %s (kept %s)", ", ".join(retired), ", ".join(sorted(kept)))
    return retired


def prune_retired_versions(settings: Settings) -> dict[str, list[str]]:
    """Everything of the versions that can no longer serve: both sources' rows, then their files; run after
    each alias swap, once the index has pruned its collections."""
    now = live(settings)
    return {"user_states": prune_user_states(settings, live_bundles=now.bundle_ids),
            "product_embeddings": prune_product_embeddings(settings, now.bundle_ids | now.versions),
            "files": prune_version_files(settings, now.versions)}
