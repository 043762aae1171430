"""retire_workers moves data off before stopping; restart drops everything."""

import pytest

import shoal
from shoal.testing import Tally


def times_ten(x: int) -> int:
    return x * 10


def test_retire_workers_keeps_results_held_only_there(tally: Tally) -> None:
    with shoal.Client(processes=False, n_workers=3, threads_per_worker=1) as client:
        # given: results spread over three workers (each run noted in the tally)
        futures = client.map(tally.record, range(30))
        assert sum(client.gather(futures)) == 435
        assert tally.count() == 30
        holders = sorted({w for ws in client.who_has(futures).values() for w in ws})
        victim = holders[0]

        # when
        gone = client.retire_workers([victim], timeout=20)

        # then: it left, nothing it held was lost or recomputed elsewhere
        assert gone == [victim]
        assert victim not in client.nthreads()
        who_has = client.who_has(futures)
        assert all(ws and victim not in ws for ws in who_has.values())
        assert sum(client.gather(futures)) == 435
        assert tally.count() == 30  # every task ran once: the victim's results were moved


def test_restart_in_place_drops_everything_and_keeps_serving() -> None:
    with shoal.Client(processes=False, n_workers=2, threads_per_worker=1) as client:
        future = client.submit(times_ten, 1)
        assert future.result(timeout=10) == 10

        assert client.restart(timeout=20) == 2

        assert future.status == "lost"
        with pytest.raises(shoal.FutureLostError, match="restarted"):
            future.result(timeout=10)
        assert client.submit(times_ten, 2).result(timeout=10) == 20
