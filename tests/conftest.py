"""Shared fixtures: clients on fresh local clusters that fail the test if they leak.

- ``client``: 2 in-process workers (fast; use it unless processes are the point).
- ``process_client``: 2 worker processes.
- ``gate``: a `shoal.testing.Gate` for tasks on ``client`` (in-process workers only).
- ``tally``: a `shoal.testing.Tally` in a temporary directory, to count task runs.
- ``--gc-stress N`` (or ``SHOAL_GC_STRESS=N``): the cyclic GC runs every N allocations.
- ``require``: ``require(condition, why)`` for what a test needs from the machine (root,
  network namespaces, Redis, Chromium): skips without it locally, fails under CI (``$CI``
  set), where .ci/run provides it, so that a test cannot vanish from CI unnoticed.

Helpers tests import live in `shoal.testing`, not here: test modules cannot reliably import
a conftest (pytest may load several under the one name ``conftest``).
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import shoal
from shoal.testing import Gate, Tally, gen_cluster


@pytest.fixture
def client() -> Iterator[shoal.Client]:
    """A client on 2 in-process workers with 1 thread each."""
    with gen_cluster(n_workers=2, threads_per_worker=1, processes=False) as c:
        yield c


@pytest.fixture
def process_client() -> Iterator[shoal.Client]:
    """A client on 2 worker processes with 1 thread each."""
    with gen_cluster(n_workers=2, threads_per_worker=1, processes=True) as c:
        yield c


@pytest.fixture
def gate(client: shoal.Client) -> Iterator[Gate]:
    """A gate for tasks on the ``client`` fixture's cluster, opened before that closes."""
    g = Gate()
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def tally() -> Iterator[Tally]:
    """A tally file in a temporary directory, removed afterwards."""
    directory = tempfile.mkdtemp(prefix="shoal-tally-")
    try:
        yield Tally(Path(directory) / "tally.txt")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _require(condition: object, why: str) -> None:
    """Skip without ``condition`` locally; fail under CI (``$CI`` set), which must have it."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must provide it: see .ci/run)", pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="session")
def require() -> Callable[[object, str], None]:
    """``require(condition, why)``: skip locally, fail under CI, without ``condition``."""
    return _require


# ----------------------------------------------------------------- GC-stress mode


# The suite never reads the developer's ~/.config/shoal/shoal.toml (or a SHOAL_CONFIG they
# set): every process it starts sees an empty config file. tests/config sets its own.
_EMPTY_CONFIG = tempfile.NamedTemporaryFile(prefix="shoal-empty-", suffix=".toml", delete=False)
_EMPTY_CONFIG.close()
os.environ["SHOAL_CONFIG"] = _EMPTY_CONFIG.name
atexit.register(os.unlink, _EMPTY_CONFIG.name)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--gc-stress", type=int, default=int(os.environ.get("SHOAL_GC_STRESS") or 0),
        metavar="N", help="run the cyclic garbage collector every N allocations (and switch"
        " threads often), so finalizers run anywhere, inside any lock (env SHOAL_GC_STRESS)")


def pytest_configure(config: pytest.Config) -> None:
    every = config.getoption("--gc-stress")
    if every:
        # Generation 0 is collected each `every` allocations, on whichever thread allocates;
        # older generations often too, so cycles of futures die at random points.
        gc.set_threshold(every, 2, 2)
        sys.setswitchinterval(0.0005)
