"""Coalesce concurrent single requests into batches for one handler call.

It serves ``/retrieve`` and each request of ``/retrieve_batch``. Why not BentoML's adaptive batching: its batched
endpoints take a list and return a list for all the calls merged, so they cannot answer one call with a 503 of its
own (its text, or one call's refusal failing only that call). Per request the costly parts — the query tower
forward pass and the Milvus search (one gRPC round trip, then a search of every segment) — cost nearly the same for
one query as for a few, so under load a batch of n pays them about once instead of n times.

Batching is *natural*: a worker takes whatever is queued when it becomes free (up to ``max_batch``),
so an idle service adds no waiting time, and batches grow only as requests pile up. With ``workers``
> 1 one batch can run its query tower while another waits on Milvus.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """``submit(item)`` → a Future of ``handler([... item ...])[i]``; the handler must return one result
    per item, in order. An exception from the handler fails every item of that batch with it; an exception
    returned as an item's result fails that item alone."""

    def __init__(self, handler: Callable[[list[Item]], Sequence[Result]], max_batch: int = 32,
                 workers: int = 2, name: str = "coalescer", on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be at least 1")
        self._handler, self._max_batch = handler, max_batch
        self._on_batch = on_batch or (lambda size: None)
        self._queue: queue.SimpleQueue[tuple[Item, Future] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"{name}-{i}") for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, item: Item) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def _take(self) -> list[tuple[Item, Future]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self._max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:  # closing: finish this batch, then let the next take() see the stop
                self._queue.put(None)
                break
            batch.append(nxt)
        return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                self._on_batch(len(live))  # inside the try: a failing hook must not kill the worker
                results = self._handler([item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"handler returned {len(results)} results for {len(live)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, future in live:
                    future.set_exception(exc)
                continue
            for (_, future), result in zip(live, results, strict=True):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
