"""Feast definitions: entities, feature views over the published marts, and the feature services.

The sources depend on the profile (parquet files read by DuckDB locally, Postgres tables in
production); everything else is the same object graph, so both profiles serve identical features.

Feature services (the contract other parts and other teams use):

* ``query_tower_v1``   — what the retrieval API reads online per request: a user's recent history.
* ``query_tower_state_v1`` — what the API reads first: a user's query-tower state precomputed from
  ``query_tower_v1`` by a model bundle (``serving.user_states``), keyed by (user, model bundle).
* ``product_tower_v1`` — what indexing reads for every product: profile, quality, embeddings.
* ``user_engagement_v1``  — for other teams: a user's country and 30-day activity counts.
* ``product_insights_v1`` — for other teams: a product's category, price and 30-day engagement rates.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Array, Bool, Float32, Float64, Int64, String

from feature_repo.warehouse import FEATURES_SCHEMA, USER_STATES, features_dir
from retrieval_core.settings import Settings

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64,
              description="A signed-in buyer (signed-out traffic has no user).")
model_bundle = Entity(name="model_bundle", join_keys=["model_bundle"], value_type=ValueType.STRING,
                      description="One registration of a model version (serving.bundle.ModelBundle.bundle_id): "
                                  "a day retrained under the same version name is another bundle.")
product = Entity(name="product", join_keys=["product_id"], value_type=ValueType.INT64,
                 description="A listed product.")

USER_HISTORY_FIELDS = [
    Field(name="country", dtype=String, description="the user's country (ISO 3166 alpha-2)"),
    Field(name="recent_queries", dtype=Array(String), description="last distinct queries, newest first"),
    Field(name="recent_shops", dtype=Array(Int64), description="shops of recently clicked products"),
    Field(name="recent_click_terms", dtype=Array(String), description="words of recently clicked titles"),
    Field(name="purchased_tags", dtype=Array(String), description="tags of recent purchases"),
    Field(name="sessions_30d", dtype=Int64),
    Field(name="clicks_30d", dtype=Int64),
    Field(name="purchases_30d", dtype=Int64),
]
PRODUCT_PROFILE_FIELDS = [
    Field(name="title", dtype=String), Field(name="tags", dtype=Array(String)),
    Field(name="category_path", dtype=String), Field(name="top_category", dtype=String),
    Field(name="shop_id", dtype=Int64), Field(name="shop_country", dtype=String),
    Field(name="price", dtype=Float64), Field(name="currency", dtype=String),
]
PRODUCT_QUALITY_FIELDS = [
    Field(name="impressions_30d", dtype=Int64), Field(name="ctr", dtype=Float64),
    Field(name="favorite_rate", dtype=Float64), Field(name="cart_rate", dtype=Float64),
    Field(name="purchase_rate", dtype=Float64), Field(name="rating", dtype=Float64),
    Field(name="review_count", dtype=Int64), Field(name="age_days", dtype=Int64),
    *[Field(name=f"{name}_bucket", dtype=Int64)
      for name in ("ctr", "purchase_rate", "rating", "review_count", "age", "price")],
]
PRODUCT_EMBEDDING_FIELDS = [
    Field(name="text_embedding", dtype=Array(Float32), description="adapted MiniLM encoding of title+tags"),
    Field(name="graph_embedding", dtype=Array(Float32), description="query-product graph embedding"),
    Field(name="embedding_version", dtype=String, description="the bundle that wrote them (version@registration)"),
]
USER_STATE_FIELDS = [
    Field(name="state", dtype=Array(Float32),
          description="the query tower's user state, packed (training.model.PackedUserState.flat)"),
    Field(name="personalized", dtype=Bool, description="the user had a history when it was computed"),
]


def _source(settings: Settings, name: str) -> Any:
    """The published mart ``name`` as a Feast source for the settings' offline store."""
    if settings.offline_store == "postgres":
        from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource

        return PostgreSQLSource(name=f"{name}_source", query=f"select * from {FEATURES_SCHEMA}.{name}",
                                timestamp_field="event_timestamp")
    # A directory of ds=YYYY-MM-DD/part-0.parquet partitions (file_format is required for a directory).
    return FileSource(name=f"{name}_source", path=str(features_dir(settings) / name), file_format=ParquetFormat(),
                      timestamp_field="event_timestamp")


def definitions(settings: Settings) -> list[Any]:
    """Every Feast object of the repository, for ``FeatureStore.apply``."""
    def view(name: str, entity: Entity | list[Entity], ttl_days: int, schema: list[Field],
             description: str) -> FeatureView:
        return FeatureView(name=name, entities=entity if isinstance(entity, list) else [entity],
                           ttl=timedelta(days=ttl_days), schema=schema,
                           source=_source(settings, name), online=True, description=description)

    user_history = view("user_history", user, 30, USER_HISTORY_FIELDS,
                        "A user's recent behaviour as of the close of each day they were active.")
    product_profile = view("product_profile", product, 3650, PRODUCT_PROFILE_FIELDS,
                           "The listing in force: text, category, shop and price.")
    product_quality = view("product_quality", product, 30, PRODUCT_QUALITY_FIELDS,
                           "Trailing 30-day engagement rates and quality, with quantile buckets.")
    product_embeddings = view("product_embeddings", product, 3650, PRODUCT_EMBEDDING_FIELDS,
                              "Precomputed product-side encodings written by training (text, graph).")
    user_states = view(USER_STATES, [user, model_bundle], 30, USER_STATE_FIELDS,
                       "Each user's query-tower state under a model bundle, from its query_tower_v1 features.")
    services = [
        FeatureService(name="query_tower_v1", features=[user_history],
                       description="Read online by the retrieval API for every personalized request."),
        FeatureService(name="query_tower_state_v1", features=[user_states],
                       description="Read online by the retrieval API first: the precomputed user state."),
        FeatureService(name="product_tower_v1", features=[product_profile, product_quality, product_embeddings],
                       description="Read by indexing to embed every product."),
        FeatureService(name="user_engagement_v1",
                       features=[user_history[["country", "sessions_30d", "clicks_30d", "purchases_30d"]]],
                       description="For other teams: a user's country and 30-day activity."),
        FeatureService(name="product_insights_v1",
                       features=[product_profile[["category_path", "price", "shop_country"]],
                                 product_quality[["impressions_30d", "ctr", "purchase_rate", "rating"]]],
                       description="For other teams: a product's category, price and engagement rates."),
    ]
    return [user, model_bundle, product, user_history, product_profile, product_quality, product_embeddings,
            user_states, *services]
