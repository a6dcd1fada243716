"""Knobs of the simulated marketplace, and the named worlds (tiny for tests, default, large)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field, model_validator

WorldName = Literal["tiny", "default", "large"]


class WorldConfig(BaseModel):
    """Everything that shapes a simulated world. Same config + same seed → identical files."""

    seed: int = 7
    start_date: dt.date = dt.date(2026, 10, 1)
    days: int = Field(14, ge=1)

    # Catalogue
    n_shops: int = Field(800, ge=1)
    n_products: int = Field(20_000, ge=10)
    new_product_share: float = Field(0.08, ge=0, le=1, description="products created during the window")
    price_change_rate: float = Field(0.002, ge=0, le=1, description="daily share of products re-listed")
    shop_style_loyalty: float = Field(0.75, ge=0, le=1, description="P(product has its shop's style)")
    known_attribute_rate: float = Field(0.7, ge=0, le=1, description="P(materials/colors columns filled)")
    tag_synonym_rate: float = Field(0.25, ge=0, le=1, description="P(seller adds a buyer synonym tag)")

    # Users and traffic
    n_users: int = Field(5_000, ge=1)
    new_user_share: float = Field(0.1, ge=0, le=1)
    sessions_per_day: int = Field(3_000, ge=1)
    signed_out_rate: float = Field(0.25, ge=0, le=1)
    activity_sigma: float = Field(1.0, ge=0, description="log-normal spread of how often users search")
    taste_concentration: float = Field(0.15, gt=0, description="Dirichlet alpha of tastes: low = peaked")

    # Queries
    head_share: float = Field(0.45, ge=0, le=1)
    torso_share: float = Field(0.30, ge=0, le=1)
    tail_queries_per_product: float = Field(1.0, gt=0, description="size of the tail-query pool")
    tail_zipf: float = Field(0.6, gt=0, description="popularity skew of tail queries")
    tail_gap_rate: float = Field(0.5, ge=0, le=1,
                                 description="P(a tail query has a word its product titles never use)")
    torso_gap_rate: float = Field(0.25, ge=0, le=1)
    head_misspelling_rate: float = Field(0.03, ge=0, le=1)

    # Legacy lexical engine and the choice model
    results_shown: int = Field(10, ge=1, le=48)
    candidates_per_session: int = Field(60, ge=10)
    explicit_match_weight: float = Field(2.0, description="utility of matching what the query says")
    taste_strength: float = Field(3.0, description="utility of matching the user's hidden taste")
    quality_weight: float = Field(0.5)
    price_sensitivity: float = Field(0.8)
    same_country_bonus: float = Field(0.4)
    position_bias: float = Field(0.8, ge=0, description="exam prob = 1 / position ** position_bias")
    click_threshold: float = Field(2.0)
    purchase_threshold: float = Field(3.5)

    @model_validator(mode="after")
    def _shares(self) -> WorldConfig:
        if self.head_share + self.torso_share > 1:
            raise ValueError("head_share + torso_share must be <= 1 (the rest is tail traffic)")
        return self

    @property
    def tail_share(self) -> float:
        return 1.0 - self.head_share - self.torso_share

    @property
    def days_list(self) -> list[dt.date]:
        return [self.start_date + dt.timedelta(days=i) for i in range(self.days)]


WORLDS: dict[str, WorldConfig] = {
    "tiny": WorldConfig(days=6, n_shops=80, n_products=2_000, n_users=400, sessions_per_day=500),
    "default": WorldConfig(),
    # >= 1M products, >= 1M users, >= 20M events over 30 days.
    "large": WorldConfig(days=30, n_shops=40_000, n_products=1_000_000, n_users=1_000_000,
                         sessions_per_day=62_000),
}


def world_config(name: str, **overrides: object) -> WorldConfig:
    """A named world, with knob overrides (validated)."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}: choose one of {sorted(WORLDS)}")
    return WorldConfig.model_validate(WORLDS[name].model_dump() | overrides)
