"""``shoal.progress``: bars per task group for futures, graphs and dask collections."""

from __future__ import annotations

import asyncio
import io
import re

import pytest

import shoal
from shoal.diagnostics.progress import futures_of
from shoal.diagnostics.service import RECHECK_BELOW, DiagnosticsExtension
from shoal.testing import Gate, gen_cluster, wait_until


def inc(x: int) -> int:
    return x + 1


def boom(x: int) -> int:
    raise ValueError(x)


def bars(text: str) -> dict[str, tuple[int, int]]:
    """``{group: (done, total)}`` from the plain-text bars."""
    return {m.group(1): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^(\S+)\s+\[[#-]+\]\s+(\d+)/(\d+)", text, re.MULTILINE)}  # fmt: skip


def test_progress_counts_every_task_a_future_needs() -> None:
    with gen_cluster(n_workers=2) as client:
        futures = client.map(inc, range(50))
        total = client.submit(sum, futures)
        out = io.StringIO()
        shoal.progress(total, file=out)
        assert total.done()
        assert bars(out.getvalue()) == {"inc": (50, 50), "sum": (1, 1)}
        assert "51 tasks completed" in out.getvalue()

        # one bar for all, and nothing to show for nothing
        out = io.StringIO()
        shoal.progress([total], multi=False, file=out)
        assert bars(out.getvalue()) == {"all": (1, 1)}  # already in memory: only itself
        assert shoal.progress([], file=out) is None


def test_progress_of_many_tasks_reads_the_task_stream() -> None:
    n = RECHECK_BELOW + 500  # more than are re-checked on each update
    with gen_cluster(n_workers=2, threads_per_worker=2) as client:
        futures = client.map(inc, range(n))
        out = io.StringIO()
        shoal.progress(futures, file=out, interval=0.01)
        assert bars(out.getvalue()) == {"inc": (n, n)}


def test_progress_shows_errors_and_ends() -> None:
    with gen_cluster(n_workers=1) as client:
        bad = client.submit(boom, 1)
        after = client.submit(inc, bad)
        out = io.StringIO()
        shoal.progress(after, file=out)
        text = out.getvalue()
        assert "(1 erred)" in text and "not successfully" in text
        assert after.status == "error"


def test_progress_of_dask_collections() -> None:
    da = pytest.importorskip("dask.array")
    with gen_cluster(n_workers=2) as client:
        x = da.ones((40, 40), chunks=(10, 10)) + 1
        persisted = client.persist(x)
        assert len(futures_of(persisted)) == 16
        out = io.StringIO()
        shoal.progress(persisted, file=out)
        assert bars(out.getvalue())["add"] == (16, 16)

        total = client.compute(x.sum())
        out = io.StringIO()
        shoal.progress(total, file=out)
        assert total.result() == 3200
        assert all(done == n for done, n in bars(out.getvalue()).values())


def test_progress_with_an_asynchronous_client() -> None:
    async def main() -> str:
        async with shoal.Client(n_workers=1, processes=False, dashboard_address=None,
                                asynchronous=True) as client:  # fmt: skip
            futures = client.map(inc, range(5))
            out = io.StringIO()
            await shoal.progress(futures, file=out)
            return out.getvalue()

    assert bars(asyncio.run(main())) == {"inc": (5, 5)}


def test_progress_watch_is_dropped_when_progress_stops() -> None:
    with gen_cluster(n_workers=1) as client:
        gate = Gate()
        try:
            blocked = client.submit(gate, 1)
            ext = next(e for e in client.cluster.scheduler.extensions
                       if isinstance(e, DiagnosticsExtension))  # fmt: skip
            with pytest.raises(TimeoutError):
                shoal.progress(blocked, file=io.StringIO(), timeout=0.2)
            # a watch that timed out is let go (its client tells the scheduler)
            wait_until(lambda: not ext.watches, timeout=5, message="the watch dropped")
        finally:
            gate.close()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_rich_bars_in_a_terminal() -> None:
    with gen_cluster(n_workers=1) as client:
        futures = client.map(inc, range(20))
        out = Terminal()
        shoal.progress(futures, file=out)
        text = out.getvalue()
        assert "inc" in text and "20/20" in text and "\x1b[" in text  # drawn with rich
