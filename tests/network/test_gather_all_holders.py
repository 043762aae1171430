"""The client gathers from all holders at once: one GetData per holder, all in flight together."""

from __future__ import annotations

from typing import Any

import pytest

import shoal
from shoal.testing import gen_cluster


def block(i: int) -> bytes:
    return bytes([i]) * 100_000


def test_gather_sends_its_requests_to_three_holders_concurrently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with gen_cluster(n_workers=3, threads_per_worker=1, processes=False) as client:
        # given: one result on each of three workers
        workers = sorted(client.nthreads())
        assert len(workers) == 3
        futures = [client.submit(block, i, workers=[w], allow_other_workers=False)
                   for i, w in enumerate(workers)]  # fmt: skip
        shoal.wait(futures, timeout=30)
        assert sorted(w for ws in client.who_has(futures).values() for w in ws) == workers

        # and: the client's requests to workers counted while they are in flight
        peers = client._peers
        assert peers is not None
        request = peers.request
        in_flight: list[str] = []
        most: list[int] = [0]
        asked: list[str] = []

        async def counted(address: str, msg: Any, timeout: float | None = None) -> Any:
            in_flight.append(address)
            asked.append(address)
            most[0] = max(most[0], len(in_flight))
            try:
                return await request(address, msg, timeout)
            finally:
                in_flight.remove(address)

        monkeypatch.setattr(peers, "request", counted)

        # when
        values = client.gather(futures)

        # then: one request per holder, all three out before the first answer came back
        assert values == [block(i) for i in range(3)]
        assert sorted(asked) == workers
        assert most[0] == 3
