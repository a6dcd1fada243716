"""The index lifecycle waits for a Milvus server's segment handoff before it measures recall.

On a Milvus server ``load_collection`` can return while a fresh segment is still served from raw vectors;
the publish check must not run in that window (it would measure exact search). The server's answers are
scripted here because the logic under test is ours: which answers count as "served from the index".
Milvus Lite (the tests' real engine) has no segments to hand off and does not implement these calls."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pymilvus.client.types import SegmentState

from retrieval_core.settings import Settings
from serving.index import IndexCheckFailed, IndexLifecycle


@dataclass
class Segment:
    segment_id: int
    index_name: str = ""
    state: SegmentState = SegmentState.Flushed
    num_rows: int = 50_000


class HandoffServer:
    """A Milvus 2.3-like server whose segments 1 and 2 get their index loaded after ``lag`` polls."""

    def __init__(self, lag: int, version: str = "v2.3.5"):
        self.lag, self.version, self.polls = lag, version, 0

    def get_server_version(self) -> str:
        return self.version

    def list_loaded_segments(self, name: str) -> list[Segment]:
        self.polls += 1
        indexed = "embedding_idx" if self.polls > self.lag else ""
        # segment 4 is too small for the server to index: brute force is all it will ever have
        return [Segment(1, "embedding_idx"), Segment(2, indexed), Segment(4, num_rows=300)]

    def list_persistent_segments(self, name: str) -> list[Segment]:
        return [Segment(1), Segment(2), Segment(3, state=SegmentState.Dropped), Segment(4, num_rows=300)]


def lifecycle_on(server: HandoffServer) -> IndexLifecycle:
    lifecycle = IndexLifecycle(Settings(), client=server)
    lifecycle.poll_s = 0.0
    return lifecycle


def test_waits_until_every_flushed_segment_is_served_from_its_index() -> None:
    server = HandoffServer(lag=5)
    lifecycle_on(server).wait_served_from_index("products_x", timeout_s=5.0)  # fails fast, not in 15 minutes
    # five polls saw segment 2 on raw vectors, then three agreeing polls with every segment indexed (the
    # small segment 4 never gets an index and does not hold the publish up)
    assert server.polls == 8


def test_a_handoff_that_never_ends_fails_the_publish_with_the_collection_named() -> None:
    with pytest.raises(IndexCheckFailed, match="products_x: the query node still serves segments without"):
        lifecycle_on(HandoffServer(lag=10**9)).wait_served_from_index("products_x", timeout_s=0.05)


def test_milvus_lite_has_no_handoff_to_wait_for() -> None:
    server = HandoffServer(lag=10**9, version="milvus_lite-3.2.2")
    assert lifecycle_on(server).wait_served_from_index("products_x") == 0.0
    assert server.polls == 0


def test_ivf_probes_come_from_the_settings() -> None:
    settings = Settings()
    settings.milvus.index_type, settings.milvus.search_nprobe = "IVF_FLAT", 96
    lifecycle = IndexLifecycle(settings, client=HandoffServer(lag=0))
    assert lifecycle.search_params() == {"nprobe": 96}
    assert lifecycle.index_params("IVF_FLAT", 1_000_000) == {"nlist": 4000}


def test_scann_reorders_at_least_k_candidates() -> None:
    settings = Settings()
    settings.milvus.index_type, settings.milvus.search_nprobe, settings.milvus.scann_reorder_k = "SCANN", 32, 150
    lifecycle = IndexLifecycle(settings, client=HandoffServer(lag=0))
    assert lifecycle.search_params(100) == {"nprobe": 32, "reorder_k": 150}
    assert lifecycle.search_params(500) == {"nprobe": 32, "reorder_k": 500}  # the server refuses reorder_k < k
    assert lifecycle.search_params(100, "HNSW") == {"ef": 100}  # another type's parameters, same settings
    assert lifecycle.index_params("SCANN", 1_000_000) == {"nlist": 1000}
