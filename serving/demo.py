"""What ``make demo`` shows once the daily DAG has run and the API is up: one broad query for two users
with different histories and for a signed-out visitor, side by side, through the real HTTP API; then
the evaluation table of the production model and where its HTML report is."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pandas as pd
from rich.console import Console
from rich.table import Table

from feature_repo.warehouse import read_published
from retrieval_core.settings import Settings, get_settings
from training.gate import pointer_record, read_pointer

console = Console()


def broad_query(settings: Settings) -> str:
    """The head query with the most sessions made of one word (broad: many intents match it)."""
    stats = read_published(settings, "query_stats")
    head = stats[(stats["query_class"] == "head") & ~stats["query"].str.contains(" ")]
    return str((head if not head.empty else stats).sort_values("sessions", ascending=False)["query"].iloc[0])


def latest_user_history(settings: Settings) -> pd.DataFrame:
    """Each user's newest published history row, indexed by user_id."""
    return read_published(settings, "user_history").sort_values("ds").groupby("user_id").tail(1).set_index("user_id")


def contrasting_users(history: pd.DataFrame) -> tuple[int, int]:
    """Two active users whose purchased tags overlap the least."""
    history = history[history["purchased_tags"].map(lambda t: hasattr(t, "__len__") and len(t) >= 3)]
    history = history.sort_values("sessions_30d", ascending=False).head(200)
    tags = {int(u): set(t) for u, t in zip(history.index, history["purchased_tags"], strict=True)}
    first = next(iter(tags))
    second = min((u for u in tags if u != first), key=lambda u: len(tags[u] & tags[first]) / len(tags[u] | tags[first]))
    return first, second


def main(url: str | None = None) -> None:
    settings = get_settings()
    url = url or f"http://{settings.serving.host}:{settings.serving.port}"
    query = broad_query(settings)
    history = latest_user_history(settings)
    users = contrasting_users(history)
    titles = read_published(settings, "product_profile").sort_values("ds").groupby("product_id").tail(1)
    title = dict(zip(titles["product_id"], titles["title"], strict=True))
    columns = {}
    for label, user in ((f"user {users[0]}", users[0]), (f"user {users[1]}", users[1]), ("signed out", None)):
        body = {"query": query, "k": 10, **({"user_id": user} if user is not None else {})}
        response = httpx.post(f"{url}/retrieve", json=body, timeout=60)
        response.raise_for_status()
        got = response.json()
        columns[label] = [title.get(r["product_id"], str(r["product_id"])) for r in got["results"]]
        if user is not None:
            tags = list(history.loc[user, "purchased_tags"])[:6]
            console.print(f"[bold]{label}[/] recently bought tags: {', '.join(map(str, tags))}")
    console.print(f"model {got['model_version']}, index {got['index_version']}")
    table = Table(title=f'POST {url}/retrieve  query="{query}"  k=10')
    for label in columns:
        table.add_column(label, overflow="fold")
    for row in zip(*columns.values(), strict=True):
        table.add_row(*row)
    console.print(table)
    a, b = (set(columns[f"user {u}"]) for u in users)
    first, second = (columns[f"user {u}"] for u in users)
    verdict = ("the same list in the same order: history did not change this query" if first == second else
               "the same products in another order" if a == b else "their histories change what they see")
    console.print(f"the two users share {len(a & b)} of {len(first)} results: {verdict}", soft_wrap=True)
    print_evaluation(settings)


def print_evaluation(settings: Settings) -> None:
    production = pointer_record(read_pointer(settings.artifacts_dir / "models"))
    if production is None:
        console.print("no production model yet")
        return
    metrics = json.loads(Path(production["metrics"]).read_text())
    table = Table(title=f"test-window purchases, production model {production['version']}")
    for column in ("system", "recall@10", "recall@100", "recall@1000", "ndcg@10"):
        table.add_column(column, justify="right" if column != "system" else "left")
    for system, slices in sorted(metrics.items(), key=lambda kv: -kv[1]["all"]["recall@100"]):
        m = slices["all"]
        table.add_row(system, *(f"{m[k]:.3f}" for k in ("recall@10", "recall@100", "recall@1000", "ndcg@10")))
    console.print(table)
    report = Path(production["metrics"]).with_name("report.html")
    console.print(f"HTML report (recall curves, slices, ablations): {report}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
