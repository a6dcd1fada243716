"""Reciprocal rank fusion, the query-level metrics, and the real-data evaluation on a tiny contract dataset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from retrieval_core.adapters.homedepot import land_homedepot
from training.contract_eval import (
    ContractEvalConfig,
    build_dataset,
    judgments,
    query_metrics,
    read_contract,
    run_contract_eval,
    split_queries,
)
from training.evaluate import rrf_retriever
from training.stages import TrainingRunConfig
from training.text_encoder import TextEncoderConfig
from training.train import TrainConfig


def fixed(ranking: list[list[int]]):
    return lambda rows, k: np.array(ranking)[: len(rows), :k]


def test_rrf_puts_the_item_ranked_well_by_both_first() -> None:
    fused = rrf_retriever([fixed([[5, 1, 2, 7]]), fixed([[6, 1, 3, 8]])], k=60)(pd.DataFrame({"query": ["q"]}), 4)
    assert fused[0, 0] == 1  # 2/62 beats 1/61
    assert set(fused[0, 1:3]) == {5, 6}  # then each list's first


def test_rrf_known_scores_and_padding() -> None:
    # A = [1, 2, 3], B = [3, 1]: 1 → 1/61 + 1/62, 3 → 1/63 + 1/61, 2 → 1/62; nothing else to rank.
    a, b = fixed([[1, 2, 3]]), (lambda rows, k: np.array([[3, 1]]))
    fused = rrf_retriever([a, b], k=60)(pd.DataFrame({"query": ["q"]}), 5)
    assert fused[0].tolist() == [1, 3, 2, -1, -1]


def test_query_metrics_perfect_and_graded() -> None:
    ranked = np.array([[0, 1, 2] + list(range(10, 1007))])
    perfect = query_metrics(ranked, [{0, 1}], [{0: 2, 1: 2, 2: 1}])
    assert perfect["recall@10"] == 1.0 and perfect["ndcg@10"] == pytest.approx(1.0)
    swapped = query_metrics(np.array([[2, 0, 1] + list(range(10, 1007))]), [{0, 1}], [{0: 2, 1: 2, 2: 1}])
    assert swapped["recall@10"] == 1.0 and 0.5 < swapped["ndcg@10"] < 1.0
    missed = query_metrics(np.array([list(range(10, 1010))]), [{0, 1}], [{0: 2, 1: 2}])
    assert missed["recall@1000"] == 0.0 and missed["ndcg@10"] == 0.0


WORDS = ["oak", "pine", "steel", "brass", "copper", "vinyl", "glass", "ceramic", "cedar", "maple"]
THINGS = ["door", "hinge", "faucet", "shelf", "lamp", "tile", "rake", "drill", "sink", "fence"]


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory):
    """A tiny Home-Depot-shaped dataset landed through the adapter into the raw-data contract."""
    root = tmp_path_factory.mktemp("contract")
    src = root / "hd"
    src.mkdir()
    rng = np.random.default_rng(0)
    products, judged = [], []
    for i, (w, t) in enumerate((w, t) for w in WORDS for t in THINGS):
        products.append({"product_id": 1000 + i, "title": f"{w.title()} {t} {rng.integers(1, 99)} in."})
    for w in WORDS:
        for t in THINGS[:6]:
            query = f"{w} {t}"
            for j, p in enumerate(products):
                if p["title"].lower().startswith(query):
                    judged.append({"query": query, "product_id": p["product_id"], "relevance": 3.0})
                elif t in p["title"].lower() and j % 3 == 0:
                    judged.append({"query": query, "product_id": p["product_id"], "relevance": 2.0})
    pd.DataFrame(products).to_csv(src / "products.csv", index=False)
    pd.DataFrame(judged).to_csv(src / "judgments_dev.csv", index=False)
    land_homedepot(src, root / "raw", root / "landing", root / "quarantine")
    return root / "raw"


def test_split_is_query_disjoint_and_seeded(tiny_raw, tmp_path) -> None:
    data = read_contract(tiny_raw)
    config = ContractEvalConfig(test_fraction=0.3, split_seed=3)
    meta = build_dataset(data, config, tmp_path)
    examples, test = pd.read_parquet(tmp_path / "examples.parquet"), pd.read_parquet(tmp_path / "test.parquet")
    edges = pd.read_parquet(tmp_path / "edges.parquet")
    assert meta["test_queries"] == 18 and meta["train_queries"] == 42
    assert not set(examples["query"]) & set(test["query"])
    assert set(edges["query"]) <= set(examples["query"])
    assert set(examples["interaction"]) <= {"click", "purchase"}
    train_q, test_q = split_queries(judgments(data.events)["query"], 0.3, 3)
    assert test_q == set(test["query"]) and not train_q & test_q
    assert split_queries(judgments(data.events)["query"], 0.3, 4)[1] != test_q  # another seed, another split


def test_judgments_grade_by_strongest_event(tiny_raw) -> None:
    pairs = judgments(read_contract(tiny_raw).events).set_index(["query", "product_id"])
    assert pairs.loc[("oak door", 1000), "interaction"] == "purchase" and pairs.loc[("oak door", 1000), "gain"] == 2
    assert set(pairs["gain"]) == {1, 2}


def test_contract_eval_runs_end_to_end(tiny_raw, tmp_path) -> None:
    run = TrainingRunConfig(train=TrainConfig(steps=30, batch_size=32, distill_warm_start_steps=10,
                                              distill_batch_size=256, uniform_negatives=16, hard_negatives=2,
                                              warmup_steps=10, ramp_steps=10, hard_refresh_steps=10),
                            text=TextEncoderConfig(adapt_batch_size=16), graph_dim=8)
    result = run_contract_eval(tiny_raw, tmp_path, ContractEvalConfig(run=run), log=lambda m: None)
    assert {"unified", "bm25", "minilm", "hybrid_rrf", "minilm_adapted", "unified+bm25_rrf"} <= set(result.systems)
    for values in result.systems.values():
        assert 0.0 <= values["recall@10"] <= values["recall@100"] <= 1.0 and 0.0 <= values["ndcg@10"] <= 1.0
    assert result.systems["bm25"]["recall@10"] > 0.5  # the toy queries are literal title prefixes
    assert result.systems["hybrid_rrf"]["recall@100"] == 1.0  # 100 products: everything is in the top 100
