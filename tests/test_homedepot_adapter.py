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


def _land_command(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], products: str,
                  judgments: str) -> tuple[Settings, int, str]:
    """``uer land-homedepot`` (through ``main``, as the script runs) on these two files: settings, exit code, output."""
    from retrieval_core import cli

    source = tmp_path / "homedepot"
    source.mkdir()
    (source / "products.csv").write_text(products)
    (source / "judgments_dev.csv").write_text(judgments)
    settings = Settings(data_dir=tmp_path / "data", homedepot_dir=source)
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    with pytest.raises(SystemExit) as exited:
        cli.main(["land-homedepot"])
    printed = capsys.readouterr()
    return settings, exited.value.code, printed.out + printed.err


GOOD_PRODUCTS = "product_id,title\n1,Oak &amp; pine shelf\n2,Brass hinge\n"


@pytest.mark.parametrize(("products", "judgments", "code", "message"), [
    ("product_id,name\n1,Oak shelf\n", "query,product_id,relevance\nshelf,1,3\n", 3, "needs the columns"),
    (GOOD_PRODUCTS, "query,product_id,relevance\nshelf,one,3\n", 3, "judgments_dev.csv cannot be read"),
    (GOOD_PRODUCTS, "query,product_id,relevance\nshelf,1,3\n   ,2,2\n", 2, "column 'query' breaks rule 'non-blank'"),
], ids=["missing column", "non-integer id", "blank query"])
def test_a_bad_home_depot_file_is_a_clear_error_and_lands_nothing(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], products: str, judgments: str,
        code: int, message: str) -> None:
    settings, exit_code, output = _land_command(tmp_path, monkeypatch, capsys, products, judgments)
    assert exit_code == code, output
    assert "Traceback" not in output
    assert message in " ".join(output.split()), output
    assert not list(settings.raw_dir.rglob("*.parquet"))  # not even the catalogue, when the events break the contract
