"""The request coalescer behind /retrieve: concurrent requests share a handler call, each gets its own
result, and a failing batch fails every request in it (and only those)."""

from __future__ import annotations

import threading

import pytest

from serving.coalescer import Coalescer


def test_requests_queued_while_the_worker_is_busy_are_served_together() -> None:
    gate, calls = threading.Event(), []

    def handler(items: list[int]) -> list[int]:
        calls.append(list(items))
        gate.wait(5)
        return [i * 10 for i in items]

    coalescer = Coalescer(handler, max_batch=8, workers=1)
    try:
        first = coalescer.submit(0)
        while not calls:  # the worker is now inside the handler with [0]
            threading.Event().wait(0.001)
        rest = [coalescer.submit(i) for i in range(1, 6)]
        gate.set()
        assert [f.result(5) for f in [first, *rest]] == [0, 10, 20, 30, 40, 50]
        assert calls == [[0], [1, 2, 3, 4, 5]]
    finally:
        coalescer.close()


def test_a_batch_never_exceeds_max_batch() -> None:
    gate, sizes = threading.Event(), []

    def handler(items: list[int]) -> list[int]:
        sizes.append(len(items))
        gate.wait(5)
        return items

    coalescer = Coalescer(handler, max_batch=3, workers=1)
    try:
        futures = [coalescer.submit(i) for i in range(10)]
        gate.set()
        assert [f.result(5) for f in futures] == list(range(10))
        assert max(sizes) <= 3 and sum(sizes) == 10
    finally:
        coalescer.close()


def test_a_handler_error_reaches_every_request_of_its_batch_and_the_worker_survives() -> None:
    def handler(items: list[str]) -> list[str]:
        if "bad" in items:
            raise RuntimeError("milvus is down")
        return [s.upper() for s in items]

    coalescer = Coalescer(handler, max_batch=1, workers=1)
    try:
        with pytest.raises(RuntimeError, match="milvus is down"):
            coalescer.submit("bad").result(5)
        assert coalescer.submit("ok").result(5) == "OK"
    finally:
        coalescer.close()


def test_a_handler_returning_the_wrong_number_of_results_is_an_error() -> None:
    coalescer = Coalescer(lambda items: items[:-1], max_batch=4, workers=1)
    try:
        with pytest.raises(RuntimeError, match="0 results for 1 items"):
            coalescer.submit(1).result(5)
    finally:
        coalescer.close()


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        Coalescer(lambda items: items, max_batch=0)


def test_a_failing_batch_hook_fails_its_batch_but_not_the_worker() -> None:
    seen = []

    def hook(size: int) -> None:
        seen.append(size)
        if len(seen) == 1:
            raise RuntimeError("metrics backend broke")

    coalescer = Coalescer(lambda items: items, max_batch=1, workers=1, on_batch=hook)
    try:
        with pytest.raises(RuntimeError, match="metrics backend broke"):
            coalescer.submit(1).result(5)
        assert coalescer.submit(2).result(5) == 2
    finally:
        coalescer.close()


def test_an_exception_returned_as_a_result_fails_that_request_alone() -> None:
    """How /retrieve refuses one request of a batch (filters its collection cannot apply) and serves the rest."""
    gate = threading.Event()

    def handler(items: list[int]) -> list[int | Exception]:
        gate.wait(5)
        return [ValueError(f"item {i} refused") if i % 2 else i for i in items]

    coalescer = Coalescer(handler, max_batch=8, workers=1)
    try:
        futures = [coalescer.submit(i) for i in range(4)]
        gate.set()
        assert [futures[i].result(5) for i in (0, 2)] == [0, 2]
        for i in (1, 3):
            with pytest.raises(ValueError, match=f"item {i} refused"):
                futures[i].result(5)
    finally:
        coalescer.close()
