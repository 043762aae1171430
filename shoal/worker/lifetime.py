"""A worker's lifetime (``shoal worker --lifetime``): retire gracefully before a batch
system's walltime kills it.

When the lifetime is up the worker asks the scheduler to retire it, as a client would
(`Client.retire_workers`): it takes no new work, the results only it holds are copied to
other workers, then the scheduler closes it and its process exits 0 (so a batch job ends
and its cluster submits a replacement). If the scheduler cannot be asked, or the retirement
does not finish within ``grace`` seconds, the worker closes anyway: its results are then
recomputed from their recipes, as for any lost worker.

``stagger`` takes a random 0..stagger seconds off each worker's lifetime, so that workers
started together do not all leave at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import Worker

logger = logging.getLogger("shoal.worker")

__all__ = ["effective_lifetime", "retire_at_lifetime"]


def effective_lifetime(lifetime: float, stagger: float, rng: random.Random | None = None) -> float:
    """``lifetime`` less a random 0..``stagger`` seconds (never below 0); a bad value is an
    error naming it."""
    if not lifetime > 0:
        raise ValueError(f"lifetime must be a positive number of seconds, not {lifetime!r}")
    if not stagger >= 0:
        raise ValueError(f"lifetime stagger must be >= 0 seconds, not {stagger!r}")
    return max(0.0, lifetime - (rng or random).uniform(0, stagger))


async def retire_at_lifetime(worker: Worker, lifetime: float, grace: float = 120.0) -> None:
    """After ``lifetime`` seconds ask the scheduler to retire ``worker``; close it anyway if
    that has not happened ``grace`` seconds later. Runs until the worker closes."""
    try:
        await asyncio.wait_for(worker.finished(), lifetime)
        return  # closed before its time
    except asyncio.TimeoutError:
        pass
    logger.info("worker %s reached its lifetime (%.0fs): retiring", worker.address, lifetime)
    address = worker.address

    def ask() -> None:
        # The worker's own client (its tasks' client): the worker's token and credentials.
        worker.task_clients.get().retire_workers([address], timeout=grace)

    asker = asyncio.ensure_future(asyncio.to_thread(ask))
    finished = asyncio.ensure_future(worker.finished())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    pending = {asker, finished}
    while finished in pending and loop.time() < deadline:
        done, pending = await asyncio.wait(pending, timeout=deadline - loop.time(),
                                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if asker in done and asker.exception() is not None and finished not in done:
            logger.warning("worker %s could not ask to be retired (%s); closing", address,
                           asker.exception())  # fmt: skip
            break
    if not finished.done():
        if loop.time() >= deadline:
            logger.warning("worker %s was not retired within %.0fs of its lifetime; closing",
                           address, grace)  # fmt: skip
        await worker.close("lifetime reached")
    finished.cancel()
    if not asker.done():
        # It ends once the scheduler answers, or fails as the task client closes.
        asker.add_done_callback(lambda f: f.cancelled() or f.exception())
    elif not asker.cancelled():
        asker.exception()  # retrieved: a failure after we closed is expected
