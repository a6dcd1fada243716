"""Shared fixtures: a tiny simulated world, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval_core.settings import Settings
from retrieval_core.simulator import SimulationSummary, simulate, world_config


@pytest.fixture(scope="session")
def tiny_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("tiny")
    return Settings(data_dir=root / "data", artifacts_dir=root / "artifacts")


@pytest.fixture(scope="session")
def tiny_world(tiny_settings: Settings) -> SimulationSummary:
    s = tiny_settings
    return simulate(world_config("tiny"), s.raw_dir, s.landing_dir, s.quarantine_dir, s.diagnostics_dir,
                    show_progress=False)


def files_digest(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.parquet"))}


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The tiny world with its features built through 2026-10-05 on the local profile (10-06 held out)."""
    from feature_repo.stages import build_feature_day
    from tests.feature_helpers import FIRST_BUILD, NEXT_DAY, simulate_tiny

    root = tmp_path_factory.mktemp("features-local")
    settings = Settings(profile="local", data_dir=root / "data", artifacts_dir=root / "artifacts")
    simulate_tiny(settings)
    build_feature_day(settings, FIRST_BUILD)
    build_feature_day(settings, NEXT_DAY)
    return settings
