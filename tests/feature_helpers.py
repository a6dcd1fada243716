"""Helpers shared by the feature-pipeline tests of both profiles."""

from __future__ import annotations

import datetime as dt

from retrieval_core.settings import Settings
from retrieval_core.simulator import simulate, world_config

FIRST_BUILD = dt.date(2026, 10, 4)  # builds the backlog 10-01..10-04 in one go
NEXT_DAY = dt.date(2026, 10, 5)
HELD_OUT = dt.date(2026, 10, 6)  # corrupted in the gate tests


def simulate_tiny(settings: Settings) -> None:
    simulate(world_config("tiny"), settings.raw_dir, settings.landing_dir, settings.quarantine_dir,
             settings.diagnostics_dir, show_progress=False)
