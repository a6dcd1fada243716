"""Precomputed user states: each signed-in user's query-tower state under a model bundle, written to the
Feast online store (feature service ``query_tower_state_v1``, keyed by user and model bundle).

A state depends only on the user's daily ``query_tower_v1`` features and the model, so it is computed once
per day and bundle instead of on each of the API's cache misses: a miss is then one online-store read
instead of the read, the featuriser and the history encoders (``user_state_miss`` in
benchmarks/results/api_costs.json). The daily DAG writes the serving bundle's states after each
materialisation and a newly promoted bundle's before its alias swap; after each swap the states of bundles
that no longer serve are pruned (``serving.retention``), so the online store holds a few bundles, not one
per day ever trained.

The states are computed from the rows the API itself reads (the online store, through
``Retriever.histories``) by the API's own code (``ModelBundle.user_states``): a stored state is the state the
API would have computed, and a test holds the two equal.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa

from feature_repo.store import delete_online_rows, get_store
from feature_repo.warehouse import (
    USER_STATES,
    USER_STATES_SCHEMA,
    latest_rows,
    version_keys,
    write_version,
)
from retrieval_core.errors import OperatorError
from retrieval_core.settings import Settings
from serving.bundle import ModelBundle
from serving.refresh import chosen_registration
from serving.retriever import Retriever, has_history

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)


class UserStatesNotRegistered(OperatorError, LookupError):
    """The registry predates the ``user_query_state`` view: nothing can be written until it is applied."""


@dataclass
class UserStatesReport:
    model_version: str
    bundle_id: str
    users: int
    personalized: int
    seconds: float


def materialised_user_ids(settings: Settings, store: FeatureStore, chunk_users: int) -> Iterator[list[int]]:
    """The users with a ``user_history`` row in the view's TTL window up to its last materialisation in
    ``store``, ``chunk_users`` at a time. Users outside it are still served: their state is computed on a miss."""
    view = store.get_feature_view("user_history")
    end = view.most_recent_end_time
    if end is None:  # never materialised: the online store holds no history
        return
    for chunk in latest_rows(settings, "user_history", "user_id", ["user_id"], end - view.ttl, end, chunk_users):
        yield chunk.column("user_id").to_pylist()


def publish_user_states(settings: Settings, model_version: str | None = None,
                        chunk_users: int = 256, bundle_id: str | None = None) -> UserStatesReport:
    """Compute every materialised user's state with ``model_version``'s registration (``chosen_registration``:
    default, the one serving) and write them to the online store and to the ``user_query_state`` source
    (replacing that bundle's earlier rows)."""
    start = time.perf_counter()
    version, bundle_id = chosen_registration(settings, model_version, bundle_id)
    bundle = ModelBundle.load(settings, version, bundle_id)
    store = get_store(settings)
    try:
        store.get_feature_view(USER_STATES)
    except Exception as exc:
        raise UserStatesNotRegistered(f"the feature view {USER_STATES!r} is not in the Feast registry ({exc}); "
                                      f"register it with `uer features apply` (the daily DAG's build_features "
                                      f"does) and run this again") from exc
    reader = Retriever(settings)  # the API's own online-store reader
    now = pd.Timestamp(dt.datetime.now(dt.UTC))
    tables, personalized = [], 0
    for user_ids in materialised_user_ids(settings, store, chunk_users):
        histories = reader.histories(user_ids)
        rows = [histories[u] for u in user_ids]
        states = bundle.user_states(rows)
        known = [has_history(row) for row in rows]
        tables.append(pa.table({"user_id": pa.array(user_ids, pa.int64()),
                                "model_bundle": [bundle.bundle_id] * len(user_ids),
                                "event_timestamp": pa.array([now] * len(user_ids), pa.timestamp("us", "UTC")),
                                "state": pa.array([states.row(i).flat() for i in range(len(user_ids))],
                                                  pa.list_(pa.float32())),
                                "personalized": known}, schema=USER_STATES_SCHEMA))
        personalized += sum(known)
    # The offline rows are the record of what is online (serving.retention prunes by them), so: first the
    # online rows of users who left the window, then the offline rows, then the online ones. A crash
    # anywhere leaves nothing online that the offline rows do not list.
    written = pa.concat_tables(tables) if tables else USER_STATES_SCHEMA.empty_table()
    left = set(version_keys(settings, USER_STATES, bundle.bundle_id, "user_id")) - set(
        written.column("user_id").to_pylist())
    delete_online_states(store, bundle.bundle_id, sorted(left))
    users = write_version(settings, USER_STATES, written, bundle.bundle_id)
    for table in tables:
        store.write_to_online_store(USER_STATES, table.to_pandas(types_mapper=pd.ArrowDtype))
    report = UserStatesReport(bundle.model_version, bundle.bundle_id, users, personalized,
                              round(time.perf_counter() - start, 3))
    log.info("wrote %d user states of %s (%d with a history) in %.1f s", users, bundle.bundle_id, personalized,
             report.seconds)
    return report


def delete_online_states(store: FeatureStore, bundle_id: str, user_ids: list[int]) -> None:
    """Delete these users' states under ``bundle_id`` from the online store."""
    if user_ids:
        delete_online_rows(store, USER_STATES, [{"user_id": u, "model_bundle": bundle_id} for u in user_ids])
