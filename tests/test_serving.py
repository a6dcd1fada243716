"""Serving: the Milvus index lifecycle, safe filters, train/serve consistency and the BentoML API,
against a real Milvus Lite server on loopback and the real Feast online store of the tiny world."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from retrieval_core.settings import PROJECT_ROOT, MilvusSettings, ServingSettings, Settings
from serving.filters import CATEGORY_PATTERN, Filters
from serving.index import (
    MAX_QUERIES_PER_CALL,
    AliasTargetMissing,
    IndexCheckFailed,
    IndexLifecycle,
    IndexVersion,
)
from serving.retriever import RetrievalResponse
from tests.serving_helpers import free_port, milvus_server, tiny_training_config, with_milvus

FIRST, SECOND = "serve-a", "serve-b"


@pytest.fixture(scope="module")
def served(tiny_features: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A trained, exported model version with its collection published under the alias."""
    from serving.refresh import refresh_index
    from training.stages import run_training

    settings = with_milvus(tiny_features.model_copy(
        update={"artifacts_dir": tmp_path_factory.mktemp("serving") / "artifacts"}), free_port())
    report = run_training(settings, tiny_training_config(), version=FIRST)
    assert report.promoted
    with milvus_server(settings):
        refresh_index(settings)
        yield settings


def lifecycle(settings: Settings) -> IndexLifecycle:
    return IndexLifecycle(settings)


def register_copy(settings: Settings, version: str) -> None:
    """``FIRST``'s weights as a version of its own, exported as the export step does: its bundle registered and
    its product embeddings written (a refresh refuses a version without them)."""
    from feature_repo.warehouse import EMBEDDINGS, copy_version
    from serving.bundle import ModelBundle, registered_bundle_id
    from training.export import register_model

    run = settings.artifacts_dir / "models" / FIRST
    tag = register_model(settings, version, run, run / "text_encoder")
    copy_version(settings, EMBEDDINGS, ModelBundle.load(settings, FIRST).bundle_id,
                 registered_bundle_id(settings, version, tag))


def publish_without_currency(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> IndexVersion:
    """A collection as built before ``currency`` was a scalar field (kept for a rollback, or serving right after an
    upgrade), published under the alias with the serving model."""
    from serving import index as index_module
    from serving.refresh import refresh_index

    monkeypatch.setattr(index_module, "SCALAR_FIELDS",
                        {name: length for name, length in index_module.SCALAR_FIELDS.items() if name != "currency"})
    try:
        return refresh_index(settings).index
    finally:
        monkeypatch.undo()


# -- filters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"category": ['kitchen" or product_id > 0 or category_path == "x']},
    {"category": ["a\\\" || 1==1"]},
    {"shop_country": ["US\" or true"]},
    {"shop_country": ["us"]},
    {"category_prefix": "home%' or 1"},
    {"category_prefix": "pets >"},  # a level never ends a path: it would match nothing
    {"price_min": -1, "currency": "USD"},
    {"price_min": 10, "price_max": 5, "currency": "USD"},
    {"price_max": float("nan"), "currency": "USD"},
    {"price_max": 20},  # a bare amount: in which currency?
    {"currency": "usd"},
    {"currency": 'USD" or true'},
    {"expr": "price > 0"},
    {"category": []},
    {"shop_country": []},
])
def test_filter_values_that_could_inject_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Filters(**bad)


def test_filter_expression_quotes_every_value() -> None:
    expr = Filters(category=["pets > collars", "art & craft"], shop_country=["US", "FR"], price_min=1.5,
                   price_max=20, currency="EUR").expression()
    assert expr == ('category_path in ["pets > collars", "art & craft"] and shop_country in ["US", "FR"] '
                    'and price >= 1.5 and price <= 20.0 and currency == "EUR"')
    assert Filters().expression() == ""
    # a listing without a price is indexed at -1: an upper bound alone must not match it
    assert Filters(price_max=20, currency="EUR").expression() == 'price >= 0.0 and price <= 20.0 and currency == "EUR"'
    # the node and what lies below it, never a sibling that merely starts with its name
    assert Filters(category_prefix="pets").expression() == (
        '(category_path == "pets" or (category_path >= "pets > " and category_path < "pets >!"))')


def test_categories_are_read_as_the_catalogue_stores_them() -> None:
    """dbt stores lower(trim(path)): "Jewelry > Necklaces " was accepted and matched nothing."""
    filters = Filters(category=[" Jewelry > Necklaces "], category_prefix="Pets ")
    assert filters.category == ["jewelry > necklaces"] and filters.category_prefix == "pets"
    rule = Filters.model_json_schema()["properties"]["category_prefix"]["anyOf"][0]
    assert rule["pattern"] == CATEGORY_PATTERN  # the OpenAPI schema says what is accepted


@pytest.mark.parametrize("body", ['{"query": "a", "k": true}', '{"query": "a", "k": "10"}', '{"query": "a", "k": 10.0}',
                                  '{"query": "a", "user_id": true}', '{"query": "a", "user_id": " 42 "}',
                                  '{"query": "a", "filters": {"price_max": "12.5", "currency": "USD"}}',
                                  '{"query": "a", "filters": {"price_max": true, "currency": "USD"}}'])
def test_numbers_must_be_json_numbers(body: str) -> None:
    """true was read as user 1 (someone else's personalised results), "10" and 10.0 as k 10."""
    from serving.retriever import RetrievalRequest

    with pytest.raises(ValidationError):
        RetrievalRequest.model_validate_json(body)


def test_user_ids_span_the_raw_datas_int64() -> None:
    from serving.retriever import RetrievalRequest

    assert RetrievalRequest.model_validate_json('{"query": "a", "user_id": 9223372036854775807}').user_id == 2**63 - 1
    with pytest.raises(ValidationError):
        RetrievalRequest.model_validate_json('{"query": "a", "user_id": 9223372036854775808}')


# -- index lifecycle -------------------------------------------------------------------------------------


def test_the_api_process_runs_numpy_blas_and_torch_on_the_configured_threads() -> None:
    """OpenBLAS spreads even a few-row product over every core and spins while it waits: on cores shared
    with Milvus that cost the API more CPU than the work (``ServingSettings.blas_threads``)."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from serving.service import limit_compute_threads

    before = torch.get_num_threads()
    with threadpool_limits(limits=2, user_api="blas"):  # restores this process's limits on the way out
        blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas, "numpy loaded no BLAS library"
        if not all(pool["num_threads"] == 2 for pool in blas):
            pytest.skip(f"this machine's BLAS cannot run on two threads: {blas}")
        try:
            limit_compute_threads(ServingSettings(torch_threads=1, blas_threads=1))
            assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before)


GC_UNDER_METRICS_LOCK = """
import gc
from prometheus_client import Gauge, Histogram
from serving.service import GcPauses

pauses = Histogram("gc_pauses", "pauses", ["generation"])
observed = []
recorder = GcPauses(lambda generation, seconds: (pauses.labels(generation).observe(seconds), observed.append(1)))
gc.callbacks.append(recorder.hook)
gauge = Gauge("last_request", "like BentoML's middleware gauges", ["endpoint"], multiprocess_mode="liveall")
gc.freeze()  # what the imports built: keeps each forced collection short
gc.set_threshold(1)  # a collection on (nearly) every allocation: also inside the metrics lock
for i in range(50):
    gauge.labels(str(i)).set(i)  # a new labelled child: its mmap key is built under the lock
    recorder.flush()
gc.set_threshold(700)
print("observed", len(observed))
"""


def test_gc_pauses_reach_the_metrics_without_deadlocking_the_process(tmp_path: Path) -> None:
    """The API hung under load: a collection started inside prometheus_client's multiprocess lock and the
    GC hook observed a histogram, taking the same lock on the same thread. Pauses are recorded by the
    hook and observed later (``GcPauses.flush``); with collections forced inside the lock, this finishes."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    try:
        run = subprocess.run([sys.executable, "-c", GC_UNDER_METRICS_LOCK], cwd=PROJECT_ROOT, env=env,
                             capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: observing a metric from gc.callbacks re-entered prometheus_client's lock")
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) > 0, run.stdout  # the pauses were observed, not dropped


def test_hnsw_search_asks_for_at_least_k_candidates() -> None:
    """A Milvus server refuses an HNSW search whose ef is below its limit: k up to 1000 must still work."""
    settings = Settings(milvus=MilvusSettings(index_type="HNSW", search_ef=100))
    index = IndexLifecycle(settings, client=object())  # no server: search_params is our own arithmetic
    assert index.search_params(10) == {"ef": 100}
    assert index.search_params(1000) == {"ef": 1000}


def test_published_index_matches_catalogue_and_filters_hold(served: Settings) -> None:
    from training.dataset import product_features

    index = lifecycle(served)
    current = index.serving()
    assert current is not None and current.model_version == FIRST and current.ready
    products = product_features(served, dt.datetime.now(dt.UTC))
    count = index.client.query(current.collection, filter="", output_fields=["count(*)"])[0]["count(*)"]
    assert count == len(products)
    category = products["category_path"].mode()[0]
    query = np.ones((1, index.client.describe_collection(current.collection)["fields"][1]["params"]["dim"]), np.float32)
    currency = products.loc[products["category_path"] == category, "currency"].mode()[0]
    hits = index.search(current.collection, query, 50,
                        Filters(category=[category], price_max=50, currency=currency).expression())
    allowed = set(products.loc[(products["category_path"] == category) & (products["price"] <= 50)
                               & (products["currency"] == currency), "product_id"])
    assert hits[0] and {pid for pid, _ in hits[0]} <= allowed
    assert {"category_path", "shop_country", "currency", "price"} <= current.fields


def test_a_category_prefix_matches_exactly_the_paths_that_start_with_it(served: Settings) -> None:
    """``_`` and the characters next to the prefix's last one are where a LIKE pattern or a string range goes
    wrong. The same probe on Milvus 2.3 and Milvus Lite: ``benchmarks/filter_engines.py``, whose result shows the
    LIKE pattern of before matching nothing on Milvus 2.3 for a prefix with ``_``."""
    from benchmarks.filter_engines import PATHS, PREFIXES, in_subtree, matching_rows

    rows = matching_rows(lifecycle(served).client,
                         {prefix: Filters(category_prefix=prefix).expression() for prefix in PREFIXES})
    assert rows == {prefix: sorted(p for p in PATHS if in_subtree(p, prefix)) for prefix in PREFIXES}
    assert "home decor" not in rows["home"] and "home > kitchenware" not in rows["home > kitchen"]


def test_price_bounds_are_inclusive_at_every_catalogue_price(served: Settings) -> None:
    """Prices were indexed as float32: 19.99 became 19.98999977, which a bound of 19.99 (a double) left out — about
    half of all cent prices at either bound. Every listing priced exactly at a bound is matched."""
    from training.dataset import product_features

    index = lifecycle(served)
    current = index.serving()
    products = product_features(served, dt.datetime.now(dt.UTC))
    currency = products["currency"].mode()[0]
    priced = products[products["currency"] == currency]
    prices = priced["price"].drop_duplicates().sample(40, random_state=0).tolist()
    for price in prices:  # a scalar query: what the filter matches, apart from any ANN recall
        rows = index.client.query(current.collection, output_fields=["product_id"],
                                  filter=Filters(price_min=price, price_max=price, currency=currency).expression())
        assert {row["product_id"] for row in rows} == set(priced.loc[priced["price"] == price, "product_id"]), price


def test_a_collection_that_holds_prices_as_float_still_matches_listings_priced_at_a_bound(
        served: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Collections built before prices were DOUBLE (kept for a rollback) hold them as FLOAT: there a bound is written
    as the float32 value the collection holds, and the retriever does so for such a collection."""
    from serving import index as index_module
    from serving.refresh import refresh_index
    from serving.retriever import RetrievalRequest, Retriever
    from training.dataset import product_features

    index = lifecycle(served)
    first = index.serving()
    monkeypatch.setattr(index_module, "PRICE_FIELD_TYPE", "FLOAT")
    old = refresh_index(served).index
    monkeypatch.undo()
    try:
        [listed] = [v for v in index.versions() if v.collection == old.collection]
        assert listed.float32_prices and not first.float32_prices
        products = product_features(served, dt.datetime.now(dt.UTC))
        currency = products["currency"].mode()[0]
        priced = products[products["currency"] == currency]
        missed = 0
        for price in priced["price"].drop_duplicates().sample(40, random_state=1).tolist():
            want = set(priced.loc[priced["price"] == price, "product_id"])
            bounds = Filters(price_min=price, price_max=price, currency=currency)
            rows = index.client.query(old.collection, filter=bounds.expression(float32_prices=True),
                                      output_fields=["product_id"])
            assert {row["product_id"] for row in rows} == want, price
            missed += {row["product_id"] for row in index.client.query(
                old.collection, filter=bounds.expression(), output_fields=["product_id"])} != want
        assert missed > 0  # written as doubles, bounds miss listings priced at them: what the flag is for
        retriever = Retriever(served)
        retriever.reload()
        assert retriever.pair.index.collection == old.collection and retriever.pair.index.float32_prices
        searched: list[str] = []
        original = index_module.IndexLifecycle.search
        monkeypatch.setattr(index_module.IndexLifecycle, "search",
                            lambda self, collection, queries, k, expr="": searched.append(expr) or original(
                                self, collection, queries, k, expr))
        retriever.retrieve([RetrievalRequest(query="mug", k=5, filters=Filters(price_max=19.99, currency="USD"))])
        assert searched == [Filters(price_max=19.99, currency="USD").expression(float32_prices=True)]
    finally:  # the module's later tests expect the one collection they started with
        index.swap(first)
        for version in index.versions():
            if version.collection != first.collection:
                index.drop(version.collection)


def test_a_collection_built_before_currency_was_indexed_refuses_currency_filters_and_serves_the_rest(
        served: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection kept from before ``currency`` was a field (a rollback can serve one) cannot apply a price or
    currency filter: the request gets a 503 that says so (Milvus's own error named no way out), the others are
    served; the next publication builds a collection that can."""
    from serving.refresh import refresh_index
    from serving.retriever import RetrievalRequest, Retriever, Unavailable

    index = lifecycle(served)
    first = index.serving()
    old = publish_without_currency(served, monkeypatch)
    try:
        retriever = Retriever(served)
        retriever.reload()
        assert retriever.pair.index.collection == old.collection and "currency" not in retriever.pair.index.fields
        priced = RetrievalRequest(query="mug", k=5, filters=Filters(price_max=1e6, currency="USD"))
        assert "was built before currency was indexed" in retriever.unfilterable(priced.filters)
        with pytest.raises(Unavailable, match="next refresh"):
            retriever.retrieve([priced])
        by_country = RetrievalRequest(query="mug", k=5, filters=Filters(shop_country=["US"]))
        assert len(retriever.retrieve([by_country])[0].results) == 5
        # in one batch (other callers' requests, coalesced): only the request it cannot filter is refused
        refused, answered = retriever.retrieve_rows([priced, by_country])
        assert isinstance(refused, Unavailable) and len(answered["results"]) == 5
        new = refresh_index(served).index
        retriever.reload()
        assert retriever.unfilterable(priced.filters) is None
        [response] = retriever.retrieve([priced])
        assert len(response.results) == 5  # US listings, all priced in USD
    finally:  # the module's later tests expect the one collection they started with
        index.swap(first)
        for version in index.versions():
            if version.collection != first.collection:
                index.drop(version.collection)
    assert new.collection != first.collection


def test_search_reads_the_raw_reply_as_pymilvus_would(served: Settings) -> None:
    """``IndexLifecycle.search`` reads Milvus's reply arrays itself: pymilvus's public result must agree, with
    and without a filter; a missing collection raises Milvus's own error (the retriever answers 503)."""
    from pymilvus import MilvusException

    index = lifecycle(served)
    current = index.serving()
    dim = index.client.describe_collection(current.collection)["fields"][1]["params"]["dim"]
    queries = np.random.default_rng(3).standard_normal((3, dim)).astype(np.float32)
    for expr in ("", Filters(price_max=50, currency="USD").expression()):
        raw = index.search(current.collection, queries, 20, expr)
        public = index.client.search(current.collection, data=[q.tolist() for q in queries], limit=20, filter=expr,
                                     anns_field="embedding", search_params={"params": index.search_params(20)})
        assert index._raw_replies, "the raw-reply path fell back to pymilvus's public one"
        assert [[pid for pid, _ in row] for row in raw] == [list(row.ids) for row in public]
        assert [[round(s, 4) for _, s in row] for row in raw] == [[round(s, 4) for s in row.distances]
                                                                 for row in public]
        assert all(len(row) == 20 for row in raw)
    # more queries than one call takes: every query answered, in order, as if searched alone
    many = np.random.default_rng(4).standard_normal((MAX_QUERIES_PER_CALL * 2 + 5, dim)).astype(np.float32)
    rows = index.search(current.collection, many, 5)
    assert len(rows) == len(many)
    assert [rows[i] for i in (0, MAX_QUERIES_PER_CALL, len(many) - 1)] == [
        index.search(current.collection, many[i:i + 1], 5)[0] for i in (0, MAX_QUERIES_PER_CALL, len(many) - 1)]
    with pytest.raises(MilvusException, match="not (found|exist)"):
        index.search("no_such_collection", queries, 5)


def test_failed_check_and_crash_mid_build_leave_the_alias_serving(served: Settings,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from serving import refresh

    index = lifecycle(served)
    before = index.serving()
    strict = served.model_copy(update={"milvus": served.milvus.model_copy(update={"min_ann_recall_at_100": 1.01})})
    with pytest.raises(IndexCheckFailed, match="ANN recall@100"):
        refresh.refresh_index(strict)
    assert index.serving() == before
    assert [v.collection for v in index.versions()] == [before.collection]  # the failed build was dropped

    def crash(self, name: str, rows: int, timeout_s: float = 0) -> None:  # noqa: ANN001
        raise KeyboardInterrupt("killed while indexing")

    monkeypatch.setattr(IndexLifecycle, "_wait_indexed", crash)
    with pytest.raises(KeyboardInterrupt):
        refresh.refresh_index(served)
    monkeypatch.undo()
    leftovers = [v for v in index.versions() if not v.ready]
    assert index.serving() == before and len(leftovers) == 1
    with pytest.raises(IndexCheckFailed, match="not a checked"):
        index.swap(leftovers[0])  # a half-built collection can never be published
    index.drop(leftovers[0].collection)  # a prune keeps it for hours (it could be another process's build)

    from pymilvus import MilvusClient

    def engine_error(*args: object, **kwargs: object) -> None:
        raise RuntimeError("alter_alias: engine unavailable")

    monkeypatch.setattr(MilvusClient, "alter_alias", engine_error)
    with pytest.raises(RuntimeError, match="engine unavailable"):
        refresh.refresh_index(served)
    monkeypatch.undo()
    assert index.serving() == before and [v.collection for v in index.versions()] == [before.collection]  # dropped


def test_swap_rollback_prune_and_never_drop_the_aliased(served: Settings) -> None:
    from serving.refresh import refresh_index

    index = lifecycle(served)
    first = index.serving()
    second = refresh_index(served).index
    third = refresh_index(served).index
    assert index.serving().collection == third.collection
    assert index.rollback().collection == second.collection == index.serving().collection
    assert index.rollback().collection == first.collection
    with pytest.raises(RuntimeError, match="refusing to drop"):
        index.drop(first.collection)
    assert index.prune() == []  # the newer ones are kept for roll-forward, the serving one is aliased
    index.swap(index.versions()[-1])
    fourth = refresh_index(served).index  # publishing prunes: serving + keep_previous older ones remain
    names = [v.collection for v in index.versions()]
    assert names[-1] == fourth.collection and len(names) == served.milvus.keep_previous + 1
    assert first.collection not in names


def test_a_publication_whose_prune_fails_still_stands_and_the_previous_collection_is_always_kept(
        served: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning runs after the alias moved: its failure must not fail the publication (a DAG retry would build and
    swap yet another collection). And at least one previous collection is kept: the running API searches the one
    the alias left until its next reload."""
    from pydantic import ValidationError as SettingsError

    from retrieval_core.settings import MilvusSettings
    from serving.refresh import refresh_index

    def engine_error(self: IndexLifecycle) -> list[str]:
        raise RuntimeError("drop_collection: engine unavailable")

    index = lifecycle(served)
    before = index.serving()
    monkeypatch.setattr(IndexLifecycle, "prune", engine_error)
    report = refresh_index(served)
    monkeypatch.undo()
    assert index.serving().collection == report.index.collection != before.collection
    with pytest.raises(SettingsError, match="keep_previous"):
        MilvusSettings(keep_previous=0)


def test_a_publication_that_crashed_before_its_swap_is_never_rolled_to_and_is_pruned(
        served: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked but never swapped in (the refresh died between its check and its swap): a rollforward used to
    reach it, and a rollback from a later publication too, though it never served and nobody chose it. A
    prune keeps it for a few hours (it may be the other DAG's publication in progress), then drops it. And a
    collection that served but died before it was marked is mended when the alias leaves it."""
    from typer.testing import CliRunner

    from retrieval_core import cli
    from serving import refresh
    from serving.index import CHECKED, STATE

    index = lifecycle(served)
    served_last = refresh.refresh_index(served).index

    def die(self: IndexLifecycle, version: object, still_wanted: object = None) -> None:
        raise KeyboardInterrupt("killed before the swap")  # not an Exception: publish does not drop the collection

    monkeypatch.setattr(IndexLifecycle, "swap", die)
    with pytest.raises(KeyboardInterrupt):
        refresh.refresh_index(served)
    monkeypatch.undo()
    [unswapped] = [v for v in index.versions() if v.created_at > served_last.created_at]
    assert unswapped.state == CHECKED and index.serving().collection == served_last.collection
    with pytest.raises(AliasTargetMissing, match="no later collection .* that has served"):
        index.rollback(forward=True)
    newest = refresh.refresh_index(served).index
    assert unswapped.collection in [v.collection for v in index.versions()]  # young: maybe still publishing
    impatient = served.model_copy(update={"milvus": served.milvus.model_copy(update={"unfinished_grace_s": 0.0})})
    # older than what serves, never served, no longer young: `uer index prune` drops it (as the next publication would)
    monkeypatch.setattr(cli, "get_settings", lambda: impatient)
    pruned = CliRunner().invoke(cli.app, ["index", "prune"])
    assert pruned.exit_code == 0 and f"dropped 1 collection(s): {unswapped.collection}\n" == pruned.output
    assert unswapped.collection not in [v.collection for v in index.versions()]
    # died after its swap, before its mark: marked when the alias leaves it, so a rollforward returns to it
    index.client.alter_collection_properties(newest.collection, properties={STATE: CHECKED})
    assert index.rollback().collection == served_last.collection
    assert index.rollback(forward=True).collection == newest.collection


def test_a_publication_does_not_undo_a_promotion_or_rollback_that_landed_while_it_built(
        served: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nightly refresh re-publishes the model that served when it began. If the alias moved while it built
    (the daily DAG published a promoted model, an operator rolled back), its swap used to move the alias back:
    the promotion or rollback silently undone. Now it is refused, its collection dropped, the alias left where
    it was moved to. A promotion's publication (an explicit version) swaps whatever the alias did, but not once
    production has moved (an operator rolled back), and the daily DAG's retry does not publish it again."""
    from serving import refresh
    from serving.index import PublicationSuperseded
    from training.gate import production_pointer, promote

    index = lifecycle(served)
    refresh.refresh_index(served)  # a served collection before the one serving, to roll back to
    started = index.serving()
    check = IndexLifecycle.check
    meanwhile: list = []  # what lands while the next build is being checked, and what it did

    def check_then_interfere(self: IndexLifecycle, version: IndexVersion, *args: object, **kwargs: object) -> dict:
        if meanwhile and callable(meanwhile[0]):
            meanwhile[0] = meanwhile[0]()
        return check(self, version, *args, **kwargs)

    monkeypatch.setattr(IndexLifecycle, "check", check_then_interfere)
    kept = {v.collection for v in index.versions()}
    meanwhile[:] = [lambda: IndexLifecycle(served).rollback().collection]
    with pytest.raises(PublicationSuperseded) as refused:
        refresh.refresh_index(served)
    assert f"moved from {started.collection} to {meanwhile[0]}" in str(refused.value)
    assert index.serving().collection == meanwhile[0] != started.collection  # the rollback stands
    assert {v.collection for v in index.versions()} == kept  # and the refused build is gone

    meanwhile[:] = [lambda: IndexLifecycle(served).rollback(forward=True).collection]
    promoted = refresh.refresh_index(served, FIRST).index  # explicit version: swaps whatever the alias did
    assert meanwhile[0] == started.collection and index.serving().collection == promoted.collection

    pointer = production_pointer(served.artifacts_dir / "models")
    saved = pointer.read_text()
    run = served.artifacts_dir / "models" / FIRST
    register_copy(served, "serve-rolled-back-to")
    try:
        meanwhile[:] = [lambda: promote(pointer.parent, "serve-rolled-back-to", run / "metrics.json")]
        rolled_back = f"production names serve-rolled-back-to, not {FIRST}"
        with pytest.raises(PublicationSuperseded, match=rolled_back):
            refresh.refresh_index(served, FIRST)
        monkeypatch.undo()
        assert index.serving().collection == promoted.collection
        kept = {v.collection for v in index.versions()}
        assert refresh.publish_promoted(served, FIRST) is None  # the DAG's retry: production is no longer FIRST
        assert {v.collection for v in index.versions()} == kept

        pointer.write_text(saved)  # and a rollback while the promotion's user states are being written
        from serving import user_states

        write_states = user_states.publish_user_states

        def states_then_rollback(*args: object, **kwargs: object) -> object:
            written = write_states(*args, **kwargs)
            promote(pointer.parent, "serve-rolled-back-to", run / "metrics.json")
            return written

        monkeypatch.setattr(user_states, "publish_user_states", states_then_rollback)
        with pytest.raises(PublicationSuperseded, match=rolled_back):
            refresh.publish_promoted(served, FIRST)
        monkeypatch.undo()
        assert index.serving().collection == promoted.collection and {v.collection for v in index.versions()} == kept
    finally:
        pointer.write_text(saved)
    published = refresh.publish_promoted(served, FIRST)
    assert published is not None and index.serving().collection == published.refresh.index.collection


def test_a_milvus_lite_server_of_another_data_directory_is_refused(served: Settings, tmp_path: Path) -> None:
    """The embedded server outlives the command that started it: another checkout configured for the same port
    must be told whose server it is, not quietly publish into (and serve from) this one's data directory."""
    from serving.engine import EngineUnavailable, connect, ensure_server

    assert ensure_server(served) is None  # its own server, already up: used as it is
    other = served.model_copy(update={"data_dir": tmp_path / "other-checkout"})
    whose = re.escape(str(served.data_dir / "milvus"))
    with pytest.raises(EngineUnavailable, match=f"another data directory \\({whose}\\)"):
        ensure_server(other)
    with pytest.raises(EngineUnavailable, match=whose):
        connect(other)
    assert not (tmp_path / "other-checkout").exists()  # nothing started or written for it
    assert lifecycle(served).serving() is not None  # and the first one's server still serves


def test_the_nightly_work_follows_what_serves_so_a_rollback_stays_rolled_back(served: Settings) -> None:
    """The nightly refresh and the user states maintain the model the alias serves, not the gate's production
    pointer: after ``rollback`` the next refresh re-publishes the rolled-back-to model (it used to publish
    production's, undoing the rollback). An alias on a model that is not registered falls back to production."""
    from serving.bundle import ModelBundle
    from serving.refresh import catalogue_with_encodings, refresh_index, serving_model_version
    from training.gate import production_pointer, promote

    index = lifecycle(served)
    pointer = production_pointer(served.artifacts_dir / "models")
    saved = pointer.read_text()
    run = served.artifacts_dir / "models" / FIRST
    register_copy(served, "serve-newer")
    try:
        refresh_index(served, "serve-newer")
        assert serving_model_version(served) == "serve-newer"
        promote(pointer.parent, "serve-newer", run / "metrics.json")  # as the gate does
        refresh_index(served)
        while index.serving().model_version == "serve-newer":
            index.rollback()
        assert serving_model_version(served) == FIRST
        assert refresh_index(served).model_version == FIRST  # production still names serve-newer

        bundle = ModelBundle.load(served, FIRST)
        products, _ = catalogue_with_encodings(served, bundle, dt.datetime.now(dt.UTC))
        index.publish("never-exported", products, bundle.product_vectors(products))
        assert serving_model_version(served) == "serve-newer"  # nothing loads "never-exported": production
        index.rollback()
    finally:
        pointer.write_text(saved)
    assert index.serving().model_version == FIRST


def test_a_day_retrained_under_its_version_name_is_served_with_the_towers_that_built_its_collection(
        served: Settings) -> None:
    """A day retrained under the same version name (an Airflow clear) is registered again, with other towers. Each
    collection records the registration that built it, and the API serves it with that one's query tower: the
    retriever used to keep the bundle it held for the name (the old query tower against the new product vectors),
    and a rollback would have paired the first collection with the newest registration. A collection whose
    registration is gone is refused, and the pair serving stays."""
    from feature_repo.warehouse import EMBEDDINGS, version_rows
    from serving.bundle import ModelBundle, delete_registration, registrations
    from serving.refresh import refresh_index, with_version_encodings
    from serving.retention import prune_user_states
    from serving.retriever import Retriever
    from serving.user_states import publish_user_states
    from training.dataset import product_features
    from training.export import register_model
    from training.stages import publish_product_embeddings

    index = lifecycle(served)
    home = index.serving()
    run = served.artifacts_dir / "models" / FIRST
    register_copy(served, "serve-twice")
    first = ModelBundle.load(served, "serve-twice")
    reader = Retriever(served)
    try:
        refresh_index(served, "serve-twice")
        assert reader.reload() and reader.ready()
        assert reader.pair.bundle.bundle_id == reader.pair.index.bundle_id == first.bundle_id
        register_model(served, "serve-twice", run, run / "text_encoder")  # the day retrained
        again = ModelBundle.load(served, "serve-twice")
        assert again.bundle_id != first.bundle_id
        # … and exported: its graph is another (here each vector negated) under the same version name
        exported = version_rows(served, EMBEDDINGS, first.bundle_id, ["product_id", "graph_embedding"]).to_pandas()
        graph_of_first = {p: list(g) for p, g in zip(exported["product_id"], exported["graph_embedding"],
                                                     strict=True) if g is not None}
        publish_product_embeddings(served, exported.assign(graph_embedding=[
            None if g is None else -np.asarray(g) for g in exported["graph_embedding"]]), again.bundle_id)
        refresh_index(served, "serve-twice")
        assert reader.reload() and reader.ready()
        assert reader.pair.bundle.bundle_id == reader.pair.index.bundle_id == again.bundle_id

        index.rollback()  # to the first registration's collection
        assert reader.reload() and reader.ready()
        assert reader.pair.bundle.bundle_id == reader.pair.index.bundle_id == first.bundle_id
        # the nightly work follows that registration too (it used to rebuild with the version's newest), and
        # retention keeps the states of the registration serving (it kept only the newest's)
        assert publish_user_states(served).bundle_id == first.bundle_id
        assert first.bundle_id not in prune_user_states(served)
        assert refresh_index(served).index.bundle_id == first.bundle_id
        # with the first registration's own graph encodings: rows keyed by version, the retrained day's export
        # had replaced them and this rebuild took the second graph's vectors for the first model's tower
        rebuilt, _, _ = with_version_encodings(served, first, product_features(served, dt.datetime.now(dt.UTC)))
        assert {p: list(g) for p, g in zip(rebuilt["product_id"], rebuilt["graph_embedding"], strict=True)
                if g is not None} == graph_of_first
        assert reader.reload() and reader.pair.bundle.bundle_id == first.bundle_id
        index.rollback()  # back past it, to the second registration's collection: serving it again, then …
        [gone] = [r for r in registrations(served) if r.path == again.path]
        delete_registration(served, gone)
        # … its registration is gone: refused, the pair serving stays
        assert not reader.reload() and reader.pair.bundle.bundle_id == first.bundle_id and reader.ready()
        assert again.bundle_id in reader.last_refusal
    finally:  # FIRST serves again (its earlier collection may have been pruned by now), and serve-twice goes
        if index.serving().model_version != home.model_version:
            refresh_index(served, home.model_version)
        for version in index.versions():
            if version.model_version == "serve-twice":
                index.drop(version.collection)
        for registration in registrations(served):
            if registration.model_version == "serve-twice":
                delete_registration(served, registration)
        prune_user_states(served)  # its states too: no bundle of it is live any more
    assert index.serving().model_version == FIRST


def test_a_promotion_that_was_never_published_awaits_publication(served: Settings) -> None:
    """The daily DAG publishes, besides what its run promoted, its day's version when production names it and no
    collection serves it: an earlier run of the day promoted it and its publication failed, and the rerun's gate
    refused its own model (it then used to keep serving the previous model while production named this one)."""
    from serving.refresh import awaiting_publication
    from training.gate import production_pointer, promote

    pointer = production_pointer(served.artifacts_dir / "models")
    saved = pointer.read_bytes()
    assert not awaiting_publication(served, FIRST)  # production, and the alias serves it
    register_copy(served, "serve-unpublished")
    assert not awaiting_publication(served, "serve-unpublished")  # registered, but not production
    try:
        promote(pointer.parent, "serve-unpublished", served.artifacts_dir / "models" / FIRST / "metrics.json")
        assert awaiting_publication(served, "serve-unpublished")
    finally:
        pointer.write_bytes(saved)


def test_a_rollback_to_an_earlier_registration_of_a_version_moves_production_to_it(
        served: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A day retrained under its version name and promoted again: a rollback to the first registration's collection
    used to leave production naming just the version (read as its newest registration), so the day's rerun found
    it "awaiting publication" and published the newer one again, undoing the rollback, and the gate compared with
    the second's metrics. The pointer now records the registration: a rollback moves it (with that registration's
    metrics), a publication built meanwhile does not swap, and a publication publishes production's registration."""
    import json

    from typer.testing import CliRunner

    from retrieval_core import cli
    from serving.bundle import ModelBundle, delete_registration, registrations
    from serving.refresh import (
        awaiting_publication,
        chosen_registration,
        publish_promoted,
        refresh_index,
        roll_back,
        serving_registration,
        unchanged_since,
    )
    from serving.retention import live, prune_user_states
    from training.gate import pointer_bundle_id, production_metrics, production_pointer, promote, read_pointer

    index = lifecycle(served)
    models = served.artifacts_dir / "models"
    pointer = production_pointer(models)
    saved = pointer.read_bytes()
    day = "serve-day"
    metrics = {}
    for run in ("first", "second"):  # each promotion's own evaluation
        metrics[run] = json.loads((models / FIRST / "metrics.json").read_text()) | {"run": run}
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.json").write_text(json.dumps(metrics[run]))
    try:
        register_copy(served, day)
        first = ModelBundle.load(served, day).bundle_id
        promote(models, day, tmp_path / "first" / "metrics.json", {"bundle_id": first})
        assert publish_promoted(served, day).refresh.index.bundle_id == first
        register_copy(served, day)  # the day retrained, and promoted again
        second = ModelBundle.load(served, day).bundle_id
        promote(models, day, tmp_path / "second" / "metrics.json", {"bundle_id": second})
        assert second != first and awaiting_publication(served, day)
        assert publish_promoted(served, day).refresh.index.bundle_id == second
        assert not awaiting_publication(served, day)

        promote(models, day, tmp_path / "second" / "metrics.json")  # as written before pointers named registrations
        publishing_second = unchanged_since(served, day)  # a publication of the second, taken before the rollback
        target, said = roll_back(served)
        assert target.bundle_id == index.serving().bundle_id == first
        assert pointer_bundle_id(read_pointer(models)) == first and f"production {second} → {first}" in said
        assert production_metrics(models) == metrics["first"]  # the gate compares with what serves
        assert f"production names {first}, not {second}" in publishing_second(index)  # it would not swap
        assert not awaiting_publication(served, day)  # a rerun of the day leaves the rollback be
        assert serving_registration(served) == chosen_registration(served, day) == (day, first)  # `uer index publish`
        monkeypatch.setattr(cli, "get_settings", lambda: served)
        status = CliRunner().invoke(cli.app, ["index", "status"])
        assert status.exit_code == 0 and f"production: {day}  bundle={first}\n" in status.output

        index.rollback(forward=True)  # the alias alone back on the second's collection: production names the first
        assert awaiting_publication(served, day)
        assert "awaiting publication" in CliRunner().invoke(cli.app, ["index", "status"]).output
        # nightly refreshes of what serves until the first's collection is pruned: production's registration stays
        # live (retention keeps its product embeddings and user states for its publication)
        refreshes = 0
        while first in {version.bundle_id for version in index.versions()}:
            assert refresh_index(served).index.bundle_id == second
            refreshes += 1
        assert refreshes > 0 and first in live(served).bundle_ids
        assert publish_promoted(served, day).refresh.index.bundle_id == first
    finally:
        pointer.write_bytes(saved)
        if index.serving().model_version != FIRST:
            refresh_index(served, FIRST)
        for version in index.versions():
            if version.model_version == day:
                index.drop(version.collection)
        for registration in registrations(served):
            if registration.model_version == day:
                delete_registration(served, registration)
        prune_user_states(served)
    assert index.serving().model_version == FIRST


def test_a_rollback_makes_the_served_model_production_so_the_next_gate_compares_with_it(served: Settings,
                                                                                      tmp_path: Path) -> None:
    """``uer index rollback`` used to move only the alias: the gate's production pointer kept naming the model
    taken out of service, so the next training run was gated against (and evaluated beside) that one. Now
    production follows the rollback (and ``rollforward``, which undoes it) to a model that was promoted before
    (its metrics kept beside the version, wherever the run left them: a KFP run's are under its pipeline root),
    and stays, saying why, for a model without a bundle or never promoted."""
    import json

    from serving.bundle import ModelBundle
    from serving.refresh import catalogue_with_encodings, refresh_index, roll_back
    from training.gate import production_metrics, production_pointer, promote

    models = served.artifacts_dir / "models"
    pointer = production_pointer(models)
    saved = pointer.read_text()
    run = models / FIRST
    for version in ("serve-later", "serve-untried"):
        register_copy(served, version)
    later_metrics = json.loads((run / "metrics.json").read_text()) | {"run": "serve-later"}
    kfp_metrics = tmp_path / "evaluate-op" / "metrics"  # as a KFP run leaves them
    kfp_metrics.parent.mkdir()
    kfp_metrics.write_text(json.dumps(later_metrics))
    try:
        refresh_index(served, "serve-later")
        promote(models, "serve-later", kfp_metrics)  # as the gate does
        kfp_metrics.unlink()  # the pipeline root may be cleaned up: production keeps its own copy
        refresh_index(served, FIRST)
        promote(models, FIRST, run / "metrics.json")

        target, said = roll_back(served)
        assert target.model_version == lifecycle(served).serving().model_version == "serve-later"
        assert json.loads(pointer.read_text())["version"] == "serve-later"
        assert json.loads(pointer.read_text())["rolled_back_from"] == FIRST
        assert production_metrics(models) == later_metrics
        assert f"production {FIRST} → serve-later" in said

        target, said = roll_back(served, forward=True)  # `uer index rollforward`: the rollback undone
        assert target.model_version == lifecycle(served).serving().model_version == FIRST
        assert json.loads(pointer.read_text())["version"] == FIRST
        assert json.loads(pointer.read_text())["rolled_forward_from"] == "serve-later"
        assert f"production serve-later → {FIRST}" in said
        with pytest.raises(AliasTargetMissing, match="no later collection .* that has served"):
            roll_back(served, forward=True)

        bundle = ModelBundle.load(served, FIRST)
        products, _ = catalogue_with_encodings(served, bundle, dt.datetime.now(dt.UTC))
        lifecycle(served).publish("never-exported", products, bundle.product_vectors(products))
        promote(models, "never-exported", run / "metrics.json")  # its metrics kept, but no bundle to serve
        refresh_index(served, FIRST)
        promote(models, FIRST, run / "metrics.json")
        target, said = roll_back(served)  # onto an index whose model has no bundle: production stays
        assert target.model_version == "never-exported"
        assert json.loads(pointer.read_text())["version"] == FIRST
        assert said.startswith(f"production stays {FIRST}: never-exported has no registered bundle")

        refresh_index(served, "serve-untried")  # published by hand, never through the gate
        refresh_index(served, FIRST)
        target, said = roll_back(served)
        assert target.model_version == "serve-untried"
        assert json.loads(pointer.read_text())["version"] == FIRST
        assert "serve-untried has no registered bundle or was never promoted" in said
    finally:
        pointer.write_text(saved)
        refresh_index(served, FIRST)  # the alias back on production's model for the tests after this one
    assert lifecycle(served).serving().model_version == FIRST


def test_a_rollback_that_fails_half_way_leaves_alias_and_production_as_they_were(
        served: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollback moves two things, production's pointer and the alias. It used to move the alias first, so a
    pointer that could not be written (a full disk) left the alias rolled back and production not, and running
    the rollback again went one more collection back. Now the pointer moves first and is put back when the
    alias cannot move (Milvus down); either failure leaves both as they were."""
    import json

    import serving.refresh
    from serving.refresh import refresh_index, roll_back
    from training.gate import production_pointer, promote

    models = served.artifacts_dir / "models"
    pointer = production_pointer(models)
    saved = pointer.read_bytes()
    run = models / FIRST
    register_copy(served, "serve-earlier")
    try:
        refresh_index(served, "serve-earlier")
        promote(models, "serve-earlier", run / "metrics.json")
        refresh_index(served, FIRST)
        promote(models, FIRST, run / "metrics.json")
        before = pointer.read_bytes()
        serving_collection = lifecycle(served).serving().collection

        def milvus_down(self: IndexLifecycle, version: object) -> None:
            raise ConnectionError("milvus unreachable")

        with monkeypatch.context() as patch:
            patch.setattr(IndexLifecycle, "swap", milvus_down)
            with pytest.raises(ConnectionError):
                roll_back(served)
        assert pointer.read_bytes() == before and lifecycle(served).serving().collection == serving_collection

        def disk_full(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(serving.refresh, "promote", disk_full)
            with pytest.raises(OSError, match="No space"):
                roll_back(served)
        assert pointer.read_bytes() == before and lifecycle(served).serving().collection == serving_collection

        target, _ = roll_back(served)  # and with nothing failing, both move once
        assert target.model_version == lifecycle(served).serving().model_version == "serve-earlier"
        assert json.loads(pointer.read_text())["version"] == "serve-earlier"
    finally:
        pointer.write_bytes(saved)
        refresh_index(served, FIRST)
    assert lifecycle(served).serving().model_version == FIRST

# -- train/serve consistency ----------------------------------------------------------------------------


def test_service_and_training_code_give_the_same_query_vector(served: Settings) -> None:
    """Online history through the service's path == offline history through training's path."""
    from feature_repo.store import get_store
    from serving.bundle import ModelBundle
    from serving.retriever import RetrievalRequest, Retriever
    from training.boosting import augment
    from training.stages import _query_vectors, load_projection

    bundle = ModelBundle.load(served, FIRST)
    retriever = Retriever(served)
    users = [1, 2, 3, 10**9]
    online = retriever.histories(users)
    requests = [RetrievalRequest(query="rustic oak side table", user_id=u) for u in users]
    feast = get_store(served)
    # the online store holds the rows as of the end of its last materialisation (other tests may add days)
    materialized_until = feast.get_feature_view("user_history").most_recent_end_time
    offline = feast.get_historical_features(
        entity_df=pd.DataFrame({"user_id": users, "event_timestamp": materialized_until}),
        features=feast.get_feature_service("query_tower_v1")).to_df().set_index("user_id").loc[users]
    offline = offline.reset_index().assign(query="rustic oak side table")
    served_vectors, personalized = retriever.query_vectors(bundle, requests)  # the API's path (cache empty)
    p = np.zeros((1, bundle.model.config.embedding_dim), np.float32)
    _, trained = augment(p, np.zeros((1, len(bundle.boost_weights)), np.float32),
                         _query_vectors(bundle.model, offline), bundle.boost_weights, load_projection(bundle.path))
    assert any(online[u]["recent_queries"] for u in users[:3])  # real histories were compared
    np.testing.assert_allclose(served_vectors, trained, rtol=1e-5, atol=1e-6)
    assert any(personalized[:3]) and personalized[3] is False  # 10**9 is no user
    # Cached user states (now every user is cached), in another order beside a signed-out request: same
    # vectors, and the online store is not asked again.
    retriever._feature_store = lambda: pytest.fail("a cached user's history was looked up again")
    mixed = [requests[2], RetrievalRequest(query="rustic oak side table"), requests[0], requests[3], requests[1]]
    again, _ = retriever.query_vectors(bundle, mixed)
    np.testing.assert_allclose(again[[2, 4, 0, 3]], trained, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again[1], bundle.query_vectors([{"query": "rustic oak side table"}])[0], rtol=1e-5,
                               atol=1e-6)


def test_precomputed_user_states_are_what_the_service_would_compute(served: Settings) -> None:
    """``uer user-states`` writes each materialised user's state; on a cache miss the service reads it
    instead of computing it (same vector, same personalized flag) — but never one of another registration
    of the version, nor one older than user_state_max_age_s: those users are computed as before."""
    import dataclasses

    from feature_repo.warehouse import USER_STATES, features_dir
    from serving.bundle import ModelBundle
    from serving.retriever import RetrievalRequest, Retriever
    from serving.user_states import publish_user_states

    report = publish_user_states(served)
    bundle = ModelBundle.load(served, FIRST)
    assert report.bundle_id == bundle.bundle_id and 0 < report.personalized <= report.users
    written = pd.read_parquet(features_dir(served) / USER_STATES / f"version={bundle.bundle_id}")
    assert len(written) == report.users
    users = [*written["user_id"].head(6).tolist(), 10**9]  # 10**9 is no user: nothing stored
    requests = [RetrievalRequest(query="rustic oak side table", user_id=u) for u in users]
    computing = Retriever(served.model_copy(update={"serving": ServingSettings(precomputed_user_states=False)}))
    expected, expected_personalized = computing.query_vectors(bundle, requests)
    assert computing.stored_states(bundle, users) == {}  # the setting turns the lookup itself off

    misses: list[str] = []
    reading = Retriever(served, on_miss=misses.append)
    assert set(reading.stored_states(bundle, users)) == set(users[:-1])
    looked_up: list[int] = []
    reading.histories = lambda ids: looked_up.extend(ids) or {}  # only the user without a stored state
    vectors, personalized = reading.query_vectors(bundle, requests)
    assert looked_up == [10**9] and misses == ["stored"] * 6 + ["computed"]
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    assert personalized == expected_personalized and any(personalized)

    again = dataclasses.replace(bundle, path=bundle.path.with_name("registered-again"))
    assert reading.stored_states(again, users) == {}
    stale = Retriever(served.model_copy(update={"serving": ServingSettings(user_state_max_age_s=1e-3)}))
    time.sleep(0.01)
    assert stale.stored_states(bundle, users) == {}


def test_states_of_bundles_that_no_longer_serve_are_pruned_online_and_offline(served: Settings) -> None:
    """A bundle's states stay while the API may serve it: the production version's, those of a model version
    with a collection in Milvus (what a rollback returns to) and a candidate's, registered after production
    (its states are written before its collection is built; the other DAG's prune used to delete them in
    between). A version registered before production without a collection, and an older registration of a
    version, lose theirs: online (SQLite) and offline (parquet); so does a user who left the materialised
    window, when their bundle's states are written again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from feature_repo.store import get_store
    from feature_repo.warehouse import USER_STATES, USER_STATES_SCHEMA, features_dir, write_version, written_versions
    from serving.bundle import ModelBundle
    from serving.refresh import catalogue_with_encodings
    from serving.retention import prune_user_states
    from serving.retriever import Retriever
    from serving.user_states import publish_user_states
    from training.export import register_model
    from training.gate import production_pointer, promote

    production = ModelBundle.load(served, FIRST)
    publish_user_states(served)
    reader = Retriever(served)
    # A user whose history left the materialised window since the last run: the rerun deletes their state.
    partition = features_dir(served) / USER_STATES / f"version={production.bundle_id}"
    gone = pa.Table.from_pandas(pd.read_parquet(partition).head(1).assign(user_id=10**9), preserve_index=False)
    write_version(served, USER_STATES, pa.concat_tables([pq.read_table(partition), gone.cast(
        USER_STATES_SCHEMA)]), production.bundle_id)
    get_store(served).write_to_online_store(USER_STATES, gone.to_pandas(types_mapper=pd.ArrowDtype))
    assert set(reader.stored_states(production, [10**9])) == {10**9}
    publish_user_states(served)
    assert reader.stored_states(production, [10**9]) == {}

    run = served.artifacts_dir / "models" / FIRST
    register_copy(served, "serve-pruned")
    unpublished = ModelBundle.load(served, "serve-pruned")
    publish_user_states(served, "serve-pruned")
    users = pd.read_parquet(partition)["user_id"].head(5).tolist()
    assert set(reader.stored_states(unpublished, users)) == set(users)

    assert prune_user_states(served) == []  # a candidate: registered after production, before its collection
    models = served.artifacts_dir / "models"
    pointer = production_pointer(models)
    saved = pointer.read_bytes()

    def promote_a_newer_version(version: str) -> None:
        register_model(served, version, run, run / "text_encoder")
        promote(models, version, run / "metrics.json")

    try:
        promote_a_newer_version("serve-promoted-later")
        assert prune_user_states(served) == [unpublished.bundle_id]  # no collection, registered before production
        assert reader.stored_states(unpublished, users) == {}
        assert set(reader.stored_states(production, users)) == set(users)
        assert written_versions(served, USER_STATES) == [production.bundle_id]

        index = lifecycle(served)
        products, _ = catalogue_with_encodings(served, unpublished, dt.datetime.now(dt.UTC))
        collection = index.build("serve-pruned", products, unpublished.product_vectors(products)).collection
        try:
            publish_user_states(served, "serve-pruned")
            register_model(served, "serve-pruned", run, run / "text_encoder")  # registered again: a new bundle
            again = ModelBundle.load(served, "serve-pruned")
            publish_user_states(served, "serve-pruned")
            assert prune_user_states(served) == [unpublished.bundle_id]  # only the older registration goes
            assert set(reader.stored_states(again, users)) == set(users)
            assert reader.stored_states(unpublished, users) == {}
            assert written_versions(served, USER_STATES) == sorted([production.bundle_id, again.bundle_id])
        finally:
            index.drop(collection)
        assert prune_user_states(served) == []  # still a candidate
        promote_a_newer_version("serve-promoted-last")
        assert prune_user_states(served) == [again.bundle_id]
        assert set(reader.stored_states(production, users)) == set(users)  # FIRST keeps its collection
    finally:
        pointer.write_bytes(saved)


def test_a_refresh_uses_its_versions_own_encodings_and_retired_versions_are_pruned(served: Settings) -> None:
    """Feast's join of ``product_tower_v1`` gives each product its newest ``product_embeddings`` row, whoever
    wrote it. A refresh still gets its own version's encodings: its graph rows, and its encoder's vector of each
    product's current text (a changed title is encoded anew, nothing else). Pruning removes a retired version's
    rows and only them; with nothing live, nothing."""
    import numpy as np

    from feature_repo.warehouse import EMBEDDINGS, written_versions
    from serving.bundle import ModelBundle
    from serving.refresh import catalogue_with_encodings, with_version_encodings
    from serving.retention import prune_product_embeddings
    from training.batching import product_text
    from training.dataset import product_features
    from training.stages import publish_product_embeddings

    def by_product(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.sort_values("product_id").reset_index(drop=True)

    def assert_same_encodings(a: pd.DataFrame, b: pd.DataFrame) -> None:
        a, b = by_product(a), by_product(b)
        assert a["product_id"].tolist() == b["product_id"].tolist()
        np.testing.assert_array_equal(np.stack(a["text_embedding"]), np.stack(b["text_embedding"]))
        assert [None if g is None else list(g) for g in a["graph_embedding"]] == \
            [None if g is None else list(g) for g in b["graph_embedding"]]

    production = ModelBundle.load(served, FIRST)
    # A refresh's read writes the version's rows back where they differ (other tests publish other versions):
    # read again, nothing differs.
    catalogue_with_encodings(served, production, dt.datetime.now(dt.UTC))
    mine, changed, new = with_version_encodings(served, production, product_features(served, dt.datetime.now(dt.UTC)))
    assert new == 0 and not changed.any()
    assert sum(g is not None for g in mine["graph_embedding"]) > 100  # products with engagement

    # Newer rows of another version (blank encodings) shadow production's for 7 products.
    columns = ["product_id", "text_embedding", "graph_embedding"]
    blank = mine[columns].head(7).assign(text_embedding=[np.zeros(len(mine["text_embedding"][0]))] * 7,
                                         graph_embedding=None)
    publish_product_embeddings(served, blank, "retired-version")
    shadowed = product_features(served, dt.datetime.now(dt.UTC))
    assert (shadowed["embedding_version"] == "retired-version").sum() == 7
    again, changed, new = with_version_encodings(served, production, shadowed)
    assert new == 0 and changed.sum() == 7
    assert_same_encodings(again, mine)

    # A seller changes a title: that product alone is encoded again, from its new text.
    edited = shadowed.copy()
    edited.loc[edited.index[0], "title"] = "hand thrown stoneware mug, speckled glaze"
    after_edit, _, new = with_version_encodings(served, production, edited)
    assert new == 1
    expected = production.encode_texts([product_text(edited.iloc[0].to_dict())])[0]
    np.testing.assert_allclose(after_edit["text_embedding"].iloc[0], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(after_edit["text_embedding"].iloc[0], again["text_embedding"].iloc[0])

    kept = set(written_versions(served, EMBEDDINGS)) - {"retired-version"}
    assert production.bundle_id in kept
    assert prune_product_embeddings(served, set()) == []  # nothing live: refuse
    assert "retired-version" in written_versions(served, EMBEDDINGS)
    assert prune_product_embeddings(served, kept) == ["retired-version"]
    assert set(written_versions(served, EMBEDDINGS)) == kept
    assert not (product_features(served, dt.datetime.now(dt.UTC))["embedding_version"] == "retired-version").any()


def test_the_refresh_encodes_new_product_text_as_training_encoded_its_own(served: Settings, tmp_path: Path) -> None:
    """A run whose config cuts product text at another sequence length saves its encoder with that length; the
    refresh encodes new and changed products with it, not with the default, or new products' vectors would come
    from another featurisation than the catalogue the model was trained on. The bundle carries the fingerprint
    training saved, which the version's cache keys by."""
    import json

    from serving.bundle import ModelBundle
    from training.text_encoder import TextEncoderConfig, encode, saved_fingerprint

    production = ModelBundle.load(served, FIRST)
    assert production.text_fingerprint is not None
    assert production.text_fingerprint == saved_fingerprint(served.artifacts_dir / "models" / FIRST / "text_encoder")
    shutil.copytree(production.path, tmp_path / "bundle")
    config = tmp_path / "bundle" / "text_encoder" / "sentence_bert_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_seq_length": 16}))
    short = ModelBundle.from_directory(FIRST, tmp_path / "bundle")
    text = ("hand thrown stoneware coffee mug with a speckled oatmeal glaze, a gift for tea lovers, "
            "dishwasher safe, twelve ounces, made to order in our small studio by the sea")
    encoded = short.encode_texts([text])
    np.testing.assert_allclose(encoded, encode(short.text_encoder, [text], TextEncoderConfig(max_seq_length=16)),
                               atol=1e-6)
    assert not np.allclose(encoded, production.encode_texts([text]), atol=1e-3)  # 64 tokens see more of it


def test_product_embeddings_exported_before_they_were_keyed_by_bundle_are_read_then_superseded(
        served: Settings) -> None:
    """A store from before keeps each version's rows under its version name: a refresh reads them (the bundle has
    none of its own yet) and writes them back under its bundle, and pruning then removes the version-keyed copy."""
    from feature_repo.warehouse import EMBEDDINGS, copy_version, delete_version, version_rows, written_versions
    from serving.bundle import ModelBundle
    from serving.refresh import catalogue_with_encodings, with_version_encodings
    from serving.retention import prune_product_embeddings
    from training.dataset import product_features

    production = ModelBundle.load(served, FIRST)
    own = version_rows(served, EMBEDDINGS, production.bundle_id, ["product_id", "graph_embedding"]).to_pandas()
    copy_version(served, EMBEDDINGS, production.bundle_id, FIRST)  # as an export before the change left them
    delete_version(served, EMBEDDINGS, production.bundle_id)
    try:
        joined = product_features(served, dt.datetime.now(dt.UTC))
        assert (joined["embedding_version"] == FIRST).all()  # Feast's join gives every product the version-keyed row
        # kept while its live bundle has no rows of its own: they are what it reads
        every = set(written_versions(served, EMBEDDINGS))
        assert prune_product_embeddings(served, every | {production.bundle_id}) == []
        read, changed, _ = with_version_encodings(served, production, joined)
        assert changed.all()
        graph = dict(zip(own["product_id"], own["graph_embedding"], strict=True))
        assert all(np.array_equal(g, graph[p]) for p, g in zip(read["product_id"], read["graph_embedding"],
                                                              strict=True) if g is not None)
        assert sum(g is not None for g in read["graph_embedding"]) > 100
        catalogue_with_encodings(served, production, dt.datetime.now(dt.UTC))  # the refresh's write-back
        assert version_rows(served, EMBEDDINGS, production.bundle_id, ["product_id"]).num_rows == len(read)
        assert prune_product_embeddings(served, set(written_versions(served, EMBEDDINGS))) == [FIRST]
    finally:
        if version_rows(served, EMBEDDINGS, production.bundle_id, ["product_id"]).num_rows == 0:
            copy_version(served, EMBEDDINGS, FIRST, production.bundle_id)
        delete_version(served, EMBEDDINGS, FIRST)


def test_a_version_whose_product_embeddings_are_gone_is_not_published(served: Settings) -> None:
    """Without its rows every product would take the tower's graph fallback: an index quietly worse than the one
    the version was promoted on, with nothing to flag it (the ANN check compares it with itself). The refresh is
    refused by name and the alias stays; the gate skips evaluating such a production model, as one that no
    longer loads."""
    from feature_repo.warehouse import EMBEDDINGS, delete_version, version_rows, write_version
    from feature_repo.warehouse import WRITTEN_SOURCES as sources
    from serving.bundle import ModelBundle
    from serving.refresh import EncodingsMissing, production_model_version, refresh_index
    from training.stages import production_retriever

    index = lifecycle(served)
    before, collections = index.serving(), index.versions()
    production = production_model_version(served)
    bundle = ModelBundle.load(served, production).bundle_id
    dataset = served.artifacts_dir / "models" / production / "dataset"  # its training run's (run_training)
    assert production_retriever(served, dataset) is not None
    rows = version_rows(served, EMBEDDINGS, bundle, sources[EMBEDDINGS][0].names)
    assert rows.num_rows > 0
    delete_version(served, EMBEDDINGS, bundle)
    try:
        with pytest.raises(EncodingsMissing, match=re.escape(f"model {production} ({bundle}) has no rows")):
            refresh_index(served, production)
        assert index.serving() == before and index.versions() == collections  # nothing built, nothing moved
        assert production_retriever(served, dataset) is None
    finally:
        write_version(served, EMBEDDINGS, rows, bundle)
    assert refresh_index(served, production).model_version == production  # rows back: published again


def test_a_retired_versions_files_are_deleted_but_never_productions_or_a_newer_candidates(
        served: Settings, tmp_path: Path) -> None:
    """Each daily version left its BentoML bundle, its text-encoding cache and its KFP pipeline root on disk
    for ever (~2.3 GB a day on the default world). Pruning deletes them for a version that is not live:
    neither production, nor with a collection, nor a candidate registered after production's registration
    (rolled back from). Each registration of a retired version goes. With nothing live, nothing
    is deleted."""
    from serving.bundle import ModelBundle, registered_versions, registrations
    from serving.refresh import encoding_cache_path
    from serving.retention import live_model_versions, prune_version_files
    from training.export import register_model
    from training.gate import promote

    own = served.model_copy(update={"artifacts_dir": tmp_path / "artifacts"})  # its own model store
    run = served.artifacts_dir / "models" / FIRST
    versions = ["refused-before", "retired", "retired", "production", "candidate"]
    for version in versions:  # registered in this order ("retired" twice: a day retrained)
        register_model(own, version, run, run / "text_encoder")
        encoding_cache_path(own, version).parent.mkdir(parents=True, exist_ok=True)
        encoding_cache_path(own, version).write_bytes(b"encodings")  # never opened: pruning must not read it
        (own.artifacts_dir / "kfp" / version / "run" / "train-op").mkdir(parents=True, exist_ok=True)
    assert {"production", "candidate", "retired"} <= live_model_versions(own)  # before any promotion: all
    promote(own.artifacts_dir / "models", "production", run / "metrics.json")
    live = live_model_versions(own)
    assert {"production", "candidate", FIRST} <= live and not {"retired", "refused-before"} & live

    def files_of(version: str) -> list[bool]:
        return [encoding_cache_path(own, version).exists(), (own.artifacts_dir / "kfp" / version).exists(),
                version in registered_versions(own)]

    assert prune_version_files(own, set()) == []  # nothing live: refuse
    assert all(all(files_of(version)) for version in versions)
    assert prune_version_files(own) == ["refused-before", "retired"]
    for version in ("refused-before", "retired"):
        assert files_of(version) == [False, False, False], version
    for version in ("production", "candidate"):
        assert files_of(version) == [True, True, True], version
    assert [r.model_version for r in registrations(own)] == ["production", "candidate"]
    assert ModelBundle.load(own, "production").model_version == "production"  # still loads
    assert (own.artifacts_dir / "models" / "production" / "metrics.json").exists()
    assert prune_version_files(own) == []  # nothing more to do


def test_an_unreachable_feature_store_is_unavailable_for_a_signed_in_miss(served: Settings, tmp_path: Path) -> None:
    """The API answers 503 (``Unavailable``) when it cannot reach the feature store's registry or online store,
    for the stored-state lookup as for the history lookup: never a raw Feast error (a 500)."""
    from serving.bundle import ModelBundle
    from serving.retriever import Retriever, Unavailable

    bundle = ModelBundle.load(served, FIRST)
    nowhere = served.model_copy(update={"data_dir": tmp_path / "no-feature-store"})  # an empty registry
    for precomputed in (True, False):
        retriever = Retriever(nowhere.model_copy(
            update={"serving": ServingSettings(precomputed_user_states=precomputed)}))
        with pytest.raises(Unavailable, match="online feature store"):
            retriever.user_states(bundle, [1])
    states, personalized = Retriever(nowhere).user_states(bundle, [None])  # signed out: no lookup at all
    assert personalized == [False] and states.country.shape == (1,)


def test_the_start_up_warm_up_is_not_counted_as_traffic(served: Settings) -> None:
    """The operator reads the cache and stage metrics as what real requests cost: the service's own
    warm-up request (an unknown user, so a cache miss) must not show up in them, and must not turn them off."""
    from serving.retriever import RetrievalRequest, Retriever

    stages: list[str] = []
    lookups: list[bool] = []
    misses: list[str] = []
    retriever = Retriever(served, on_stage=lambda stage, seconds: stages.append(stage), on_cache=lookups.append,
                          on_miss=misses.append)
    assert retriever.reload() and retriever.ready()
    retriever.warm_up()
    assert stages == [] and lookups == [] and misses == []
    retriever.retrieve_rows([RetrievalRequest(query="wooden bowl", user_id=1, k=5)] * 2)
    assert lookups == [False] and len(misses) == 1 and {"history", "query_tower", "ann_search"} <= set(stages)


def test_a_bundle_whose_files_do_not_fit_its_model_is_refused_by_name(served: Settings, tmp_path: Path) -> None:
    """A damaged or foreign projection.npy / boost.json: BundleInvalid (a ModelNotFound, so the service keeps
    its pair and a refresh stops) naming the file, not a numpy error at the first matmul."""
    from serving.bundle import BundleInvalid, ModelBundle, ModelNotFound

    good = ModelBundle.load(served, FIRST)
    assert good.projection is not None  # the tiny model narrows: the checks below are on a real projection
    width, narrow = good.projection.shape
    (tmp_path / "model").symlink_to(good.path / "model")
    (tmp_path / "boost.json").write_text((good.path / "boost.json").read_text())
    cases = {
        "projection.npy": [np.zeros((width + 1, narrow), np.float32), np.zeros((width, width), np.float32),
                           np.full((width, narrow), np.nan, np.float32), b"not a numpy file"],
        "boost.json": [b'{"weights": [0.1, 0.2]}', b'{"weights": "high"}', b"[1, 2", b"{}"],
    }
    for name, bad_contents in cases.items():
        for bad in bad_contents:
            np.save(tmp_path / "projection.npy", good.projection)
            (tmp_path / "boost.json").write_text((good.path / "boost.json").read_text())
            target = tmp_path / name
            if isinstance(bad, bytes):
                target.write_bytes(bad)
            else:
                np.save(target, bad)
            with pytest.raises(BundleInvalid, match=re.escape(name)) as refused:
                ModelBundle.from_directory("damaged", tmp_path)
            assert isinstance(refused.value, ModelNotFound) and "re-export" in str(refused.value)
    np.save(tmp_path / "projection.npy", good.projection)  # restored: it loads and narrows as the original
    (tmp_path / "boost.json").write_text((good.path / "boost.json").read_text())
    restored = ModelBundle.from_directory("restored", tmp_path)
    np.testing.assert_array_equal(restored.projection, good.projection)
    np.testing.assert_array_equal(restored.boost_weights, good.boost_weights)

    # the towers themselves: damaged weights or config are refused the same way (the service used to fail to start)
    (tmp_path / "model").unlink()
    shutil.copytree(good.path / "model", tmp_path / "model")
    for name, bad in [("weights.pt", b"not torch"), ("weights.pt", None), ("model_config.json", b'{"dim": "x"}')]:
        saved = (tmp_path / "model" / name).read_bytes()
        if bad is None:
            (tmp_path / "model" / name).unlink()
        else:
            (tmp_path / "model" / name).write_bytes(bad)
        with pytest.raises(BundleInvalid, match="cannot load its towers"):
            ModelBundle.from_directory("damaged", tmp_path)
        (tmp_path / "model" / name).write_bytes(saved)
    assert ModelBundle.from_directory("restored", tmp_path).model_version == "restored"


# -- the HTTP API ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(served: Settings) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "UER_DATA_DIR": str(served.data_dir), "UER_ARTIFACTS_DIR": str(served.artifacts_dir),
           "UER_MILVUS__URI": served.milvus.uri, "UER_MILVUS__EMBEDDED_SERVER": "false",
           "UER_SERVING__RELOAD_INTERVAL_S": "0.5", "BENTOML_HOME": str(served.artifacts_dir / "bentoml")}
    log = (served.artifacts_dir / "api.log").open("w")
    command = [str(Path(sys.executable).with_name("bentoml")), "serve", "serving.service:RetrievalService",
               "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (served.artifacts_dir / "api.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the API did not become ready: " + (served.artifacts_dir / "api.log").read_text()[-3000:])
        yield url
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def test_api_happy_path_signed_out_and_unknown_user(api: str) -> None:
    signed_in = post(api, "/retrieve", {"query": "wooden bowl", "user_id": 1, "k": 20})
    assert signed_in.status_code == 200, signed_in.text
    body = signed_in.json()
    # /retrieve writes its JSON itself (orjson): it must still be exactly the documented response model
    assert signed_in.headers["content-type"].startswith("application/json")
    assert set(body) == set(RetrievalResponse.model_fields) and RetrievalResponse.model_validate(body)
    assert all(set(item) == {"product_id", "score"} for item in body["results"])
    assert body["model_version"] in (FIRST, SECOND) and body["index_version"].startswith(body["model_version"])
    assert len(body["results"]) == 20 and body["personalized"] is True
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    signed_out = post(api, "/retrieve", {"query": "wooden bowl", "k": 5}).json()
    assert len(signed_out["results"]) == 5 and signed_out["personalized"] is False
    # typed with a CJK input method (fullwidth letters): the same words, so the same answer
    fullwidth = post(api, "/retrieve", {"query": "ｗｏｏｄｅｎ ＢＯＷＬ", "k": 5}).json()
    assert fullwidth["results"] == signed_out["results"]
    unknown = post(api, "/retrieve", {"query": "wooden bowl", "user_id": 10**12, "k": 5}).json()
    assert unknown["personalized"] is False and [r["product_id"] for r in unknown["results"]] == [
        r["product_id"] for r in signed_out["results"]]
    # no state is stored for an unknown user: the miss was computed, and /metrics says so
    assert (_metric(api, "uer_user_state_misses_total", 'source="computed"') or 0) >= 1
    batch = post(api, "/retrieve_batch", {"requests": [{"query": "wooden bowl", "k": 3},
                                                       {"query": "silver ring", "user_id": 2, "k": 4}]})
    assert batch.status_code == 200, batch.text
    assert [len(r["results"]) for r in batch.json()] == [3, 4]


def test_the_batch_endpoint_serves_a_call_beyond_its_batch_size_and_concurrent_calls(api: str) -> None:
    """A /retrieve_batch call longer than the coalescer's batch maximum (32), beside concurrent calls. Neither may be
    refused as "overloaded" (under BentoML's adaptive batching, used before, both were 503s once its dispatcher had
    learnt a batch's duration: a batch of searches outlasted its latency budget)."""
    from concurrent.futures import ThreadPoolExecutor

    for _ in range(12):  # what the dispatcher learns its timings from
        assert post(api, "/retrieve_batch", {"requests": [{"query": "wooden bowl", "k": 2}]}).status_code == 200
    long_call = {"requests": [{"query": f"wooden bowl {i}", "k": 2} for i in range(65)]}
    calls = [{"requests": [{"query": "silver ring", "k": 3}] * 5} for _ in range(4)]
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda body: post(api, "/retrieve_batch", body), [long_call, *calls]))
    assert [a.status_code for a in answers] == [200] * 5, [a.text[:200] for a in answers]
    assert [len(a.json()) for a in answers] == [65, 5, 5, 5, 5]
    assert all(len(row["results"]) == 2 for row in answers[0].json())


def test_concurrent_requests_are_served_together_and_each_gets_its_own_answer(api: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"query": q, "k": k, **({"user_id": u} if u is not None else {}), **({"filters": f} if f else {})}
              for q, k, u, f in [("wooden bowl", 5, None, None), ("silver ring", 7, 1, None),
                                 ("linen dress", 3, 2, None), ("mug", 4, None, {"price_max": 40, "currency": "USD"})]
              * 8]
    alone = [post(api, "/retrieve", body).json() for body in bodies[:4]]
    before = _batch_metric(api)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda body: post(api, "/retrieve", body), bodies))
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200][:2]
    for i, response in enumerate(together):
        want = alone[i % 4]
        got = response.json()
        assert [r["product_id"] for r in got["results"]] == [r["product_id"] for r in want["results"]], i
        assert got["personalized"] == want["personalized"]
    after = _batch_metric(api)
    requests, batches = after[0] - before[0], after[1] - before[1]
    assert requests == len(bodies)
    assert batches < requests  # some of the 32 concurrent requests shared a batch


def _metric(api: str, name: str, labels: str = "") -> float | None:
    """The value of sample ``name`` (with exactly ``labels``, e.g. ``generation="0"``, if given) in the
    service's /metrics; None when the service does not expose it (yet)."""
    text = httpx.get(api + "/metrics", timeout=10).text
    label_part = re.escape("{" + labels + "}") if labels else r"(?:\{[^}]*\})?"
    found = re.search(rf"^{name}{label_part} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else None


def _batch_metric(api: str) -> tuple[float, float]:
    """(requests, batches) counted by the service's batch-size histogram."""
    return _metric(api, "uer_retrieve_batch_size_sum"), _metric(api, "uer_retrieve_batch_size_count")


def test_metrics_expose_garbage_collector_pauses(api: str) -> None:
    """The collector holds the GIL: its pauses are a cause of tail latency the operator must see."""

    def young_collections() -> float:  # no sample until the first collection
        return _metric(api, "uer_gc_pause_seconds_count", 'generation="0"') or 0.0

    before = young_collections()
    for i in range(20):  # each request allocates far more than the 700 objects that trigger a young collection
        assert post(api, "/retrieve", {"query": f"wooden bowl {i}", "k": 50}).status_code == 200
    assert young_collections() > before, "no collector pause in uer_gc_pause_seconds after 20 requests"


@pytest.mark.parametrize("body", [
    {"query": "bowl", "k": 0}, {"query": "bowl", "k": 1001}, {"query": "   "}, {"k": 5}, {"query": "x" * 300},
    {"query": "bowl", "user_id": -1}, {"query": "bowl", "filters": {"category": ['a" or 1==1']}},
    {"query": "bowl", "filters": {"price_min": 9, "price_max": 1}}, {"query": "bowl", "filters": {"raw": "x"}},
    {"query": "bowl", "k": "many"}, {"query": "bowl", "userid": 5}, {"query": "bowl", "filter": {"price_max": 20}},
    {"query": "bowl", "filters": {"category": []}}, {"query": "bowl", "filters": {"price_max": 20}},
    {"query": "bowl", "user_id": True}, {"query": "bowl", "k": 10.0}, {"query": "?!"}, {"query": "椅子", "user_id": 1},
])
def test_api_rejects_bad_input_with_a_clear_4xx(api: str, body: dict) -> None:
    response = post(api, "/retrieve", body)
    assert 400 <= response.status_code < 500, response.text
    assert response.text  # a message a person can act on
    if body.get("filters") == {"price_max": 20}:
        assert "need a currency" in response.text, response.text
    if body.get("query") in ("?!", "椅子"):  # was served as an empty query: a 200 that answered nothing typed
        assert "no word the model can read" in response.text, response.text


@pytest.mark.parametrize("body", [
    {"requests": []}, {"requests": [{"query": "bowl", "k": 2}], "filters": {"category": ["kitchen"]}},
    {"requests": [{"query": "bowl", "k": 2}] * 257}, {"requests": [{"query": "bowl", "k": True}]}, {"query": "bowl"},
    {"requests": [{"query": "bowl"}, {"query": "..."}]},
])
def test_the_batch_endpoint_rejects_bad_input_with_a_400(api: str, body: dict) -> None:
    """An unknown top-level field (a misspelt place for filters) used to be dropped, serving the batch unfiltered; an
    empty list was served; a call had no length limit (serving.batch_call_max_requests, 256, now)."""
    response = post(api, "/retrieve_batch", body)
    assert response.status_code == 400, response.text[:300]
    assert response.text


def test_alias_swap_under_load_fails_no_request_and_is_picked_up(api: str, served: Settings) -> None:
    from serving.refresh import refresh_index

    register_copy(served, SECOND)
    failures, seen, stop = [], set(), threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                r = http.post(api + "/retrieve", json={"query": "wooden bowl", "user_id": 1, "k": 10})
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    seen.add(r.json()["model_version"])

    thread = threading.Thread(target=client)
    thread.start()
    try:
        refresh_index(served, SECOND)
        deadline = time.monotonic() + 30
        while SECOND not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert failures == [] and SECOND in seen, failures[:3]


def test_a_filter_the_served_collection_cannot_apply_is_a_503_for_that_request_alone(
        api: str, served: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an upgrade (or a rollback) the alias may point to a collection built before ``currency`` was indexed: a
    price-filtered request gets a 503 that says why, and the requests coalesced with it are served."""
    from concurrent.futures import ThreadPoolExecutor

    def serving_now(index_version: str) -> None:
        deadline = time.monotonic() + 30
        while post(api, "/retrieve", {"query": "mug", "k": 3}).json()["index_version"] != index_version:
            assert time.monotonic() < deadline, f"the API did not pick up {index_version}"
            time.sleep(0.2)

    index = lifecycle(served)
    first = index.serving()
    old = publish_without_currency(served, monkeypatch)
    try:
        serving_now(old.index_version)
        priced = {"query": "mug", "k": 3, "filters": {"price_max": 1e6, "currency": "USD"}}
        plain = {"query": "mug", "k": 3}
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda body: post(api, "/retrieve", body), [priced, plain] * 16))
        refused, answered = responses[::2], responses[1::2]
        assert all(r.status_code == 503 and "built before currency was indexed" in r.text for r in refused), \
            [r.text for r in refused][:2]
        assert all(r.status_code == 200 and r.json()["index_version"] == old.index_version for r in answered), \
            [r.text for r in answered if r.status_code != 200][:2]
        # the same through /retrieve_batch: the refused call names its request, the calls beside it are served
        # (BentoML's adaptive batching merged concurrent calls and failed them all, with a generic 503 text)
        calls = [{"requests": [plain, priced]}, {"requests": [plain, plain]}] * 8
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda body: post(api, "/retrieve_batch", body), calls))
        refused, answered = responses[::2], responses[1::2]
        assert all(r.status_code == 503 and r.json()["error"].startswith("request 1 (counted from 0): the served index")
                   and "built before currency was indexed" in r.text for r in refused), [r.text for r in refused][:2]
        assert all(r.status_code == 200 and [row["index_version"] for row in r.json()] == [old.index_version] * 2
                   for r in answered), [r.text for r in answered if r.status_code != 200][:2]
    finally:  # back to the collection the module's later tests expect
        index.swap(first)
        serving_now(first.index_version)
        index.drop(old.collection)


def test_index_of_an_unknown_model_is_refused_and_the_old_pair_keeps_serving(api: str, served: Settings) -> None:
    from serving.bundle import ModelBundle
    from serving.refresh import catalogue_with_encodings

    index = lifecycle(served)
    before = post(api, "/retrieve", {"query": "wooden bowl", "k": 3}).json()
    bundle = ModelBundle.load(served, before["model_version"])
    products, _ = catalogue_with_encodings(served, bundle, dt.datetime.now(dt.UTC))
    vectors = bundle.product_vectors(products)
    index.publish("never-exported", products, vectors)  # the alias now points at an unloadable model
    time.sleep(2)
    after = post(api, "/retrieve", {"query": "wooden bowl", "k": 3})
    assert after.status_code == 200 and after.json()["index_version"] == before["index_version"]
    index.rollback()


def test_milvus_down_gives_503_and_the_service_recovers(api: str, served: Settings) -> None:
    from serving.engine import ensure_server

    port = int(served.milvus.uri.rsplit(":", 1)[1])
    [pid] = subprocess.run(["pgrep", "-f", f"milvus-lite server --host 127.0.0.1 --port {port}"],
                           capture_output=True, text=True).stdout.split()
    os.kill(int(pid), 9)
    time.sleep(1)
    down = post(api, "/retrieve", {"query": "wooden bowl", "k": 3})
    assert down.status_code == 503 and "Milvus" in down.text
    assert httpx.get(api + "/livez").status_code == 200  # the process stayed up
    restarted = ensure_server(served)
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and status != 200:
            status = post(api, "/retrieve", {"query": "wooden bowl", "k": 3}).status_code
            time.sleep(1)
        assert status == 200
    finally:
        restarted.terminate()  # the module fixture's server was the one killed above
        restarted.wait(30)
