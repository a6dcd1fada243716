"""The one settings object: every choice that differs between the embedded and production profiles.

Values come, in order of precedence, from explicit arguments, environment variables (prefix ``UER_``,
nested fields with ``__``, e.g. ``UER_POSTGRES__HOST``), then the defaults of the selected profile.
Secrets (passwords, tokens, API keys) have no defaults and are only ever read from the environment.
Nothing else in the code base branches on "are we local?": it reads a field of this object.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Profile = Literal["local", "production"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class PostgresSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 5432
    database: str = "uer"
    user: str = "postgres"
    password: SecretStr | None = None
    schema_name: str = "uer"

    def dsn(self, database: str | None = None) -> str:
        """A libpq connection string (the password, if any, is embedded: never log it)."""
        auth = self.user
        if self.password is not None:
            auth += ":" + self.password.get_secret_value()
        return f"postgresql://{auth}@{self.host}:{self.port}/{database or self.database}"


class RedisSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: SecretStr | None = None

    def connection_string(self) -> str:
        """Feast's redis connection string form: ``host:port,db=N[,password=...]``."""
        conn = f"{self.host}:{self.port},db={self.db}"
        if self.password is not None:
            conn += f",password={self.password.get_secret_value()}"
        return conn


class MilvusSettings(BaseModel):
    # An http(s) URI of a Milvus server / cluster (or a local *.db path: Milvus Lite in-process, one
    # process only). The local profile runs Milvus Lite as a gRPC server on 127.0.0.1 so the
    # retrieval API and the refresh job can share it; ``embedded_server`` starts it when it is down.
    uri: str = "http://127.0.0.1:19531"
    token: SecretStr | None = None
    embedded_server: bool = False
    timeout_s: float = 5.0
    collection_prefix: str = "products"
    alias: str = "products_serving"
    # Served collections kept behind the alias for rollback. At least 1: the collection the alias leaves is still
    # searched by the running API until its next reload (serving.reload_interval_s), so it must outlive the swap.
    keep_previous: int = Field(2, ge=1)
    # A collection never served and younger than this may be another process's publication in progress (the
    # daily and the nightly DAG can overlap) and is not pruned; it outlasts a build's own waits (30 + 15 min).
    unfinished_grace_s: float = Field(3 * 3600.0, ge=0)
    # HNSW: per query the cheapest at recall@100 ≥ 0.97 of those measured (benchmarks/results/index_types.json).
    index_type: Literal["HNSW", "IVF_FLAT", "SCANN", "FLAT"] = "HNSW"
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    # HNSW ef at query time (raised to k for larger k). serving.json's sweep at 1M (2026-12-06): recall@100
    # 0.992 at 100, 0.997 at 200, with most of a search's CPU in Milvus's per-call overhead and the graph walk.
    search_ef: int = 100
    # IVF_FLAT probes per search (nlist ≈ 4·√rows): measured at 1M rows, 32 → recall@100 0.886, 64 → 0.975.
    search_nprobe: int = 64
    # SCANN (a Milvus server ≥ 2.3: IVF lists of 4-bit codes scanned with SIMD lookups): the best reorder_k
    # candidates by code distance are re-scored with the raw vectors (raised to k: the server refuses less).
    scann_reorder_k: int = Field(200, ge=1)
    min_ann_recall_at_100: float = 0.97
    ann_check_queries: int = 200
    insert_batch: int = 5000


class KfpSettings(BaseModel):
    mode: Literal["local", "cluster"] = "local"
    host: str | None = None
    token: SecretStr | None = None
    pipeline_root: str = "artifacts/kfp"


class ServingSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 3000
    api_key: SecretStr | None = None
    # A user's query-tower state (from the query_tower_v1 features) is cached this long. The daily DAG
    # materialises those features once a day, so the TTL bounds how long after that a user is still served
    # with yesterday's history; a new model version never reuses another's states (the cache is keyed by it).
    history_cache_ttl_s: float = 300.0
    history_cache_size: int = 100_000
    # On a cache miss the API first looks up the user's state precomputed by the serving model version
    # (serving.user_states, written by the daily DAG after each materialisation and before each alias swap):
    # one online-store read instead of the read + featuriser + history encoders. Older states than this (a
    # day's DAG failed) are not used: the state is computed from query_tower_v1 as without them.
    precomputed_user_states: bool = True
    user_state_max_age_s: float = Field(36 * 3600.0, gt=0)
    # The most requests one /retrieve_batch call may carry (more is a 400): each takes a search and up to k results.
    batch_call_max_requests: int = Field(256, ge=1, le=10_000)
    # How often a running service looks for a new alias target / model version.
    reload_interval_s: float = 10.0
    # API worker processes (BentoML ``workers``): each has its own GIL, model copy, coalescer and user-state
    # cache. One is GIL-bound near 0.8 cores; on this 2-core machine, shared with Milvus, 2 were worse (20k
    # products, 200 requests/s: p99 95 ms vs 71 ms, ad hoc): more CPU per request, half the cache hits each.
    workers: int = Field(1, ge=1, le=16)
    # /retrieve serves concurrent requests together (serving.coalescer): at most batch_max per batch,
    # batch_workers batches at a time (one can run the query tower while another waits on Milvus).
    batch_max: int = Field(32, ge=1, le=256)
    batch_workers: int = Field(2, ge=1, le=16)
    # torch intra-op threads of the query tower in the API process: its matrices are tiny, and the cores
    # are shared with the HTTP workers (and, on one machine, with Milvus).
    torch_threads: int = Field(1, ge=1)
    # numpy's BLAS (OpenBLAS) threads in the API process: the query projection and boosting columns are
    # matrix products of a few rows. OpenBLAS splits even those over every core and its threads spin while
    # they wait for one another: with every core busy, a 16-row float64 projection cost 0.50 ms of CPU on two
    # threads against 0.17 on one (benchmarks/results/api_costs.json), and at 1M products, 200 requests/s, the
    # API used 1.06 cores with two against 0.64 with one (serving_blas_threads_2.json vs serving.json at 407eb7b,
    # one AMD EPYC VM).
    blas_threads: int = Field(1, ge=1)
    # One log line per request (BentoML's access log). Off by default: it was ~5% of the API process's GIL
    # time at 25 requests/s (py-spy, ad hoc), and a proxy in front usually logs requests anyway.
    access_log: bool = False
    # Share of API requests traced (OpenTelemetry, BentoML's tracing.sample_rate). At 0 the retrieval routes
    # skip the tracing middleware altogether: it still opened a (non-recording) span per request, ~5% of
    # the API's GIL time at 100 requests/s (py-spy --gil).
    tracing_sample_rate: float = Field(0.0, ge=0.0, le=1.0)


class AirflowSettings(BaseModel):
    notify_webhook: SecretStr | None = None
    retries: int = 2
    retry_delay_s: int = 60
    # One slot: the tasks that publish a collection (the daily DAG's publish_index, the nightly refresh) queue
    # for it instead of building side by side. `uer airflow` creates it; a production Airflow needs
    # `airflow pools set <name> 1 "..."` once (a task in a missing pool is never scheduled).
    index_pool: str = "uer_milvus_index"


class Settings(BaseSettings):
    """Effective configuration of one run of the platform."""

    model_config = SettingsConfigDict(
        env_prefix="UER_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    profile: Profile = "local"
    # Where raw partitions, marts, feature stores and artefacts live (relative paths resolve
    # against the project root, so every entry point agrees whatever its working directory).
    data_dir: Path = Path("data")
    artifacts_dir: Path = Path("artifacts")
    homedepot_dir: Path = Path("../shared/data/homedepot")

    dbt_target: Literal["duckdb", "postgres"] = "duckdb"
    offline_store: Literal["duckdb", "postgres"] = "duckdb"
    online_store: Literal["sqlite", "redis"] = "sqlite"

    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    kfp: KfpSettings = Field(default_factory=KfpSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)

    seed: int = 7

    @model_validator(mode="before")
    @classmethod
    def _apply_profile_defaults(cls, data: Any) -> Any:
        """Fill what the caller and the environment left unset from the profile's preset."""
        if not isinstance(data, dict):
            return data
        profile = data.get("profile", "local")
        if profile not in PROFILE_PRESETS:
            raise ValueError(f"unknown profile {profile!r}: choose one of {sorted(PROFILE_PRESETS)}")
        return _deep_setdefault(dict(data), PROFILE_PRESETS[profile])

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        for name in ("data_dir", "artifacts_dir", "homedepot_dir"):
            path = getattr(self, name)
            if not path.is_absolute():
                object.__setattr__(self, name, (PROJECT_ROOT / path).resolve())
        return self

    # Derived locations: one place names every folder the stages share.
    @property
    def landing_dir(self) -> Path:
        return self.data_dir / "landing"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def diagnostics_dir(self) -> Path:
        return self.data_dir / "diagnostics"

    @property
    def kfp_local_dir(self) -> Path:
        """kfp.local's pipeline roots (``<version>/<run>/<task>/<output>``) and the compiled pipeline."""
        return self.artifacts_dir / "kfp"

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain JSON-able data, with every secret masked."""
        return json.loads(self.model_dump_json())


# What each profile means. Only values that differ between profiles belong here.
PROFILE_PRESETS: dict[str, dict[str, Any]] = {
    "local": {
        "dbt_target": "duckdb",
        "offline_store": "duckdb",
        "online_store": "sqlite",
        "milvus": {"uri": "http://127.0.0.1:19531", "embedded_server": True},
        "kfp": {"mode": "local"},
    },
    "production": {
        "dbt_target": "postgres",
        "offline_store": "postgres",
        "online_store": "redis",
        "milvus": {"uri": "http://127.0.0.1:19530", "embedded_server": False},
        "kfp": {"mode": "cluster"},
    },
}


def _deep_setdefault(target: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    for key, value in defaults.items():
        if isinstance(value, dict):
            current = target.get(key)
            if current is None:
                target[key] = dict(value)
            elif isinstance(current, dict):
                target[key] = _deep_setdefault(dict(current), value)
        else:
            target.setdefault(key, value)
    return target


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
