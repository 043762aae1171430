"""``client.get_scheduler_logs()`` / ``client.get_worker_logs()``: each server's newest log
records, over the protocol (the scheduler fans out to the workers)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from shoal.testing import gen_cluster


@pytest.fixture
def shoal_info() -> Iterator[None]:
    """The ``shoal`` logger at INFO for the test (what ``SHOAL_LOG_LEVEL=info`` does)."""
    logger = logging.getLogger("shoal")
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(before)


def test_scheduler_and_in_process_worker_logs(shoal_info: None) -> None:
    with gen_cluster(n_workers=2) as client:
        logging.getLogger("shoal.scheduler").warning("a mark in the scheduler's log")

        rows = client.get_scheduler_logs()
        # rows are (time, level, logger, message), oldest first
        assert all(len(r) == 4 and isinstance(r[0], float) for r in rows)
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)
        messages = [r[3] for r in rows]
        assert any(m.startswith("client ") and "connected" in m for m in messages)
        assert rows[-1][1:] == ("WARNING", "shoal.scheduler", "a mark in the scheduler's log")
        assert len(client.get_scheduler_logs(n=2)) == 2

        per_worker = client.get_worker_logs(n=50)
        assert set(per_worker) == set(client.scheduler_info()["workers"])
        for records in per_worker.values():
            assert 0 < len(records) <= 50
        # by name too
        only = client.get_worker_logs(workers=["local-0"])
        assert len(only) == 1


def test_worker_process_logs_come_from_its_own_process(monkeypatch: pytest.MonkeyPatch,
                                                       shoal_info: None) -> None:
    # given: SHOAL_LOG_LEVEL=info, which worker processes inherit (and the scheduler here
    # applies too: ``shoal_info`` puts the level back afterwards)
    monkeypatch.setenv("SHOAL_LOG_LEVEL", "info")
    with gen_cluster(n_workers=1, processes=True) as client:
        (address, rows), = client.get_worker_logs().items()
        # then: the worker's own records, from its process
        assert any(r[2] == "shoal.worker" and "joined" in r[3] and address in r[3] for r in rows)
        assert not any(r[2] == "shoal.scheduler" for r in rows)
