"""Options of the soak test (tests/stress/test_soak.py).

- ``--minutes M`` (or ``SHOAL_SOAK_MINUTES``): how long the mix runs; 1 by default.
- ``--soak-seed S`` (or ``SHOAL_SOAK_SEED``): the seed of the mix; fixed by default, printed
  at the start so that a failing run can be replayed.

pytest calls ``pytest_addoption`` only for conftests it loads before parsing the command
line: this one is, when the command names ``tests/stress`` or a file in it (as in
``pytest -m stress tests/stress/test_soak.py --minutes 10``). Run from elsewhere (``pytest
tests``), the options do not exist; the fixtures then fall back to the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent

DEFAULT_MINUTES = 1.0
DEFAULT_SEED = 20261202


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("soak", "the soak test (tests/stress/test_soak.py)")
    group.addoption("--minutes", type=float, default=None, metavar="M",
                    help=f"how long the soak test runs (env SHOAL_SOAK_MINUTES; default"
                    f" {DEFAULT_MINUTES:g})")  # fmt: skip
    group.addoption("--soak-seed", type=int, default=None, metavar="S",
                    help=f"seed of the soak test's random mix (env SHOAL_SOAK_SEED; default"
                    f" {DEFAULT_SEED})")  # fmt: skip


def _option(config: pytest.Config, name: str) -> Any:
    try:
        return config.getoption(name)
    except ValueError:  # this conftest was not loaded early enough to add it
        return None


def soak_minutes_of(config: pytest.Config) -> float:
    value = _option(config, "--minutes")
    if value is None:
        value = os.environ.get("SHOAL_SOAK_MINUTES") or DEFAULT_MINUTES
    return float(value)


@pytest.fixture
def soak_minutes(request: pytest.FixtureRequest) -> float:
    return soak_minutes_of(request.config)


@pytest.fixture
def soak_seed(request: pytest.FixtureRequest) -> int:
    value = _option(request.config, "--soak-seed")
    if value is None:
        value = os.environ.get("SHOAL_SOAK_SEED") or DEFAULT_SEED
    return int(value)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The ini's 120 s pytest-timeout would stop any soak longer than a minute: give the soak
    # its own limit, its run time plus room for start-up, recovery checks and shutdown.
    limit = int(soak_minutes_of(config) * 60 + 300)
    for item in items:
        if item.path.parent == HERE and item.name.startswith("test_soak"):
            item.add_marker(pytest.mark.timeout(limit))
