"""The retrieval API (BentoML): ``POST /retrieve`` and ``POST /retrieve_batch``, batched together by the coalescer.

BentoML provides ``/livez``, ``/readyz`` (ready = a model and the index it built are loaded) and
``/metrics`` (Prometheus; ours: per-stage latency and history-cache hits). Start it with
``uer serve`` (binds 127.0.0.1 from the settings). Bad input → 400 with the field and the rule;
Milvus or the online store down → 503 with what failed, and the process keeps running; an alias
swap or a new model version is picked up without a restart.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import hmac
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

import bentoml
import orjson
from bentoml.exceptions import ServiceUnavailable
from pydantic import ConfigDict, Field
from starlette.responses import JSONResponse, Response
from threadpoolctl import threadpool_limits

from retrieval_core.settings import ServingSettings, get_settings
from serving.coalescer import Coalescer
from serving.filters import Filters
from serving.retriever import RetrievalRequest, RetrievalResponse, Retriever, Unavailable

log = logging.getLogger(__name__)


OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics")


class ApiKeyMiddleware:
    """When ``serving.api_key`` is set, every API route needs a matching ``X-API-Key`` header."""

    def __init__(self, app, api_key: str) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] == "http" and not scope["path"].startswith(OPEN_PATHS):
            given = dict(scope.get("headers", [])).get(b"x-api-key", b"")
            if not hmac.compare_digest(given, self.key):
                await send({"type": "http.response.start", "status": HTTPStatus.UNAUTHORIZED,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body",
                            "body": b'{"error": "missing or wrong X-API-Key header"}'})
                return
        await self.app(scope, receive, send)


API_ROUTES = ("/retrieve", "/retrieve_batch")


def _tracing(rate: float) -> dict:
    """BentoML's tracing config: with nothing sampled, the API routes skip the tracing middleware."""
    return {"sample_rate": rate, **({"excluded_urls": list(API_ROUTES)} if rate == 0 else {})}


class RetrieveInput(RetrievalRequest, bentoml.IODescriptor):
    """One retrieval request: the query, the signed-in user if any, how many products (k) and optional filters.
    Any other field is refused with a 400."""
    # Why a spec of its own: the input model BentoML infers from the signature ignores unknown fields, so a typo
    # such as ``userid`` or ``filter`` got signed-out or unfiltered results without the caller knowing.


class RetrieveBatchInput(bentoml.IODescriptor):
    """Many retrieval requests in one call (each with ``/retrieve``'s rules). Any other top-level field is refused with
    a 400, and so are an empty list and more than ``serving.batch_call_max_requests`` requests."""
    # Why a spec of its own: the one BentoML infers from the signature ignored unknown fields (a misspelt top-level
    # "filters" served the batch unfiltered), took an empty list, and had no length limit (10,000 requests of k 1000
    # meant ~50 s of the GIL and ~10 GB, stalling /retrieve in the same process).
    model_config = ConfigDict(extra="forbid")

    requests: list[RetrievalRequest] = Field(min_length=1, max_length=get_settings().serving.batch_call_max_requests)


@bentoml.service(name="unified_retrieval", traffic={"timeout": 30}, workers=get_settings().serving.workers,
                 logging={"access": {"enabled": get_settings().serving.access_log}},
                 tracing=_tracing(get_settings().serving.tracing_sample_rate))
class RetrievalService:
    def __init__(self) -> None:
        # prometheus_client is imported here, after BentoML set up its multiprocess metrics directory.
        from prometheus_client import Counter, Histogram

        self.settings = get_settings()
        stage = Histogram("uer_retrieval_stage_seconds", "Time per retrieval stage", ["stage"],
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
        cache = Counter("uer_history_cache_total", "User-history cache lookups", ["result"])
        misses = Counter("uer_user_state_misses_total", "User-state cache misses by the state's source: stored "
                         "(precomputed by `uer user-states`) or computed from query_tower_v1", ["source"])
        batch = Histogram("uer_retrieve_batch_size", "Requests of /retrieve and /retrieve_batch served together",
                          buckets=(1, 2, 4, 8, 16, 32, 64))
        gc_pause = Histogram("uer_gc_pause_seconds", "Pauses of Python's cyclic garbage collector (it holds "
                             "the GIL: every request waits)", ["generation"],
                             buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25))
        # Labelled children resolved once each: ``labels()`` per observation was ~2% of the GIL time under load.
        stage_of, cache_of = functools.cache(stage.labels), functools.cache(cache.labels)
        miss_of = functools.cache(misses.labels)
        self.retriever = Retriever(self.settings, on_stage=lambda s, t: stage_of(s).observe(t),
                                   on_cache=lambda found: cache_of("hit" if found else "miss").inc(),
                                   on_miss=lambda source: miss_of(source).inc())
        self.retriever.reload()
        serving = self.settings.serving
        self._coalescer = Coalescer(self._run, max_batch=serving.batch_max, workers=serving.batch_workers,
                                    name="retrieve", on_batch=batch.observe)
        self._stop = threading.Event()
        # What is loaded by now (libraries, the model) lives as long as the process: keep it out of the cyclic
        # GC's full collections. Each took 216-279 ms over that heap at 200 requests/s, the API's p99 (ad hoc,
        # timed with gc.callbacks); after the freeze they took 7-120 ms. One request first, so what the request
        # path imports and builds on first use (the online store's reader, the search stub) is frozen too.
        limit_compute_threads(self.settings.serving)
        self.retriever.warm_up()
        # Again after the warm-up: a BLAS limit holds only for the libraries loaded by then, and the request
        # path loads some on first use.
        limit_compute_threads(self.settings.serving)
        gc.collect()
        gc.freeze()
        pause_of = functools.cache(gc_pause.labels)
        self._gc_pauses = GcPauses(lambda generation, seconds: pause_of(generation).observe(seconds))
        gc.callbacks.append(self._gc_pauses.hook)
        threading.Thread(target=self._follow_alias, daemon=True, name="follow-alias").start()

    def _follow_alias(self) -> None:
        while not self._stop.wait(self.settings.serving.reload_interval_s):
            self._gc_pauses.flush()  # the pauses of an idle service reach /metrics too
            try:
                self.retriever.reload()
            except Exception:  # never let the watcher die: the next tick retries
                log.exception("reload failed")

    def __is_ready__(self) -> bool:
        return self.retriever.ready()

    def _run(self, requests: list[RetrievalRequest]) -> list[dict | Unavailable]:
        """Responses as plain dicts of RetrievalResponse's shape, or a request's own refusal
        (``Retriever.retrieve_rows``)."""
        self._gc_pauses.flush()
        if self.retriever.pair is None:
            self.retriever.reload()  # e.g. the first index was published after start-up
        try:
            return self.retriever.retrieve_rows(requests)
        except Unavailable as exc:
            raise ServiceUnavailable(str(exc)) from exc

    @bentoml.api(route="/retrieve", input_spec=RetrieveInput)
    async def retrieve(self, query: str, user_id: int | None = None, k: int = 100,
                       filters: Filters | None = None) -> RetrievalResponse:
        """Top-k products for one query, personalized by the user's history when ``user_id`` is known.
        Concurrent requests are served together (``serving.coalescer``): one query-tower pass, one search."""
        # BentoML validated the body against RetrieveInput, RetrievalRequest's own rules: no need to check again.
        return await self._answer([RetrievalRequest.model_construct(query=query, user_id=user_id, k=k,
                                                                    filters=filters)], one=True)

    @bentoml.api(route="/retrieve_batch", input_spec=RetrieveBatchInput)
    async def retrieve_batch(self, requests: list[RetrievalRequest]) -> list[RetrievalResponse]:
        """Many requests in one call, each answered as ``/retrieve`` would: they join the same coalescer, so they are
        served together with each other and with concurrent ``/retrieve`` requests."""
        # Why not BentoML's adaptive batching (batchable=True), as before: it merges concurrent calls into one
        # handler call whose output cannot carry an error per call, so one call's refusal (a filter the served
        # collection cannot apply) failed every call merged with it, and its 503s carried BentoML's generic text.
        return await self._answer(requests, one=False)

    async def _answer(self, requests: list[RetrievalRequest], one: bool) -> Response:
        """The JSON of each request's response (of one alone when ``one``), or a 503 that says what failed."""
        rows: list = []
        # A call's requests join the queue one batch's worth at a time: a /retrieve that arrives meanwhile waits behind
        # at most that much, not behind the whole call (256 requests are 8 batches).
        step = self.settings.serving.batch_max
        for start in range(0, len(requests), step):
            futures = [asyncio.wrap_future(self._coalescer.submit(request)) for request in requests[start:start + step]]
            # One request (every /retrieve) is awaited as it is: gather cost ~10 us more (ad hoc timeit), a hot path.
            rows += (await asyncio.gather(*futures, return_exceptions=True) if len(futures) > 1
                     else [await _outcome(futures[0])])
            if any(isinstance(row, BaseException) for row in rows[start:]):
                break
        for i, row in enumerate(rows):
            # BentoML hides the text of 5xx errors; the caller should learn which dependency is down.
            if isinstance(row, ServiceUnavailable):  # the whole batch's: a dependency is down
                return JSONResponse({"error": str(row)}, status_code=HTTPStatus.SERVICE_UNAVAILABLE)
            if isinstance(row, Unavailable):  # this request's alone (its filters)
                return JSONResponse({"error": str(row) if one else f"request {i} (counted from 0): {row}"},
                                    status_code=HTTPStatus.SERVICE_UNAVAILABLE)
            if isinstance(row, BaseException):
                raise row
        # Written as it is (orjson): the same JSON as RetrievalResponse's, without validating 100 results again.
        return Response(orjson.dumps(rows[0] if one else rows), media_type="application/json")


async def _outcome(future: asyncio.Future) -> object:
    """The future's result, or the exception it raised (as ``gather(..., return_exceptions=True)`` gives it)."""
    try:
        return await future
    except Exception as exc:  # noqa: BLE001 - handed back to the caller, which sorts them
        return exc


def limit_compute_threads(serving: ServingSettings) -> None:
    """The API process's torch intra-op threads and numpy's BLAS threads (``serving.torch_threads``,
    ``serving.blas_threads``: why in the settings). A BLAS limit applies to the libraries loaded by then."""
    import torch

    torch.set_num_threads(serving.torch_threads)
    threadpool_limits(limits=serving.blas_threads, user_api="blas")


class GcPauses:
    """Times the cyclic collector's pauses (``hook`` goes in ``gc.callbacks``) and hands them to
    ``observe(generation, seconds)`` later, in ``flush``, never from the hook itself.

    Why deferred: a collection starts wherever an allocation triggers it, also inside prometheus_client's
    multiprocess lock (a plain ``Lock``, held while a metric creates or writes its value, e.g. BentoML's
    middleware making a labelled gauge). Observing a metric from the hook there takes that lock again on
    the same thread: the whole API hung under load (py-spy: hook → ``Histogram.observe`` → ``inc`` inside
    ``labels()`` → ``MmapedValue.__init__``). The hook only appends to a deque, which takes no lock; it holds
    the last ``keep`` pauses between flushes."""

    def __init__(self, observe: Callable[[str, float], None], keep: int = 10_000):
        self._observe = observe
        self._pending: collections.deque[tuple[str, float]] = collections.deque(maxlen=keep)
        self._started = 0.0

    def hook(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pending.append((str(info["generation"]), time.perf_counter() - self._started))

    def flush(self) -> None:
        """Observe the pauses recorded before the call (any thread; each pause once). Those that observing
        itself causes wait for the next flush, so that a flush always ends."""
        for _ in range(len(self._pending)):
            try:
                generation, seconds = self._pending.popleft()
            except IndexError:  # another thread's flush took the rest
                return
            self._observe(generation, seconds)


if get_settings().serving.api_key is not None:
    RetrievalService.add_asgi_middleware(ApiKeyMiddleware,
                                         api_key=get_settings().serving.api_key.get_secret_value())
