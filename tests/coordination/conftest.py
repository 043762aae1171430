"""Fixtures for coordination tests: more clients on the ``client`` fixture's cluster, and a
look at the scheduler's coordination state (the cluster is in-process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import shoal
from shoal.coordination.service import CoordinationExtension, DatasetExtension


@pytest.fixture
def connect(client: shoal.Client) -> Iterator[Callable[[], shoal.Client]]:
    """Makes more synchronous clients of the same scheduler; closes them afterwards.
    They are not made the default, so ``client=None`` still means the ``client`` fixture."""
    made: list[shoal.Client] = []

    def make() -> shoal.Client:
        c = shoal.Client(client.scheduler_address, set_as_default=False)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


@pytest.fixture
def coordination(client: shoal.Client) -> CoordinationExtension:
    """The scheduler's coordination extension (to check what it holds)."""
    return next(e for e in client.cluster.scheduler.extensions
                if isinstance(e, CoordinationExtension))  # fmt: skip


@pytest.fixture
def datasets(client: shoal.Client) -> DatasetExtension:
    return next(e for e in client.cluster.scheduler.extensions if isinstance(e, DatasetExtension))
