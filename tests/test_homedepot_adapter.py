"""The Home Depot judgments land in the contract, read by path from ../shared (never copied)."""

from __future__ import annotations

import html

import pandas as pd
import pytest

from retrieval_core.adapters.homedepot import DAY, land_homedepot
from retrieval_core.contract import read_table
from retrieval_core.settings import Settings


@pytest.fixture(scope="module")
def landed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict[str, int]]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("hd") / "data")
    if not (settings.homedepot_dir / "products.csv").exists():
        pytest.fail(f"the Home Depot data must lie at {settings.homedepot_dir} (../shared beside the clone)")
    counts = land_homedepot(settings.homedepot_dir, settings.raw_dir, settings.landing_dir, settings.quarantine_dir)
    return settings, counts


def test_catalogue_has_every_titled_product_with_entities_unescaped(landed) -> None:
    settings, counts = landed
    catalogue = read_table(settings.raw_dir, "catalogue")
    source = pd.read_csv(settings.homedepot_dir / "products.csv")
    assert counts["catalogue"] == len(catalogue) == source.product_id.nunique() == 54_667
    escaped = source.title.str.contains("&amp;|&quot;|&#", regex=True)
    assert escaped.any(), "the source is expected to carry HTML entities"
    titles = catalogue.set_index("product_id").title
    sample = source[escaped].head(50)
    assert (titles[sample.product_id].to_numpy() == sample.title.map(html.unescape).str.strip().to_numpy()).all()
    assert not titles.str.contains("&amp;").any()


def test_judgments_become_events_whose_type_follows_the_grade(landed) -> None:
    settings, counts = landed
    events = read_table(settings.raw_dir, "events")
    judgments = pd.read_csv(settings.homedepot_dir / "judgments_dev.csv")
    assert (events.event_type == "impression").sum() == len(judgments)
    assert (events.event_type == "purchase").sum() == (judgments.relevance >= 2.5).sum()
    assert (events.event_type == "click").sum() == (judgments.relevance >= 2.0).sum()
    assert events.user_id.isna().all()
    assert (events.ts.dt.date == DAY).all()
    assert counts["queries"] == judgments["query"].str.strip().str.lower().nunique()
