"""Turn the Home Depot product-search judgments into the raw-data contract.

The files are read by path (``settings.homedepot_dir``) and never copied into the repository.
Each judged (query, product, relevance) pair becomes one search session of a signed-out user in
which the product was shown and engaged according to its grade:

* relevance >= 2.5 → impression, click, add_to_cart, purchase
* relevance >= 2.0 → impression, click
* below            → impression only

Titles arrive with HTML entities still escaped (``&amp;``); they are unescaped here. Home Depot has
no tags, shops or prices in this file, so the adapter fills those contract columns with neutral,
documented values: one shop, empty tags, category ``home improvement``, price 1.0 USD.
"""

from __future__ import annotations

import datetime as dt
import html
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval_core.contract import CONTRACTS, land_partition, validate_table
from retrieval_core.errors import OperatorError

DAY = dt.date(2016, 1, 1)  # the Kaggle competition's year; all pairs land as one day
PURCHASE_GRADE = 2.5
CLICK_GRADE = 2.0
PRODUCT_COLUMNS = {"product_id": "int64", "title": "string"}
JUDGMENT_COLUMNS = {"query": "string", "product_id": "int64", "relevance": "float64"}


class HomeDepotFileInvalid(OperatorError, ValueError):
    """products.csv or judgments_dev.csv is not the file the adapter reads: nothing was landed."""


def _read_csv(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    """``path``'s ``columns`` with their types, or an error that names the file and what it must hold."""
    try:
        return pd.read_csv(path, usecols=list(columns), dtype=columns)
    except (ValueError, TypeError, pd.errors.ParserError) as exc:  # a missing column, a value of the wrong type
        raise HomeDepotFileInvalid(f"{path} cannot be read as the Home Depot file: it needs the columns "
                                   f"{columns} ({exc}); nothing was landed") from exc


def read_products(homedepot_dir: Path) -> pd.DataFrame:
    products = _read_csv(homedepot_dir / "products.csv", PRODUCT_COLUMNS)
    products["title"] = products["title"].fillna("").map(html.unescape).str.strip()
    return products[products["title"] != ""].drop_duplicates("product_id")


def read_judgments(homedepot_dir: Path) -> pd.DataFrame:
    judgments = _read_csv(homedepot_dir / "judgments_dev.csv", JUDGMENT_COLUMNS)
    judgments["query"] = judgments["query"].str.strip().str.lower()
    return judgments.dropna()


def catalogue_table(products: pd.DataFrame) -> pa.Table:
    n = len(products)
    created = pd.Timestamp(DAY, tz="UTC").value // 1000
    return pa.table({
        "product_id": pa.array(products["product_id"].to_numpy(), pa.int64()),
        "shop_id": pa.array(np.ones(n, dtype=np.int64)),
        "title": pa.array(products["title"].astype(object).to_numpy(), pa.string()),
        "tags": pa.array([[] for _ in range(n)], pa.list_(pa.string())),
        "category_path": pa.array(["home improvement"] * n, pa.string()),
        "materials": pa.nulls(n, pa.list_(pa.string())),
        "colors": pa.nulls(n, pa.list_(pa.string())),
        "price": pa.array(np.ones(n)),
        "currency": pa.array(["USD"] * n),
        "shop_country": pa.array(["US"] * n),
        "created_at": pa.array(np.full(n, created), pa.timestamp("us", "UTC")),
        "rating": pa.nulls(n, pa.float64()),
        "review_count": pa.array(np.zeros(n, dtype=np.int64)),
    })


def events_table(judgments: pd.DataFrame) -> pa.Table:
    """One signed-out session per judged pair, engaged according to the relevance grade."""
    j = judgments.reset_index(drop=True)
    base = pd.Timestamp(DAY, tz="UTC").value // 1000
    rows = []
    for kind, offset, mask in (
        ("impression", 0, np.ones(len(j), bool)),
        ("click", 1, j["relevance"].to_numpy() >= CLICK_GRADE),
        ("add_to_cart", 2, j["relevance"].to_numpy() >= PURCHASE_GRADE),
        ("purchase", 3, j["relevance"].to_numpy() >= PURCHASE_GRADE),
    ):
        idx = np.flatnonzero(mask)
        rows.append(pd.DataFrame({"i": idx, "kind": kind, "offset": offset}))
    ev = pd.concat(rows, ignore_index=True).sort_values(["i", "offset"], kind="stable")
    i = ev["i"].to_numpy()
    # Spread sessions over the day (one per 1.5 s) so timestamps stay inside the partition.
    ts = base + (i * 1_500_000) % (86_400 * 1_000_000 - 10_000_000) + ev["offset"].to_numpy() * 1_000_000
    session = np.char.add("hd-", i.astype(str))
    return pa.table({
        "event_id": pa.array(np.char.add(np.char.add(session, "-"), ev["kind"].to_numpy().astype(str)).astype(object)),
        "ts": pa.array(ts, pa.timestamp("us", "UTC")),
        "user_id": pa.nulls(len(ev), pa.int64()),
        "session_id": pa.array(session.astype(object)),
        "query": pa.array(j["query"].astype(object).to_numpy()[i], pa.string()),
        "product_id": pa.array(j["product_id"].to_numpy()[i], pa.int64()),
        "event_type": pa.array(ev["kind"].to_numpy().astype(object), pa.string()),
        "position": pa.array(np.ones(len(ev), dtype=np.int32)),
    })


def land_homedepot(homedepot_dir: Path, raw_dir: Path, landing_dir: Path, quarantine_dir: Path) -> dict[str, int]:
    """Land the Home Depot catalogue and judgments as one day of contract partitions."""
    if not (homedepot_dir / "products.csv").exists():
        raise FileNotFoundError(
            f"{homedepot_dir / 'products.csv'} not found: set UER_HOMEDEPOT_DIR to the folder that holds "
            "products.csv and judgments_dev.csv")
    products = read_products(homedepot_dir)
    judgments = read_judgments(homedepot_dir)
    judgments = judgments[judgments["product_id"].isin(products["product_id"])]
    tables = {"catalogue": catalogue_table(products), "events": events_table(judgments),
              "users": pa.table({"user_id": pa.array([], pa.int64()), "country": pa.array([], pa.string()),
                                 "signup_date": pa.array([], pa.date32())})}
    for name, table in tables.items():  # all three first: a violation in one lands none of them
        validate_table(table, CONTRACTS[name], DAY, homedepot_dir / f"{name} (as adapted)")
    counts = {}
    for name, table in tables.items():
        src = landing_dir / name / f"homedepot-{DAY}.parquet"
        src.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, src)
        land_partition(src, name, DAY, raw_dir, quarantine_dir)
        src.unlink(missing_ok=True)
        counts[name] = table.num_rows
    counts["queries"] = int(judgments["query"].nunique())
    return counts
