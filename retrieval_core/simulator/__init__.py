"""The marketplace simulator: writes a world in the raw-data contract, one landed day at a time."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import Progress

from retrieval_core.contract import land_partition, write_atomic
from retrieval_core.simulator.config import WORLDS, WorldConfig, world_config
from retrieval_core.simulator.vocabulary import CATEGORIES, COLORS, COUNTRIES, CURRENCY_BY_COUNTRY, STYLES
from retrieval_core.simulator.world import (
    Products,
    Shops,
    Users,
    make_products,
    make_shops,
    make_tail_pool,
    make_users,
    product_tags,
    product_titles,
    simulate_day,
)

__all__ = ["WORLDS", "SimulationSummary", "WorldConfig", "simulate", "world_config"]


@dataclass
class SimulationSummary:
    products: int
    users: int
    events: int
    days: list[dt.date]


def _catalogue_rows(config: WorldConfig, products: Products, shops: Shops, titles: list[str],
                    tags: list[list[str]], rows: np.ndarray, day_index: int, rng: np.random.Generator) -> pa.Table:
    """Catalogue rows as the seller's listing shows them on ``day_index``."""
    cat = products.category[rows]
    known = rng.random(len(rows)) < config.known_attribute_rate
    materials = [[CATEGORIES[c].materials[m]] if k else None
                 for c, m, k in zip(cat, products.material[rows], known, strict=True)]
    colors = [[COLORS[c]] if k else None for c, k in zip(products.color[rows], known, strict=True)]
    age_days = np.maximum(day_index - products.created_day[rows], 0)
    reviews = rng.poisson(np.exp(0.8 * products.quality[rows]) * np.log1p(age_days) * 1.5)
    rating = np.clip(np.round(4.4 + 0.35 * products.quality[rows] + rng.normal(0, 0.2, len(rows)), 1), 1, 5)
    country = np.array(COUNTRIES)[shops.country[products.shop[rows]]]
    start = pd.Timestamp(config.start_date, tz="UTC")
    created = start + pd.to_timedelta(products.created_day[rows], unit="D") + pd.to_timedelta(
        rng.integers(0, 86_400, len(rows)), unit="s")
    return pa.table({
        "product_id": pa.array(rows + 1, pa.int64()),
        "shop_id": pa.array(products.shop[rows] + 1, pa.int64()),
        "title": pa.array([titles[i] for i in rows], pa.string()),
        "tags": pa.array([tags[i] for i in rows], pa.list_(pa.string())),
        "category_path": pa.array(np.array([c.path for c in CATEGORIES], dtype=object)[cat], pa.string()),
        "materials": pa.array(materials, pa.list_(pa.string())),
        "colors": pa.array(colors, pa.list_(pa.string())),
        "price": pa.array(products.price[rows], pa.float64()),
        "currency": pa.array([CURRENCY_BY_COUNTRY[c] for c in country], pa.string()),
        "shop_country": pa.array(country.astype(object), pa.string()),
        "created_at": pa.array(created.asi8 // 1000, pa.timestamp("us", "UTC")),
        "rating": pa.array(rating, pa.float64(), mask=reviews == 0),
        "review_count": pa.array(reviews, pa.int64()),
    })


def _users_rows(config: WorldConfig, users: Users, rows: np.ndarray) -> pa.Table:
    signup = np.datetime64(config.start_date) + users.signup_day[rows].astype("timedelta64[D]")
    return pa.table({
        "user_id": pa.array(rows + 1, pa.int64()),
        "country": pa.array(np.array(COUNTRIES, dtype=object)[users.country[rows]], pa.string()),
        "signup_date": pa.array(signup, pa.date32()),
    })


def _land(table: pa.Table, name: str, day: dt.date, landing_dir: Path, raw_dir: Path,
          quarantine_dir: Path) -> None:
    src = landing_dir / name / f"ds={day.isoformat()}.parquet"
    src.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, src, compression="zstd")
    land_partition(src, name, day, raw_dir, quarantine_dir)
    src.unlink(missing_ok=True)


def _write_diagnostics(config: WorldConfig, products: Products, users: Users, out: Path) -> None:
    """The latent truth, for tests and analysis only: training never reads this folder."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(pa.Table.from_pandas(pd.DataFrame({
        "product_id": np.arange(len(products)) + 1, "category": products.category,
        "style": np.array(STYLES)[products.style], "color": np.array(COLORS)[products.color],
        "material": products.material, "occasion": products.occasion, "quality": products.quality,
        "created_day": products.created_day,
    }), preserve_index=False), out / "products.parquet")
    write_atomic(pa.Table.from_pandas(pd.DataFrame({
        "user_id": np.arange(len(users.activity)) + 1,
        "top_style": np.array(STYLES)[users.style_taste.argmax(axis=1)],
        "top_color": np.array(COLORS)[users.color_taste.argmax(axis=1)],
        "top_category": users.category_taste.argmax(axis=1), "price_level": users.price_level,
        "activity": users.activity,
    }), preserve_index=False), out / "users.parquet")
    (out / "world.json").write_text(config.model_dump_json(indent=2))


def simulate(config: WorldConfig, raw_dir: Path, landing_dir: Path, quarantine_dir: Path,
             diagnostics_dir: Path, show_progress: bool = True) -> SimulationSummary:
    """Generate ``config``'s world and land it, day by day, as contract partitions under ``raw_dir``."""
    with Progress(disable=not show_progress, transient=False) as progress:
        build = progress.add_task("building shops, products, users", total=4)
        shops = make_shops(config)
        products = make_products(config, shops)
        users = make_users(config)
        progress.advance(build)
        titles = product_titles(products, config)
        progress.advance(build)
        tags = product_tags(products, config)
        progress.advance(build)
        pool = make_tail_pool(config, products)
        progress.advance(build)
        _write_diagnostics(config, products, users, diagnostics_dir)

        days = config.days_list
        task = progress.add_task(f"simulating {len(days)} days", total=len(days))
        n_events = 0
        for d, day in enumerate(days):
            rng = np.random.default_rng([config.seed, 200, d])
            if d == 0:
                new_products = np.flatnonzero(products.created_day <= 0)
                new_users = np.flatnonzero(users.signup_day <= 0)
            else:
                new_products = np.flatnonzero(products.created_day == d)
                new_users = np.flatnonzero(users.signup_day == d)
                # Sellers re-list a few live products at a new price: the "changed" rows.
                live = np.flatnonzero(products.created_day < d)
                changed = live[rng.random(len(live)) < config.price_change_rate]
                products.price[changed] = np.maximum(
                    1.0, np.round(products.price[changed] * np.exp(rng.normal(0, 0.1, len(changed))), 2))
                new_products = np.union1d(new_products, changed)
            catalogue = _catalogue_rows(config, products, shops, titles, tags, new_products, d, rng)
            _land(catalogue, "catalogue", day, landing_dir, raw_dir, quarantine_dir)
            _land(_users_rows(config, users, new_users), "users", day, landing_dir, raw_dir, quarantine_dir)
            traffic = simulate_day(config, d, products, shops, users, pool)
            _land(traffic.events, "events", day, landing_dir, raw_dir, quarantine_dir)
            write_atomic(pa.Table.from_pandas(traffic.sessions, preserve_index=False),
                         diagnostics_dir / "sessions" / f"ds={day.isoformat()}" / "part-0.parquet")
            n_events += traffic.events.num_rows
            progress.update(task, advance=1, description=f"simulated {day} ({n_events:,} events)")
    return SimulationSummary(products=len(products), users=len(users.activity), events=n_events, days=days)
