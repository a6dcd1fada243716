"""The retrieval logic behind the API, free of HTTP: request → user history (Feast online, TTL cache) →
query tower + boosting weights → Milvus search with safe filters → results.

Version consistency: the service follows the serving alias. When the alias moves, the bundle of the
model version that built the new collection is loaded first, then (model, collection) are swapped
together in one reference; requests in flight finish on the pair they started with, and search the
concrete collection, not the alias. If the new collection's model is not loadable, the old pair keeps
serving and the refusal is reported.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from cachetools import TTLCache
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from feature_repo.store import online_rows
from retrieval_core.settings import Settings
from serving.bundle import ModelBundle, ModelNotFound
from serving.engine import EngineUnavailable
from serving.filters import Filters
from serving.index import AliasTargetMissing, IndexLifecycle, IndexVersion
from training.featurizer import searchable_words
from training.model import PackedUserState, UserState

log = logging.getLogger(__name__)


def _has_searchable_words(query: str) -> str:
    # Such a query was served as if it were empty: results that answer nothing the caller typed, as a 200.
    if not searchable_words(query):
        raise ValueError("the query has no word the model can read: it reads letters a-z and digits 0-9 "
                         "(accents and fullwidth forms are folded to them), and punctuation or other scripts are "
                         "not searchable")
    return query


Query = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256),
                  AfterValidator(_has_searchable_words)]


class RetrievalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Query
    # strict: a JSON integer only (true was read as user 1, "10" and 10.0 as k 10)
    user_id: Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)] | None = None  # the raw data's int64
    k: Annotated[int, Field(ge=1, le=1000, strict=True)] = 100
    filters: Filters | None = None


class RetrievedItem(BaseModel):
    product_id: int
    score: float


class RetrievalResponse(BaseModel):
    model_version: str
    index_version: str
    personalized: bool  # the user's history was found and used
    results: list[RetrievedItem]


class Unavailable(RuntimeError):
    """A dependency (Milvus, the online store) or the model/index pair is not available right now."""


@dataclass(frozen=True)
class ServingPair:
    bundle: ModelBundle
    index: IndexVersion


StageTimer = Callable[[str, float], None]


class Retriever:
    def __init__(self, settings: Settings, on_stage: StageTimer | None = None,
                 on_cache: Callable[[bool], None] | None = None, on_miss: Callable[[str], None] | None = None):
        """``on_stage(stage, seconds)`` per stage of each call, ``on_cache(hit)`` per signed-in user looked up
        in the user-state cache, ``on_miss(source)`` per signed-in miss: ``stored`` (a precomputed state was
        read) or ``computed`` (from its ``query_tower_v1`` row)."""
        self.settings = settings
        self._pair: ServingPair | None = None
        self._lifecycle: IndexLifecycle | None = None
        self._lock = threading.Lock()
        self._history: TTLCache = TTLCache(settings.serving.history_cache_size, settings.serving.history_cache_ttl_s)
        self._history_lock, self._store_lock = threading.Lock(), threading.Lock()
        self._store = None
        self._bundles: dict[tuple[str, str | None], ModelBundle] = {}
        self.last_refusal: str | None = None
        self._on_stage = on_stage or (lambda stage, seconds: None)
        self._on_cache = on_cache or (lambda hit: None)
        self._on_miss = on_miss or (lambda source: None)

    # -- state -----------------------------------------------------------------------------------------

    @property
    def pair(self) -> ServingPair | None:
        return self._pair

    def lifecycle(self) -> IndexLifecycle:
        if self._lifecycle is None:
            with self._lock:
                if self._lifecycle is None:
                    try:
                        self._lifecycle = IndexLifecycle(self.settings)
                    except Exception as exc:
                        raise Unavailable(f"Milvus at {self.settings.milvus.uri} is unreachable: {exc}") from exc
        return self._lifecycle

    def reload(self) -> bool:
        """Follow the alias: load the model version that built its collection, then swap the pair.
        Returns True when the pair changed. Never drops a working pair for a broken one."""
        try:
            target = self.lifecycle().serving()
        except (Unavailable, EngineUnavailable, AliasTargetMissing) as exc:
            self.last_refusal = str(exc)
            return False
        except Exception as exc:  # a Milvus RPC error: keep serving what we have
            self.last_refusal = f"cannot read the serving alias from Milvus: {exc}"
            return False
        if target is None:
            self.last_refusal = f"nothing published under alias {self.settings.milvus.alias!r} yet"
            return False
        current = self._pair
        if current is not None and current.index.collection == target.collection:
            return False
        key = (target.model_version, target.bundle_id)  # the registration that built it, not only the version name
        try:
            bundle = self._bundles.get(key) or ModelBundle.load(self.settings, target.model_version, target.bundle_id)
        except ModelNotFound as exc:
            self.last_refusal = (f"index {target.index_version} was built by model {target.model_version}, which "
                                 f"cannot be loaded ({exc}); still serving "
                                 f"{current.index.index_version if current else 'nothing'}")
            log.error(self.last_refusal)
            return False
        self._bundles = {key: bundle}
        self._pair = ServingPair(bundle, target)
        self.last_refusal = None
        log.info("serving model %s with index %s", target.model_version, target.index_version)
        return True

    def ready(self) -> bool:
        pair = self._pair
        return pair is not None and pair.bundle.model_version == pair.index.model_version \
            and pair.index.bundle_id in (None, pair.bundle.bundle_id)

    def warm_up(self) -> None:
        """One signed-in request (a user id that cannot exist) through the whole path, when a pair is
        loaded, so that what the path builds on first use (the online store's reader, the search stub) is
        ready before the first real request. Unobserved: it is not traffic, so it counts in no stage
        latency and no cache miss (call it before traffic: its observers are off meanwhile). A failure (Milvus
        or the online store down) is logged, not raised."""
        if not self.ready():
            return
        observers = self._on_stage, self._on_cache, self._on_miss
        self._on_stage = self._on_cache = self._on_miss = lambda *_: None
        try:
            self.retrieve_rows([RetrievalRequest(query="warm up", user_id=2**62, k=10)])
        except Exception as exc:  # noqa: BLE001 - start anyway: requests get 503s until it recovers
            log.warning("warm-up request failed: %s", exc)
        finally:
            self._on_stage, self._on_cache, self._on_miss = observers

    # -- per request -----------------------------------------------------------------------------------

    def _feature_store(self):  # noqa: ANN202 - (feast.FeatureStore, {name: FeatureService})
        """The online store and the feature services the API reads, resolved once: a feature service is
        versioned by its name (a changed one is ``query_tower_v2``), and Feast turns a registry lookup into a
        new object on every call. ``allow_cache``: without it Feast re-reads its registry on every lookup,
        which also throws away its resolved-features cache (seen in a py-spy profile: most of a lookup's time).
        A store or registry that cannot be reached is ``Unavailable``."""
        if self._store is None:
            from feature_repo.store import get_store

            try:
                store = get_store(self.settings)
                services = {"query_tower_v1": store.get_feature_service("query_tower_v1", allow_cache=True)}
            except Exception as exc:
                raise self._store_failed(exc) from exc
            try:
                services["query_tower_state_v1"] = store.get_feature_service("query_tower_state_v1", allow_cache=True)
            except Exception as exc:  # noqa: BLE001 - a registry applied before it existed: compute every state
                log.warning("no precomputed user states: %s", exc)
            self._store = store, services
        return self._store

    def histories(self, user_ids: Sequence[int]) -> dict[int, dict]:
        """``query_tower_v1`` features per user from the online store (a row of None values for unknown
        users), uncached."""
        rows = self._online("query_tower_v1", [{"user_id": u} for u in user_ids])
        return dict(zip(user_ids, rows, strict=True))

    def stored_states(self, bundle: ModelBundle, user_ids: Sequence[int]) -> dict[int, tuple[PackedUserState, bool]]:
        """The users' states precomputed by ``bundle`` (``serving.user_states``) and younger than
        ``user_state_max_age_s``, with whether each user had a history; users without one are left out. None
        at all when ``serving.precomputed_user_states`` is off or the registry predates the feature service."""
        if not user_ids or not self.settings.serving.precomputed_user_states \
                or "query_tower_state_v1" not in self._feature_store()[1]:
            return {}
        rows = self._online("query_tower_state_v1",
                            [{"user_id": u, "model_bundle": bundle.bundle_id} for u in user_ids], timestamps=True)
        oldest = time.time() - self.settings.serving.user_state_max_age_s
        found = {}
        for user, row in zip(user_ids, rows, strict=True):
            if row["state"] is None or row["state__ts"] < oldest:
                continue
            try:
                state = PackedUserState.from_flat(row["state"], bundle.signed_out_state)
            except ValueError as exc:  # not this model's layout: compute the state instead
                log.warning("user %s: ignoring the state stored for %s: %s", user, bundle.bundle_id, exc)
                continue
            found[user] = state, bool(row["personalized"])
        return found

    def _online(self, service_name: str, entity_rows: list[dict], timestamps: bool = False) -> list[dict]:
        if not entity_rows:
            return []
        store, services = self._feature_store()
        try:
            with self._store_lock:  # one lookup at a time: the local profile shares one SQLite connection
                return online_rows(store, services[service_name], entity_rows, timestamps)
        except Exception as exc:
            raise self._store_failed(exc) from exc

    def _store_failed(self, exc: Exception) -> Unavailable:
        return Unavailable(f"the online feature store ({self.settings.online_store}) failed: {exc}")

    def user_states(self, bundle: ModelBundle, user_ids: Sequence[int | None]) -> tuple[UserState, list[bool]]:
        """The query tower's state of each user (None = signed out) under ``bundle``, one row per id, and
        whether the user has a history. On a miss, the state ``bundle`` precomputed (``stored_states``) when
        there is one, else computed from the user's ``query_tower_v1`` row. Cached for ``history_cache_ttl_s``
        per (bundle, user): a user's later requests skip the online store, the featuriser and the encoders."""
        version = bundle.bundle_id
        keys = [(version, user) for user in user_ids]
        found: dict[tuple[str, int | None], tuple[PackedUserState, bool]] = {}
        with self._history_lock:  # the service runs requests on several threads; TTLCache is not thread-safe
            for key in dict.fromkeys(keys):
                entry = self._history.get(key)
                if key[1] is not None:
                    self._on_cache(entry is not None)
                if entry is not None:
                    found[key] = entry
        missing = [user for _, user in dict.fromkeys(k for k in keys if k not in found)]
        signed_in = [u for u in missing if u is not None]
        stored = self.stored_states(bundle, signed_in)
        computed = [user for user in missing if user not in stored]
        online = self.histories([u for u in computed if u is not None])
        rows = [online.get(user, {}) if user is not None else {} for user in computed]
        states = bundle.user_states(rows) if computed else None
        with self._history_lock:
            for user, entry in stored.items():
                self._history[(version, user)] = found[(version, user)] = entry
            for i, (user, row) in enumerate(zip(computed, rows, strict=True)):
                self._history[(version, user)] = found[(version, user)] = (states.row(i), has_history(row))
        for user in signed_in:
            self._on_miss("stored" if user in stored else "computed")
        return UserState.stack([found[key][0] for key in keys]), [found[key][1] for key in keys]

    def query_vectors(self, bundle: ModelBundle, requests: Sequence[RetrievalRequest]) -> tuple[np.ndarray, list[bool]]:
        """The serving vectors of ``requests`` (query tower + boosting weights) and which were personalized."""
        if not requests:
            return np.zeros((0, bundle.dim), np.float32), []
        start = time.perf_counter()
        states, personalized = self.user_states(bundle, [r.user_id for r in requests])
        mark = time.perf_counter()
        self._on_stage("history", mark - start)
        vectors = bundle.query_vectors([{"query": r.query} for r in requests], states)
        self._on_stage("query_tower", time.perf_counter() - mark)
        return vectors, personalized

    def unfilterable(self, filters: Filters | None, pair: ServingPair | None = None) -> str | None:
        """Why the collection of ``pair`` (default: the one served now) cannot apply ``filters`` (it was built before
        a field they read was indexed, e.g. ``currency``), or None when it can."""
        pair = pair or self._pair
        fields = pair.index.fields if pair is not None else None
        missing = sorted(filters.fields() - fields) if filters is not None and fields is not None else []
        if not missing:
            return None
        return (f"the served index {pair.index.index_version} was built before {', '.join(missing)} was indexed, so "
                f"it cannot filter on it; the next refresh (or `uer index publish`) builds one that can")

    def retrieve(self, requests: Sequence[RetrievalRequest]) -> list[RetrievalResponse]:
        rows = self.retrieve_rows(requests)
        if refused := first_refusal(rows):
            raise refused
        return [RetrievalResponse.model_validate(row) for row in rows]

    def retrieve_rows(self, requests: Sequence[RetrievalRequest]) -> list[dict | Unavailable]:
        """What ``retrieve`` returns, as plain dicts of :class:`RetrievalResponse`'s shape: the API writes
        them to JSON as they are. Validating 100 results into a model cost 12 % of the API's GIL time at
        100 requests/s (py-spy); every value here is already an int, float or str of a known field. A request
        whose filters the served collection cannot apply gets its ``Unavailable`` in its place: the others of
        its batch (other callers' requests, coalesced) are still served."""
        pair = self._pair  # one snapshot for the whole call
        if pair is None or not self.ready():
            raise Unavailable("no model and index are loaded yet: " + (self.last_refusal or "starting"))
        refused = {i: Unavailable(reason) for i, request in enumerate(requests)
                   if request.filters is not None and (reason := self.unfilterable(request.filters, pair))}
        if not refused:
            return self._rows(pair, requests)
        served = [i for i in range(len(requests)) if i not in refused]
        rows = iter(self._rows(pair, [requests[i] for i in served]) if served else [])
        return [refused[i] if i in refused else next(rows) for i in range(len(requests))]

    def _rows(self, pair: ServingPair, requests: Sequence[RetrievalRequest]) -> list[dict]:
        """``retrieve_rows`` of requests that ``pair`` can all serve."""
        vectors, personalized = self.query_vectors(pair.bundle, requests)
        mark = time.perf_counter()
        results: list[list[tuple[int, float]]] = [[] for _ in requests]
        # one Milvus call per distinct (filter, k): the usual batch shares both
        groups: dict[tuple[str, int], list[int]] = {}
        for i, r in enumerate(requests):
            expr = r.filters.expression(float32_prices=pair.index.float32_prices) if r.filters else ""
            groups.setdefault((expr, r.k), []).append(i)
        lifecycle = self.lifecycle()
        for (expr, k), members in groups.items():
            try:
                hits = lifecycle.search(pair.index.collection, vectors[np.array(members)], k, expr)
            except Exception as first:
                # A restarted Milvus comes back with collections released: load and retry once.
                try:
                    lifecycle.ensure_loaded(pair.index.collection)
                    hits = lifecycle.search(pair.index.collection, vectors[np.array(members)], k, expr)
                except Exception as exc:
                    raise Unavailable(f"Milvus search failed ({self.settings.milvus.uri}): {exc}") from first
            for i, row in zip(members, hits, strict=True):
                results[i] = row
        self._on_stage("ann_search", time.perf_counter() - mark)
        return [{"model_version": pair.bundle.model_version, "index_version": pair.index.index_version,
                 "personalized": p, "results": [{"product_id": pid, "score": score} for pid, score in row]}
                for p, row in zip(personalized, results, strict=True)]


def first_refusal(rows: Sequence[dict | Unavailable]) -> Unavailable | None:
    """The first request's own refusal among ``Retriever.retrieve_rows``' rows, if any."""
    return next((row for row in rows if isinstance(row, Unavailable)), None)


def has_history(row: dict) -> bool:
    """Whether a ``query_tower_v1`` row holds anything (an unknown user's row is all None)."""
    return any(v not in (None, []) for v in row.values())


def smoke_query(settings: Settings, query: str = "gift", k: int = 10) -> dict:
    """One signed-out request through the same code as the API, against what the alias serves now."""
    retriever = Retriever(settings)
    if not retriever.reload() and retriever.pair is None:
        raise Unavailable(f"smoke query: nothing to serve ({retriever.last_refusal})")
    [response] = retriever.retrieve([RetrievalRequest(query=query, k=k)])
    if len(response.results) != k:
        raise Unavailable(f"smoke query returned {len(response.results)} results instead of {k}")
    return response.model_dump()
