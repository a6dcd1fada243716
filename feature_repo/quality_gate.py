"""The great-expectations gate on a day's marts: a failed critical expectation stops the day.

Each mart has a suite (schema, null rates, ranges, uniqueness, row count against the previous
published day, freshness). The gate validates the rows dbt built for the day *before* they are
published, so a failure leaves the offline and online stores exactly as they were. GX writes its
HTML data docs to ``artifacts/gx/data_docs/index.html``.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from feature_repo.warehouse import DAILY_MARTS, MARTS, DayRejected, previous_published_day, published_rows, read_build
from retrieval_core.settings import Settings

# GX floods INFO logs at import time unless its logger is quieted first.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

DATASOURCE = "marts"
# How far a daily mart's row count may move against the previous published day before the day stops.
ROW_COUNT_BAND = {"product_quality": (0.5, 2.0), "user_history": (0.3, 3.0), "query_product_edges": (0.3, 3.0)}


class QualityGateFailed(DayRejected):
    """A critical expectation failed: the day is not published."""

    def __init__(self, ds: dt.date, failures: list[str], docs: Path):
        self.ds, self.failures, self.docs = ds, failures, docs
        super().__init__(f"quality gate stopped {ds}: " + " | ".join(failures)
                         + f". Nothing of {ds} was published; see {docs}")


@dataclass
class GateReport:
    ds: dt.date
    rows: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    docs: Path | None = None


def _expectations(mart: str, ds: dt.date, previous_rows: int | None) -> list[Any]:
    import great_expectations.expectations as gxe

    closed_at = pd.Timestamp(ds + dt.timedelta(days=1), tz="UTC")
    warn = "warning"
    common = {
        "product_profile": [
            gxe.ExpectColumnValuesToNotBeNull(column="product_id"),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["product_id", "ds"]),
            gxe.ExpectColumnValuesToNotBeNull(column="title"),
            gxe.ExpectColumnValuesToBeBetween(column="price", min_value=0, strict_min=True),
            gxe.ExpectColumnMaxToBeBetween(column="event_timestamp", max_value=closed_at),
        ],
        "product_quality": [
            gxe.ExpectColumnValuesToNotBeNull(column="product_id"),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["product_id", "ds"]),
            *[gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1)
              for c in ("ctr", "favorite_rate", "cart_rate", "purchase_rate")],
            gxe.ExpectColumnValuesToBeBetween(column="price", min_value=0, strict_min=True),
            gxe.ExpectColumnValuesToBeBetween(column="rating", min_value=0, max_value=5),
            gxe.ExpectColumnValuesToBeBetween(column="ctr_bucket", min_value=1, max_value=100),
            gxe.ExpectColumnMaxToBeBetween(column="event_timestamp", min_value=closed_at, max_value=closed_at),
        ],
        "user_history": [
            gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "ds"]),
            gxe.ExpectColumnValuesToNotBeNull(column="recent_queries", mostly=0.9, severity=warn),
            gxe.ExpectColumnValuesToBeBetween(column="sessions_30d", min_value=1),
            gxe.ExpectColumnMaxToBeBetween(column="event_timestamp", min_value=closed_at, max_value=closed_at),
        ],
        "query_product_edges": [
            gxe.ExpectColumnValuesToNotBeNull(column="query"),
            gxe.ExpectColumnValuesToNotBeNull(column="product_id"),
            gxe.ExpectColumnValuesToBeBetween(column="weight", min_value=1),
        ],
        "training_examples": [
            gxe.ExpectColumnValuesToNotBeNull(column="example_id"),
            gxe.ExpectColumnValuesToBeUnique(column="example_id"),
            gxe.ExpectColumnValuesToNotBeNull(column="product_id"),
            gxe.ExpectColumnValuesToBeInSet(column="interaction",
                                            value_set=["click", "favorite", "add_to_cart", "purchase"]),
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "validation", "test"]),
            gxe.ExpectColumnValuesToNotBeNull(column="user_id", mostly=0.5, severity=warn),
        ],
        "query_stats": [
            gxe.ExpectColumnValuesToBeUnique(column="query"),
            gxe.ExpectColumnValuesToBeInSet(column="query_class", value_set=["head", "torso", "tail"]),
        ],
    }[mart]
    schema = [gxe.ExpectColumnToExist(column=c) for c in _KEY_COLUMNS[mart]]
    volume = [gxe.ExpectTableRowCountToBeBetween(min_value=1)]
    if previous_rows and mart in ROW_COUNT_BAND:
        low, high = ROW_COUNT_BAND[mart]
        volume.append(gxe.ExpectTableRowCountToBeBetween(
            min_value=int(previous_rows * low), max_value=int(previous_rows * high) + 1,
            meta={"why": f"row count within {low}x..{high}x of the previous published day ({previous_rows})"}))
    return schema + volume + common


_KEY_COLUMNS = {
    "product_profile": ["product_id", "ds", "event_timestamp", "title", "tags", "category_path", "price"],
    "product_quality": ["product_id", "ds", "event_timestamp", "ctr", "purchase_rate", "price_bucket"],
    "user_history": ["user_id", "ds", "event_timestamp", "recent_queries", "recent_shops",
                     "recent_click_terms", "purchased_tags"],
    "query_product_edges": ["ds", "query", "product_id", "weight"],
    "training_examples": ["example_id", "event_timestamp", "query", "user_id", "product_id", "interaction", "split"],
    "query_stats": ["query", "sessions", "query_class"],
}


def _context(settings: Settings) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    root = settings.artifacts_dir / "gx"
    root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(root))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    site = {"class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir(settings))},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}
    if "marts_site" in ctx.list_data_docs_sites():
        ctx.update_data_docs_site("marts_site", site)
    else:
        ctx.add_data_docs_site("marts_site", site)
    return ctx


def docs_dir(settings: Settings) -> Path:
    return settings.artifacts_dir / "gx" / "data_docs"


def _checkpoint(ctx: Any, mart: str, expectations: list[Any]) -> Any:
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.result_format import ResultFormat

    try:
        source = ctx.data_sources.get(DATASOURCE)
    except KeyError:
        source = ctx.data_sources.add_pandas(name=DATASOURCE)
    try:
        asset = source.get_asset(mart)
    except LookupError:
        asset = source.add_dataframe_asset(name=mart)
    try:
        batch = asset.get_batch_definition("day")
    except KeyError:
        batch = asset.add_batch_definition_whole_dataframe("day")
    suite = ctx.suites.add_or_update(gx.ExpectationSuite(name=f"{mart}_suite", expectations=expectations))
    validation = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"{mart}_day", data=batch, suite=suite))
    return ctx.checkpoints.add_or_update(gx.Checkpoint(
        name=f"{mart}_gate", validation_definitions=[validation],
        actions=[UpdateDataDocsAction(name="update_docs", site_names=["marts_site"])],
        result_format=ResultFormat.SUMMARY))


def _describe(result: Any) -> str:
    config, res = result.expectation_config, (result.result or {})
    column = config.kwargs.get("column") or config.kwargs.get("column_list") or "table"
    info = result.exception_info or {}
    messages = ([info.get("exception_message")] if "raised_exception" in info
                else [getattr(v, "exception_message", None) for v in info.values()])
    error = "; ".join(str(m) for m in messages if m)
    if error:
        observed = f"error: {error[:160]}"
    elif "unexpected_percent" in res:
        observed = (f"{res['unexpected_percent']:.1f}% unexpected ({res['unexpected_count']} of "
                    f"{res['element_count']}, e.g. {res.get('partial_unexpected_list', [])[:3]})")
    else:
        observed = f"observed {res.get('observed_value')!r}"
    expected = {k: v for k, v in config.kwargs.items() if k not in ("column", "column_list", "batch_id")}
    return f"{config.type}({column}) {observed}, expected {expected}"


def validate_days(settings: Settings, ds: dt.date, days: list[dt.date] | None = None) -> GateReport:
    """Validate the rows dbt built for ``days`` (default: just ``ds``) in every mart; raise if a
    critical expectation fails. Daily marts are checked one day at a time (memory stays bounded by
    a day, and each day's volume is compared with the day before it, in the backlog or published)."""
    days = sorted(days or [ds])
    ctx = _context(settings)
    report = GateReport(ds=ds, rows={}, docs=docs_dir(settings) / "index.html")
    failures: list[str] = []

    def check(mart: str, day: dt.date, frame: pd.DataFrame, previous_rows: int | None) -> None:
        checkpoint = _checkpoint(ctx, mart, _expectations(mart, day, previous_rows))
        result = checkpoint.run(batch_parameters={"dataframe": frame})
        for validation in result.run_results.values():
            for r in validation.results:
                if not r.success:
                    line = f"mart {mart} ({day}): {_describe(r)}"
                    (failures if r.expectation_config.severity.value == "critical" else report.warnings).append(line)

    for mart in MARTS:
        if mart not in DAILY_MARTS:
            frame = read_build(settings, mart)
            report.rows[mart] = len(frame)
            check(mart, ds, frame, None)
            continue
        previous = previous_published_day(settings, mart, days[0])
        previous_rows = published_rows(settings, mart, previous) if previous else None
        report.rows[mart] = 0
        for day in days:
            frame = read_build(settings, mart, [day])
            report.rows[mart] += len(frame)
            check(mart, day, frame, previous_rows)
            previous_rows = len(frame)
    if failures:
        raise QualityGateFailed(ds, failures, report.docs)
    return report
