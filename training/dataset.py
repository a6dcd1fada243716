"""Training data from the feature store: examples with the user's history *as of each example*
(Feast point-in-time join of ``query_tower_v1``) and the catalogue's ``product_tower_v1`` features
as of a cut-off, so no event later than an example reaches its features."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd

from feature_repo.store import get_store
from feature_repo.warehouse import read_published
from retrieval_core.settings import Settings

HISTORY_FEATURES = ("country", "recent_queries", "recent_shops", "recent_click_terms", "purchased_tags")


@dataclass
class TrainingData:
    examples: pd.DataFrame  # one row per engagement: query, user features, product_id, interaction, split
    products: pd.DataFrame  # one row per product: product_tower_v1 features as of `products_as_of`
    products_as_of: dt.datetime
    query_class: dict[str, str]

    def split(self, name: str) -> pd.DataFrame:
        return self.examples[self.examples["split"] == name]


def with_history(settings: Settings, examples: pd.DataFrame) -> pd.DataFrame:
    """Join each signed-in example with the user's history as of its timestamp (point in time)."""
    store = get_store(settings)
    signed_in = examples[examples["user_id"].notna()]
    entity = pd.DataFrame({"example_id": signed_in["example_id"].to_numpy(),
                           "user_id": signed_in["user_id"].astype("int64").to_numpy(),
                           "event_timestamp": pd.to_datetime(signed_in["event_timestamp"], utc=True).to_numpy()})
    joined = store.get_historical_features(entity_df=entity,
                                           features=store.get_feature_service("query_tower_v1")).to_df()
    columns = ["example_id", *HISTORY_FEATURES]
    out = examples.merge(joined[columns], on="example_id", how="left")
    out["has_history"] = out["recent_queries"].map(lambda v: v is not None and not isinstance(v, float) and len(v) > 0)
    return out


def product_features(settings: Settings, as_of: dt.datetime) -> pd.DataFrame:
    """Every listed product's ``product_tower_v1`` features as of ``as_of``, and those of a product first
    listed later as of its listing: the catalogue the nightly index serves through a window that starts at
    ``as_of`` (a listing is in it from the next refresh on), never features changed after either moment."""
    store = get_store(settings)
    profile = read_published(settings, "product_profile")
    listed = pd.to_datetime(profile.groupby("product_id")["event_timestamp"].min(), utc=True)
    entity = listed.clip(lower=pd.Timestamp(as_of).tz_convert("UTC")).sort_index().reset_index()
    entity = entity.astype({"product_id": "int64", "event_timestamp": "datetime64[ns, UTC]"})
    frame = store.get_historical_features(entity_df=entity,
                                          features=store.get_feature_service("product_tower_v1")).to_df()
    return frame.sort_values("product_id").reset_index(drop=True)


def load_training_data(settings: Settings) -> TrainingData:
    """Examples of every split with their point-in-time history, and products as of the end of the
    training window (validation and test engagement never reaches product features)."""
    examples = read_published(settings, "training_examples")
    examples["event_timestamp"] = pd.to_datetime(examples["event_timestamp"], utc=True)
    train_end = examples.loc[examples["split"] == "train", "ds"].max()
    as_of = dt.datetime.combine(pd.Timestamp(train_end).date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    stats = read_published(settings, "query_stats")
    return TrainingData(examples=with_history(settings, examples), products=product_features(settings, as_of),
                        products_as_of=as_of, query_class=dict(zip(stats["query"], stats["query_class"], strict=True)))


def validation_purchases(examples: pd.DataFrame) -> pd.DataFrame:
    """The validation window's purchases: the held-out rows boosting and the channel calibration are fit on."""
    return examples[(examples["split"] == "validation") & (examples["interaction"] == "purchase")]
