"""The index lifecycle in Milvus: one collection per index version, published by an atomic alias swap.

build (create, insert, index, wait until no row is pending, load, wait until every segment is served
from its index) → check (row count = catalogue, ANN recall@100 against exact search on a sample, a
smoke query) → mark checked → swap the alias → mark served →
prune (keep the previous ``keep_previous`` served collections for rollback; never drop a collection an
alias points to — Milvus would let us, and serving would break silently).

A crash at any step before the swap leaves the alias where it was; the half-built collection is not
marked checked, so it can never be swapped to, and a checked one that was never swapped in is no rollback
target: a prune removes either once it is older than the collection serving and than the setting
``milvus.unfinished_grace_s`` (younger, it may be the other DAG's publication in progress).

``publish`` can be given a ``still_wanted`` check, asked by ``swap`` just before the alias moves: the refresh uses
it to refuse a swap built on what has changed since it began (``serving.refresh.unchanged_since``), e.g. an
alias a promotion or a rollback moved meanwhile, which the swap would move back. ``PublicationSuperseded`` is
raised and the new collection dropped (as after any failed swap). What is left between that check and the alias
move is the check's own reads and one read of the alias, not a lock; the DAGs also queue their publishing tasks
on one Airflow pool slot.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from retrieval_core.errors import OperatorError
from retrieval_core.settings import Settings
from serving.engine import connect
from training.boosting import exact_top_k

log = logging.getLogger(__name__)

# Properties stored on each collection: they make the collection self-describing.
MODEL_VERSION, INDEX_VERSION, CREATED_AT, STATE = ("uer.model_version", "uer.index_version", "uer.created_at",
                                                   "uer.state")
# Which registration of its model version built the collection (``serving.bundle.bundle_id_of``): a day retrained
# under the same version name is registered again, with other towers, and only its own query tower fits its vectors.
BUNDLE_ID = "uer.bundle_id"
SCALAR_FIELDS = {"category_path": 256, "shop_country": 8, "currency": 8}  # VARCHAR fields, max length; + price
SMALL_SEGMENT_ROWS = 1024  # Milvus builds no vector index for a sealed segment smaller than this
# Queries per search call: on Milvus Lite a query costs ~20 ms at 20k rows, and 200 in one call outlasted the
# 5 s RPC timeout in a busy demo run (DEADLINE_EXCEEDED); the API's usual batches stay within one call.
MAX_QUERIES_PER_CALL = 32
# What to raise, per index type, when the ANN recall check refuses a collection.
RECALL_KNOBS = {"HNSW": "search_ef / hnsw_m", "IVF_FLAT": "search_nprobe", "SCANN": "search_nprobe / scann_reorder_k"}


class IndexCheckFailed(OperatorError, RuntimeError):
    """A new collection failed a check before publication; the alias was not touched."""


class AliasTargetMissing(OperatorError, RuntimeError):
    """The serving alias does not exist yet (nothing published) or points nowhere usable."""


class PublicationSuperseded(OperatorError, RuntimeError):
    """What a new collection was built for changed while it was built (``publish``'s ``still_wanted``)."""


# Asked by ``swap`` just before the alias moves: None, or why this publication must not swap after all.
StillWanted = Callable[["IndexLifecycle"], "str | None"]


# A collection's life (its STATE property): BUILDING until ``check`` passes, CHECKED until the alias first points
# to it, then SERVED. Only a SERVED one is a rollback or rollforward target: a CHECKED one older than what serves
# is a publication that crashed before its swap. Collections published before the SERVED state existed say
# "ready" (checked, and all but a crashed few served): read as SERVED.
BUILDING, CHECKED, SERVED = "building", "checked", "served"
# The price field's Milvus type (DOUBLE, as the catalogue's prices; FLOAT before, see ``build``).
PRICE_FIELD_TYPE = "DOUBLE"
LEGACY_STATES = {"ready": SERVED}


@dataclass(frozen=True)
class IndexVersion:
    collection: str
    model_version: str
    index_version: str
    created_at: str
    state: str
    bundle_id: str | None = None  # None: a collection built before BUNDLE_ID was recorded (its version's newest)
    # The collection's fields, where listed (``versions``): one built before a filter field existed lacks it.
    fields: frozenset[str] | None = field(default=None, compare=False)
    # Prices held as FLOAT (collections built before they were DOUBLE): a filter's bounds must be float32 values too.
    float32_prices: bool = field(default=False, compare=False)

    @property
    def ready(self) -> bool:
        """Checked: the alias may point to it."""
        return self.state in (CHECKED, SERVED)

    @property
    def served(self) -> bool:
        """The alias has pointed to it: what a rollback or rollforward may return to."""
        return self.state == SERVED


def index_version_for(model_version: str, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return f"{model_version}.{now:%Y%m%dT%H%M%S%f}"


def collection_name(prefix: str, index_version: str) -> str:
    """Milvus names allow letters, digits and underscores only."""
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', index_version)}"


class IndexLifecycle:
    """Create, check, publish, roll back and prune the product collections of one alias."""

    poll_s = 1.0  # seconds between polls of the index build and of the segment handoff

    def __init__(self, settings: Settings, client: object | None = None):
        self.settings, self.config = settings, settings.milvus
        self.client = client or connect(settings)
        self._raw_replies = True  # see search()

    # -- what exists ---------------------------------------------------------------------------------

    def versions(self) -> list[IndexVersion]:
        """Our collections, oldest first."""
        from pymilvus import DataType

        out = []
        for name in self.client.list_collections():
            if not name.startswith(self.config.collection_prefix + "_"):
                continue
            described = self.client.describe_collection(name)
            props = described.get("properties", {})
            if MODEL_VERSION not in props:
                continue
            state = props.get(STATE, BUILDING)
            fields = described.get("fields", [])
            out.append(IndexVersion(name, props[MODEL_VERSION], props[INDEX_VERSION], props[CREATED_AT],
                                    LEGACY_STATES.get(state, state), props.get(BUNDLE_ID),
                                    frozenset(f["name"] for f in fields),
                                    any(f["name"] == "price" and f.get("type") == DataType.FLOAT for f in fields)))
        return sorted(out, key=lambda v: v.created_at)

    def alias_target(self) -> str | None:
        """The collection name the alias points to, or None before the first publication."""
        if self.config.alias not in self.client.list_aliases().get("aliases", []):
            return None
        return self.client.describe_alias(self.config.alias)["collection_name"]

    def serving(self) -> IndexVersion | None:
        """The collection the alias points to, or None before the first publication."""
        if (target := self.alias_target()) is None:
            return None
        for version in self.versions():
            if version.collection == target:
                return version
        raise AliasTargetMissing(f"alias {self.config.alias!r} points to {target!r}, which is not one of ours")

    def _aliased(self, collection: str) -> list[str]:
        return self.client.list_aliases(collection_name=collection).get("aliases", [])

    # -- build and check -----------------------------------------------------------------------------

    def build(self, model_version: str, products: pd.DataFrame, vectors: np.ndarray,
              bundle_id: str | None = None) -> IndexVersion:
        """A new, loaded, fully indexed collection of ``vectors`` (not yet published), made by the registration
        ``bundle_id`` of ``model_version`` (None: unrecorded, the API then serves the version's newest)."""
        from pymilvus import DataType, MilvusClient

        index_version = index_version_for(model_version)
        name = collection_name(self.config.collection_prefix, index_version)
        created = dt.datetime.now(dt.UTC).isoformat()
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("product_id", DataType.INT64, is_primary=True)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=int(vectors.shape[1]))
        for scalar, length in SCALAR_FIELDS.items():
            schema.add_field(scalar, DataType.VARCHAR, max_length=length)
        # DOUBLE, as the catalogue's prices: a FLOAT field held 19.99 as 19.98999977, which a request's bound of
        # 19.99 (compared as a double) left out.
        schema.add_field("price", getattr(DataType, PRICE_FIELD_TYPE))
        params = self.client.prepare_index_params()
        params.add_index(field_name="embedding", index_type=self.config.index_type, metric_type="IP",
                         params=self.index_params(self.config.index_type, len(products)))
        self.client.create_collection(name, schema=schema, index_params=params)
        self.client.alter_collection_properties(name, properties={
            MODEL_VERSION: model_version, INDEX_VERSION: index_version, CREATED_AT: created, STATE: BUILDING,
            **({BUNDLE_ID: bundle_id} if bundle_id else {})})
        log.info("index %s: inserting %d products", name, len(products))
        ids = products["product_id"].to_numpy(np.int64)
        scalars = {f: products.get(f, pd.Series("", index=products.index)).fillna("").astype(str).str[:n].tolist()
                   for f, n in SCALAR_FIELDS.items()}
        price = pd.to_numeric(products.get("price"), errors="coerce").fillna(-1.0).to_numpy(np.float64)
        batch = self.config.insert_batch
        for start in range(0, len(ids), batch):
            stop = min(start + batch, len(ids))
            self.client.insert(name, [
                {"product_id": int(ids[i]), "embedding": vectors[i].tolist(), "price": float(price[i]),
                 **{f: scalars[f][i] for f in SCALAR_FIELDS}} for i in range(start, stop)])
        self.client.flush(name)
        self._wait_indexed(name, len(ids))
        self.client.load_collection(name)
        self.wait_served_from_index(name)
        return IndexVersion(name, model_version, index_version, created, BUILDING, bundle_id)

    def index_params(self, index_type: str, rows: int) -> dict:
        """Build parameters of ``index_type`` for a collection of ``rows`` vectors (IVF_FLAT: nlist ≈ 4·√rows;
        SCANN: nlist ≈ √rows, since each segment (~165k-340k rows at 1M) scans all its centroids per query
        before its codes).
        SCANN's with_raw_data (kept for re-scoring) is left at its default, true: Milvus 2.3.5 passes the
        value on as a string, which its index builder refuses ("should be a boolean")."""
        if index_type == "HNSW":
            return {"M": self.config.hnsw_m, "efConstruction": self.config.hnsw_ef_construction}
        if index_type == "IVF_FLAT":
            return {"nlist": max(1, min(4096, int(np.sqrt(rows) * 4)))}
        if index_type == "SCANN":
            return {"nlist": max(1, min(4096, int(np.sqrt(rows))))}
        return {}

    def _wait_indexed(self, name: str, rows: int, timeout_s: float = 1800.0) -> None:
        """Wait until every row is indexed: "Finished" alone can still have pending rows."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.client.describe_index(name, "embedding")
            if info.get("pending_index_rows", 0) == 0 and info.get("indexed_rows", rows) >= rows:
                return
            if time.monotonic() > deadline:
                raise IndexCheckFailed(f"{name}: index still has {info.get('pending_index_rows')} pending rows "
                                       f"after {timeout_s:.0f} s")
            time.sleep(self.poll_s)

    def wait_served_from_index(self, name: str, timeout_s: float = 900.0) -> float:
        """Seconds until the query node serves every flushed segment of ``name`` from its vector index.

        A Milvus server's ``load_collection`` can return while a freshly indexed segment is still served
        from its raw vectors (brute force: seen on 2.3.5, 1.0 measured vs 0.73 served at 100k rows) and its
        index is handed off seconds later; a recall check in that window measures exact search, not the
        index that will serve. Milvus Lite has no segments to hand off (it does not implement the call),
        so there is nothing to wait for."""
        if self.client.get_server_version().startswith("milvus_lite"):
            return 0.0
        from pymilvus.client.types import SegmentState

        start, served_since = time.monotonic(), []
        while time.monotonic() - start < timeout_s:
            loaded = self.client.list_loaded_segments(name)
            flushed = {s.segment_id for s in self.client.list_persistent_segments(name)
                       if s.state == SegmentState.Flushed}
            # A segment under the server's minimum for an index (1,024 rows) never gets one: brute force is its index.
            indexed = all(s.index_name or s.num_rows < SMALL_SEGMENT_ROWS for s in loaded)
            served = bool(loaded) and indexed and {s.segment_id for s in loaded} == flushed
            served_since = [*served_since, time.monotonic()] if served else []
            if len(served_since) >= 3:  # the same answer three polls running: no handoff in flight
                return round(served_since[0] - start, 1)
            time.sleep(self.poll_s)
        raise IndexCheckFailed(f"{name}: the query node still serves segments without the index after "
                               f"{timeout_s:.0f} s")

    def ensure_loaded(self, collection: str) -> None:
        from pymilvus.client.types import LoadState

        if self.client.get_load_state(collection).get("state") != LoadState.Loaded:
            self.client.load_collection(collection)

    def search(self, collection: str, queries: np.ndarray, k: int, expr: str = "") -> list[list[tuple[int, float]]]:
        """(product id, score) of the top ``k`` per query, best first; at most ``MAX_QUERIES_PER_CALL`` queries
        per call to Milvus."""
        return [row for start in range(0, len(queries), MAX_QUERIES_PER_CALL)
                for row in self._search_call(collection, queries[start:start + MAX_QUERIES_PER_CALL], k, expr)]

    def _search_call(self, collection: str, queries: np.ndarray, k: int, expr: str) -> list[list[tuple[int, float]]]:
        """One search call.

        The reply's id and score arrays are read as they come, from pymilvus's own request builder and gRPC
        stub (pinned by uv.lock): its public ``search`` wraps every hit in a ``Hit`` object the API does not
        use — 13 % of the API's GIL time at 150 requests/s (py-spy --gil). Its ``_async=True`` future avoids
        those but starts a gRPC channel-spin thread per call (client CPU per call, 600 calls ad hoc: public
        ~1.0 ms, async ~1.2 ms, this ~0.8 ms). A pymilvus without these internals falls back for good to
        the public call."""
        data, params = [q.tolist() for q in queries], {"params": self.search_params(k)}
        if self._raw_replies:
            try:
                from pymilvus.client.prepare import Prepare
                from pymilvus.client.utils import check_status

                stub = self.client._get_connection()._stub
                request = Prepare.search_requests_with_expr(
                    collection_name=collection, anns_field="embedding", param=params, limit=k, data=data,
                    expr=expr, partition_names=None, output_fields=None, round_decimal=-1,
                    use_default_consistency=True)
            except (ImportError, AttributeError, TypeError) as exc:
                log.warning("pymilvus internals changed (%s): searching through its public API", exc)
                self._raw_replies = False
            else:
                reply = stub.Search(request, timeout=self.config.timeout_s)
                check_status(reply.status)  # raises MilvusException with the server's reason
                ids, scores = list(reply.results.ids.int_id.data), list(reply.results.scores)
                rows, start = [], 0
                for topk in reply.results.topks:
                    rows.append(list(zip(ids[start:start + topk], scores[start:start + topk], strict=True)))
                    start += topk
                return rows
        hits = self.client.search(collection, data=data, limit=k, filter=expr, anns_field="embedding",
                                  search_params=params, timeout=self.config.timeout_s)
        return [list(zip(row.ids, row.distances, strict=True)) for row in hits]

    def search_params(self, k: int = 100, index_type: str | None = None) -> dict:
        """Search parameters for a top-``k`` search of ``index_type`` (default: the settings' index type).
        HNSW needs ef ≥ k and SCANN reorder_k ≥ k: a Milvus server refuses less."""
        index_type = index_type or self.config.index_type
        if index_type == "HNSW":
            return {"ef": max(self.config.search_ef, k)}
        if index_type == "IVF_FLAT":
            return {"nprobe": self.config.search_nprobe}
        if index_type == "SCANN":
            return {"nprobe": self.config.search_nprobe, "reorder_k": max(self.config.scann_reorder_k, k)}
        return {}

    def check(self, version: IndexVersion, product_ids: np.ndarray, vectors: np.ndarray,
              queries: np.ndarray | None = None, seed: int = 7) -> dict[str, float]:
        """Row count = catalogue, ANN recall@100 vs exact search ≥ the setting, and a smoke query."""
        count = int(self.client.query(version.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])
        if count != len(product_ids):
            raise IndexCheckFailed(f"{version.collection}: {count} rows, but the catalogue has {len(product_ids)}")
        if queries is None:  # products as stand-in queries (a searcher wanting something like this product)
            rng = np.random.default_rng(seed)
            queries = vectors[rng.choice(len(vectors), min(self.config.ann_check_queries, len(vectors)), False)]
        k = min(100, len(product_ids))
        exact = product_ids[exact_top_k(queries, vectors, k)]
        approx = self.search(version.collection, queries, k)
        recall = float(np.mean([len({p for p, _ in a} & set(e)) / k for a, e in zip(approx, exact, strict=True)]))
        if recall < self.config.min_ann_recall_at_100:
            raise IndexCheckFailed(f"{version.collection}: ANN recall@100 {recall:.3f} < "
                                   f"{self.config.min_ann_recall_at_100} (index {self.config.index_type}; raise "
                                   f"{RECALL_KNOBS.get(self.config.index_type, 'the index parameters')} in the "
                                   "milvus settings)")
        smoke = self.search(version.collection, queries[:1], 10)
        if len(smoke[0]) != min(10, len(product_ids)):
            raise IndexCheckFailed(f"{version.collection}: smoke query returned {len(smoke[0])} results")
        self.client.alter_collection_properties(version.collection, properties={STATE: CHECKED})
        return {"rows": count, "ann_recall_at_100": recall}

    # -- publish, roll back, prune -------------------------------------------------------------------

    def swap(self, version: IndexVersion, still_wanted: StillWanted | None = None) -> None:
        """Point the alias at ``version`` in one call (requests never see a missing alias), then mark it SERVED
        (after: a crash in between leaves a served collection unmarked, never an unserved one marked; the
        collection the alias leaves is marked too, which mends that). A reason from ``still_wanted``, asked just
        before the alias moves, refuses the swap (``PublicationSuperseded``)."""
        versions = {v.collection: v for v in self.versions()}
        current = versions.get(version.collection)
        if current is None or not current.ready:
            raise IndexCheckFailed(f"{version.collection} is not a checked, ready collection: refusing to publish")
        if still_wanted is not None and (reason := still_wanted(self)) is not None:
            raise PublicationSuperseded(f"{version.collection} (model {version.model_version}) was not published: "
                                        f"{reason}")
        if (target := self.alias_target()) is not None:
            leaving = versions.get(target)
            self.client.alter_alias(version.collection, self.config.alias)
            if leaving is not None and not leaving.served:
                self._mark_served(leaving)
        else:
            self.client.create_alias(version.collection, self.config.alias)
        if not current.served:
            self._mark_served(current)
        log.info("alias %s → %s", self.config.alias, version.collection)

    def _mark_served(self, version: IndexVersion) -> None:
        """Best effort: the alias has moved, so a failure here must not fail the publication (the mark is mended
        when the alias next leaves it)."""
        try:
            self.client.alter_collection_properties(version.collection, properties={STATE: SERVED})
        except Exception as exc:  # noqa: BLE001 - any engine error: the swap itself succeeded
            log.warning("could not mark %s as served (%s): it is no rollback target until the alias leaves it",
                        version.collection, exc)

    def publish(self, model_version: str, products: pd.DataFrame, vectors: np.ndarray,
                queries: np.ndarray | None = None, still_wanted: StillWanted | None = None,
                bundle_id: str | None = None) -> tuple[IndexVersion, dict[str, float]]:
        """Build, check, swap, prune. A failed check drops the new collection and leaves the alias; so does a
        swap that fails or is refused by ``still_wanted`` (``PublicationSuperseded``)."""
        version = self.build(model_version, products, vectors, bundle_id)
        try:
            checks = self.check(version, products["product_id"].to_numpy(np.int64), vectors, queries)
        except IndexCheckFailed:
            self.drop(version.collection)
            raise
        try:
            self.swap(version, still_wanted)
        except Exception:
            self._drop_unserved(version.collection)
            raise
        try:
            self.prune()
        except Exception as exc:  # noqa: BLE001 - the alias has moved: the publication stands, a retry would redo it
            log.warning("published %s, but pruning older collections failed (%s): the next publication prunes them",
                        version.collection, exc)
        return replace(version, state=SERVED), checks

    def rollback_target(self, forward: bool = False) -> tuple[IndexVersion, IndexVersion]:
        """The collection serving and the one to re-point the alias to, without moving anything: the newest
        collection older than it that has served, or with ``forward`` the oldest newer one that has served (what
        a rollback left, kept by ``prune``). Never one that was checked but not swapped in (a crashed
        publication, or one between its check and its swap)."""
        current = self.serving()
        if current is None:
            raise AliasTargetMissing(f"alias {self.config.alias!r} does not exist: nothing to roll back or forward")
        served = [v for v in self.versions() if v.served]
        if forward:
            newer = [v for v in served if v.created_at > current.created_at]
            if not newer:
                raise AliasTargetMissing(f"no later collection than {current.collection} that has served is kept")
            return current, newer[0]
        older = [v for v in served if v.created_at < current.created_at]
        if not older:
            raise AliasTargetMissing(f"no earlier collection than {current.collection} that has served is kept")
        return current, older[-1]

    def rollback(self, forward: bool = False) -> IndexVersion:
        """Re-point the alias to the newest collection older than the one serving that has served (``forward``:
        the oldest newer one)."""
        _, target = self.rollback_target(forward)
        self.swap(target)
        return target

    def _drop_unserved(self, collection: str) -> None:
        """After a failed or refused swap: drop the new collection unless the alias reached it after all (best
        effort: if Milvus is what failed, ``prune`` drops it once it is older than ``unfinished_grace_s``)."""
        try:
            if not self._aliased(collection):
                self.client.drop_collection(collection)
                log.warning("dropped %s: its publication did not swap the alias", collection)
        except Exception as exc:  # noqa: BLE001 - the swap's own error is the one to raise
            log.warning("could not drop %s after its swap failed (%s): a later prune will", collection, exc)

    def drop(self, collection: str) -> None:
        if self._aliased(collection):
            raise RuntimeError(f"refusing to drop {collection}: alias(es) {self._aliased(collection)} point to it")
        self.client.drop_collection(collection)

    def prune(self) -> list[str]:
        """Drop crashed builds and publications older than the serving collection (never served, and older than
        ``unfinished_grace_s``), and served ones beyond the newest ``keep_previous`` older than it. Never a
        collection an alias points to."""
        serving = self.serving()
        kept_served = 0
        dropped = []
        stale = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.config.unfinished_grace_s)
        for version in reversed(self.versions()):
            if self._aliased(version.collection):
                continue
            newer = serving is None or version.created_at > serving.created_at
            if newer:  # a build or publication in progress, or a newer served one after a rollback
                continue
            if not version.served and dt.datetime.fromisoformat(version.created_at) > stale:  # another DAG's, going
                continue
            if version.served and kept_served < self.config.keep_previous:
                kept_served += 1
                continue
            self.client.drop_collection(version.collection)
            dropped.append(version.collection)
        return dropped
