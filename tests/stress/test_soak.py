"""Soak: a seeded random mix of the public API for ``--minutes`` (1 by default), with worker
kills, checking every answer, that nothing hangs, that nothing is left in the scheduler and
that no process grows.

Run: ``pytest -m stress tests/stress/test_soak.py --minutes 10 [--soak-seed S]`` (env
``SHOAL_SOAK_MINUTES`` / ``SHOAL_SOAK_SEED`` also work). The seed is printed at the start;
the figures table at the end, and as JSON to ``$SHOAL_SOAK_REPORT`` if that is set. With
threads and a real cluster a seed replays the same choices, not the same interleaving.

The cluster: `gen_cluster(processes=True)`: the scheduler and the clients in this process,
2 worker processes with 2 threads each, each under a nanny. Load comes from
- 3 threads sharing the synchronous client (``sync-0..2``),
- 1 thread running an asynchronous client on its own event loop (``async``),
- 1 killer thread that SIGKILLs worker ``local-1`` now and then and waits (with a deadline)
  until its nanny has started a new one and the scheduler sees 2 workers again. Worker
  ``local-0`` is never killed, so that its growth can be measured over the whole run.

Allowed outcomes, per operation (anything else fails the test: a wrong value, an
unexpected exception type or message, a call past its deadline):
- every operation, if a kill of ``local-1`` happened while it ran (or up to
  `KILL_WINDOW` seconds before it started): `FutureLostError` (scattered data lives only
  where it was put), `ActorLostError`, `KilledWorkerError`. Computed results hit by a kill
  are recomputed from their recipe: a wrong value is never allowed.
- ``pure``: the right value (pure calls of the same arguments collide across the threads and
  the two clients: one key, computed once).
- ``keyed``: explicit keys from a small pool, each with a fixed recipe, submitted, then
  cancelled / released / waited at random and resubmitted: the right value, or
  `CancelledError` if this thread cancelled it, or if another thread of the same client
  cancelled the key after it was submitted (that cancels every future of the client for the
  key: dask's semantics); a resubmitted key must not end cancelled by an earlier cancel.
- ``map``: the right values (waited with a deadline, then gathered).
- ``fail``: the task's `ValueError` with its message, and a `RemoteTraceback` as cause.
- ``retries``: a task failing its first attempt, with ``retries=2``: the right value.
- ``scatter``: the same values scattered from several threads, then summed by a task.
- ``nested``: a task that submits tasks with `shoal.get_client()` and waits on them.
- ``actor`` (and ``a-actor``): ``submit(Counter, actor=True)``; ``incr`` calls answer 1, 2,
  3...; ``.n`` reads.
- ``coord``: Lock / Semaphore acquire with timeouts (False on timeout; never a value
  wrong), Event set/wait/clear, Queue put/get, Variable set/get (a value or a future),
  a dataset published/read/unpublished, Pub/Sub (from here and from a task, each
  publisher's messages in order), and a task taking a `shoal.Lock` in the cluster.
- ``dask``: `dask.delayed` sums through `client.compute` and `dask.compute(...,
  scheduler=client.get)`, and a small `dask.array` reduction.

At the end: every thread ended (none hung); the scheduler holds no task once every future
is dropped (polled with a deadline); and from the warm-up measure (at 20% of the run) to the
end, the RSS, open files and threads of this process (scheduler and clients) and of worker
``local-0`` grew by less than 10%, or a small absolute slack whichever is larger (RSS 20 MB,
5 files, 3 threads): a short run's numbers are small and noisy (allocator arenas, lazily
started thread pools), so 10% alone would flag noise, and the slack is well under what a
leak per operation would add over thousands of operations.
"""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import gc
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter as Tally
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest

import shoal
from shoal.testing import gen_cluster, wait_until

pytestmark = pytest.mark.stress

# The worker processes cannot import this module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SYNC_THREADS = 3
DEADLINE = 45.0  # seconds: every call that waits has this deadline (kills need recovery time)
HANG = 120.0  # an operation in flight this long is a hang (each wait in it is bounded)
KILL_EVERY = 12.0  # seconds between kills, on average
KILL_WINDOW = 10.0  # kill errors are allowed for operations started this long after a kill
RESTART_DEADLINE = 60.0  # a nanny must have the worker back within this
KEY_POOL = 6
WARM_UP = 0.2  # fraction of the run before the first resource measure
GROWTH = 0.10
SLACK = {"rss": 20 * 2**20, "fds": 5, "threads": 3}

KILL_ERRORS = (shoal.FutureLostError, shoal.ActorLostError, shoal.KilledWorkerError)
#: what else a kill may cause, per operation
KILL_ERRORS_OF = {
    # scatter sends the data to the workers itself: one dying under it is a ConnectionError
    # that names it (shoal.comm.CommClosedError), and nothing was scattered
    "scatter": (ConnectionError,),
}


# ------------------------------------------------------------------ task functions


def inc(x: int) -> int:
    return x + 1


def slow_square(i: int, delay: float) -> int:
    time.sleep(delay)
    return i * i


def fail(x: int) -> int:
    raise ValueError(f"soak failure {x}")


def flaky(path: str, x: int) -> int:
    """Fails its first run (per ``path``), then doubles ``x``."""
    with open(path, "a") as f:
        f.write("run\n")
    with open(path) as f:
        runs = len(f.readlines())
    if runs < 2:
        raise OSError(f"flaky first run {x}")
    return 2 * x


def total(values: list[int]) -> int:
    return sum(values)


def nested(n: int, deadline: float) -> int:
    client = shoal.get_client()
    futures = [client.submit(inc, i, pure=False) for i in range(n)]
    return sum(f.result(timeout=deadline) for f in futures)


def locked_inc(name: str, x: int, deadline: float) -> int:
    lock = shoal.Lock(name)
    if not lock.acquire(timeout=deadline):
        raise TimeoutError(f"task lock {name} not taken within {deadline}s")
    try:
        return x + 1
    finally:
        lock.release()


def publish(topic: str, msg: int) -> None:
    shoal.Pub(topic).put(msg)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n


# ------------------------------------------------------------------------ the run


class WrongAnswer(AssertionError):
    pass


def check(kind: str, got: Any, expected: Any) -> None:
    if got != expected:
        raise WrongAnswer(f"{kind}: got {got!r}, expected {expected!r}")


class Soak:
    """Shared state of one run: counts, failures, operations in flight, kill times."""

    def __init__(self, client: shoal.Client, seed: int, seconds: float, tmp: Path) -> None:
        self.client = client
        self.seed = seed
        self.seconds = seconds
        self.tmp = tmp
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ops: Tally[str] = Tally()
        self.outcomes: Tally[str] = Tally()  # "kind:outcome" other than a right value
        self.failures: list[str] = []
        self.inflight: dict[str, tuple[str, float]] = {}
        self.kill_times: list[float] = []
        self.kills = 0
        self.restart_seconds: list[float] = []
        self.serial = 0
        self.cancel_counts: Tally[str] = Tally()  # cancels of each key by the sync threads

    def cancels_of(self, key: str) -> int:
        with self.lock:
            return self.cancel_counts[key]

    def cancelled(self, key: str) -> None:
        with self.lock:
            self.cancel_counts[key] += 1

    def unique(self) -> int:
        with self.lock:
            self.serial += 1
            return self.serial

    def note(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.outcomes[f"{kind}:{outcome}"] += 1

    def fail(self, text: str) -> None:
        with self.lock:
            self.failures.append(text)
        self.stop.set()

    def killed_near(self, start: float) -> bool:
        with self.lock:
            return any(t >= start - KILL_WINDOW for t in self.kill_times)

    def run_op(self, who: str, kind: str, op: Callable[[], Any]) -> None:
        start = time.monotonic()
        with self.lock:
            self.inflight[who] = (kind, start)
            self.ops[kind] += 1
        try:
            op()
        except WrongAnswer as e:
            self.fail(f"{who} {kind}: {e}")
        except (*KILL_ERRORS, *KILL_ERRORS_OF.get(kind, ())) as e:
            if self.killed_near(start):
                self.note(kind, f"kill-hit {type(e).__name__}")
            else:
                self.fail(f"{who} {kind}: {type(e).__name__} with no kill near:\n"
                          + "".join(traceback.format_exception(e)))  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - every unexpected outcome is a failure
            self.fail(f"{who} {kind}: unexpected {type(e).__name__} after"
                      f" {time.monotonic() - start:.1f}s:\n"
                      + "".join(traceback.format_exception(e)))  # fmt: skip
        finally:
            with self.lock:
                del self.inflight[who]

    async def run_op_async(self, who: str, kind: str, op: Callable[[], Any]) -> None:
        start = time.monotonic()
        with self.lock:
            self.inflight[who] = (kind, start)
            self.ops[kind] += 1
        try:
            await op()
        except WrongAnswer as e:
            self.fail(f"{who} {kind}: {e}")
        except (*KILL_ERRORS, *KILL_ERRORS_OF.get(kind, ())) as e:
            if self.killed_near(start):
                self.note(kind, f"kill-hit {type(e).__name__}")
            else:
                self.fail(f"{who} {kind}: {type(e).__name__} with no kill near:\n"
                          + "".join(traceback.format_exception(e)))  # fmt: skip
        except BaseException as e:  # noqa: BLE001
            self.fail(f"{who} {kind}: unexpected {type(e).__name__} after"
                      f" {time.monotonic() - start:.1f}s:\n"
                      + "".join(traceback.format_exception(e)))  # fmt: skip
        finally:
            with self.lock:
                del self.inflight[who]


# ---------------------------------------------------------- synchronous operations


def op_pure(s: Soak, rng: random.Random, who: str) -> None:
    x = rng.randrange(20)
    check("pure", s.client.submit(inc, x).result(timeout=DEADLINE), inc(x))


def op_keyed(s: Soak, rng: random.Random, who: str) -> None:
    i = rng.randrange(KEY_POOL)
    key = f"soak-key-{i}"
    # A future of this client may end cancelled only by a cancel of its key that began after
    # it was submitted: `cancels[key]` counts cancels once they are made, so a count that did
    # not move since before the submit proves no other cancel could have reached it.
    before = s.cancels_of(key)
    f = s.client.submit(slow_square, i, 0.02, key=key)
    action = rng.choice(["result", "cancel", "release"])
    if action == "cancel":
        f.cancel()
        s.cancelled(key)
    elif action == "release":
        f.release()
    if action != "release":
        try:
            check("keyed", f.result(timeout=DEADLINE), i * i)  # it may have finished already
        except shoal.CancelledError:
            if action != "cancel" and s.cancels_of(key) == before:
                raise WrongAnswer(f"keyed: {key} cancelled, but nobody cancelled it") from None
            s.note("keyed", "cancelled")
    del f
    before = s.cancels_of(key)
    g = s.client.submit(slow_square, i, 0.02, key=key)  # again: a new hold, runs anew
    try:
        check("keyed", g.result(timeout=DEADLINE), i * i)
    except shoal.CancelledError:
        if s.cancels_of(key) == before:
            raise WrongAnswer(f"keyed: resubmitted {key} cancelled, but no cancel came after"
                              " the resubmit") from None  # fmt: skip
        s.note("keyed", "resubmit cancelled by another thread")


def op_map(s: Soak, rng: random.Random, who: str) -> None:
    n = rng.randrange(1, 30)
    base = rng.randrange(100)
    futures = s.client.map(inc, range(base, base + n))
    _, not_done = shoal.wait(futures, timeout=DEADLINE)
    if not_done:
        raise TimeoutError(f"map: {len(not_done)} of {n} not done within {DEADLINE}s")
    check("map", s.client.gather(futures), [inc(x) for x in range(base, base + n)])


def op_fail(s: Soak, rng: random.Random, who: str) -> None:
    x = rng.randrange(10)
    f = s.client.submit(fail, x)
    try:
        f.result(timeout=DEADLINE)
    except ValueError as e:
        check("fail", str(e), f"soak failure {x}")
        check("fail cause", type(e.__cause__), shoal.RemoteTraceback)
        s.note("fail", "ValueError (expected)")
    else:
        raise WrongAnswer("fail: the task's error was not raised")


def op_retries(s: Soak, rng: random.Random, who: str) -> None:
    x = rng.randrange(1000)
    path = str(s.tmp / f"flaky-{s.unique()}")
    check("retries", s.client.submit(flaky, path, x, retries=2, retry_delay=0.01,
                                      pure=False).result(timeout=DEADLINE), 2 * x)  # fmt: skip


def op_scatter(s: Soak, rng: random.Random, who: str) -> None:
    n = rng.randrange(1, 6)
    data = [rng.randrange(5) * 1000 + k for k in range(n)]  # repeats across threads
    futures = s.client.scatter(data)
    check("scatter", s.client.submit(total, futures).result(timeout=DEADLINE), sum(data))


def op_nested(s: Soak, rng: random.Random, who: str) -> None:
    n = rng.randrange(1, 5)
    check("nested", s.client.submit(nested, n, DEADLINE, pure=False).result(timeout=DEADLINE),
          sum(inc(i) for i in range(n)))  # fmt: skip


def op_actor(s: Soak, rng: random.Random, who: str) -> None:
    handle = s.client.submit(Counter, actor=True).result(timeout=DEADLINE)
    calls = [handle.incr(1) for _ in range(rng.randrange(1, 6))]
    check("actor", [c.result(timeout=DEADLINE) for c in calls], list(range(1, len(calls) + 1)))
    check("actor .n", handle.n, len(calls))


def op_coord(s: Soak, rng: random.Random, who: str) -> None:
    what = rng.choice(["lock", "semaphore", "event", "queue", "variable", "dataset", "task-lock",
                       "pubsub"])  # fmt: skip
    s.note("coord", what)
    c = s.client
    if what == "lock":
        lock = shoal.Lock(f"soak-lock-{rng.randrange(2)}", client=c)
        if lock.acquire(timeout=rng.choice([0.05, 0.5, 2.0])):
            check("lock locked", lock.locked(), True)
            lock.release()
        else:
            s.note("coord", "lock timed out")
    elif what == "semaphore":
        sem = shoal.Semaphore(max_leases=2, name="soak-semaphore", client=c)
        if sem.acquire(timeout=rng.choice([0.05, 0.5, 2.0])):
            value = sem.get_value()
            if not 1 <= value <= 2:
                raise WrongAnswer(f"semaphore: {value} leases held, while holding one of 2")
            sem.release()
        else:
            s.note("coord", "semaphore timed out")
    elif what == "event":
        event = shoal.Event(f"soak-event-{who}", client=c)  # one per thread: no races
        event.clear()
        check("event cleared", event.is_set(), False)
        check("event wait unset", event.wait(timeout=0.05), False)
        event.set()
        check("event wait set", event.wait(timeout=DEADLINE), True)
    elif what == "queue":
        queue = shoal.Queue(f"soak-queue-{who}", client=c)
        items = [rng.randrange(1000) for _ in range(rng.randrange(1, 4))]
        for item in items:
            queue.put(item, timeout=DEADLINE)
        check("queue", [queue.get(timeout=DEADLINE) for _ in items], items)
    elif what == "variable":
        variable = shoal.Variable(f"soak-variable-{who}", client=c)
        x = rng.randrange(1000)
        if rng.random() < 0.5:
            variable.set(x)
            check("variable", variable.get(timeout=DEADLINE), x)
        else:
            f = c.submit(inc, x)
            variable.set(f)  # the variable holds the key now
            del f
            got = variable.get(timeout=DEADLINE)
            check("variable future", got.result(timeout=DEADLINE), inc(x))
            del got
        variable.delete()
    elif what == "dataset":
        name = f"soak-dataset-{who}"
        x = rng.randrange(1000)
        f = c.submit(inc, x)
        datasets: dict[str, Any] = {name: f}
        c.publish_dataset(**datasets)
        del f, datasets
        try:
            got = c.get_dataset(name)
            check("dataset", got.result(timeout=DEADLINE), inc(x))
            del got
        finally:
            c.unpublish_dataset(name)
    elif what == "pubsub":
        topic = f"soak-topic-{who}"
        sub = shoal.Sub(topic, client=c)  # subscribed when this returns (sync client)
        try:
            items = [rng.randrange(1000) for _ in range(rng.randrange(1, 4))]
            pub = shoal.Pub(topic, client=c)
            for item in items:
                pub.put(item)
            x = -rng.randrange(1, 1000)  # one from a task too, told apart by its sign
            c.submit(publish, topic, x, pure=False).result(timeout=DEADLINE)
            got = [sub.get(timeout=DEADLINE) for _ in range(len(items) + 1)]
            # One publisher's messages arrive in order; the two publishers interleave.
            check("pubsub", ([m for m in got if m >= 0], [m for m in got if m < 0]), (items, [x]))
        finally:
            sub.close()
    else:
        x = rng.randrange(1000)
        check("task-lock", c.submit(locked_inc, "soak-task-lock", x, DEADLINE,
                                    pure=False).result(timeout=DEADLINE), x + 1)  # fmt: skip


def op_dask(s: Soak, rng: random.Random, who: str) -> None:
    import dask

    n = rng.randrange(2, 12)
    # "array" was out of the mix while two task threads of a fresh worker could unpickle
    # dask.array tasks at once and see dask.array half-imported ("No dispatch for ndarray");
    # a worker now unpickles task functions and arguments one at a time.
    how = rng.choice(["delayed", "client.get", "array"])
    parts = [dask.delayed(inc)(i) for i in range(n)]
    result = dask.delayed(total)(parts)
    if how == "delayed":
        check("dask delayed", s.client.compute(result).result(timeout=DEADLINE),
              sum(inc(i) for i in range(n)))  # fmt: skip
    elif how == "array":
        import dask.array as da

        x = (da.arange(n * 10, chunks=7) * 2).sum()
        check("dask array", int(s.client.compute(x).result(timeout=DEADLINE)),
              2 * sum(range(n * 10)))  # fmt: skip
    else:
        # dask.compute through client.get has no deadline of its own: the hang watchdog
        # (HANG seconds) is its deadline.
        (value,) = dask.compute(result, scheduler=s.client.get)
        check("dask client.get", value, sum(inc(i) for i in range(n)))
    s.note("dask", how)


SYNC_OPS: dict[str, tuple[float, Callable[..., None]]] = {
    "pure": (3, op_pure),
    "keyed": (3, op_keyed),
    "map": (2, op_map),
    "fail": (1, op_fail),
    "retries": (1, op_retries),
    "scatter": (2, op_scatter),
    "nested": (1, op_nested),
    # Was out of the mix while a handle arriving in a result bound to the process's most
    # recent client instead of the one that fetched it (fixed: `shoal.client.future.receive`).
    "actor": (1, op_actor),
    "coord": (2, op_coord),
    "dask": (1, op_dask),
}


def sync_loop(s: Soak, index: int) -> None:
    who = f"sync-{index}"
    rng = random.Random(f"{s.seed}-{who}")
    kinds = [k for k in SYNC_OPS if SYNC_OPS[k][0] > 0]
    weights = [SYNC_OPS[k][0] for k in kinds]
    while not s.stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        fn = SYNC_OPS[kind][1]
        s.run_op(who, kind, functools.partial(fn, s, rng, who))


# --------------------------------------------------------- asynchronous operations


async def async_loop(s: Soak, address: str) -> None:
    who = "async"
    rng = random.Random(f"{s.seed}-{who}")
    client = await shoal.Client(address, asynchronous=True)
    try:
        while not s.stop.is_set():
            kind = rng.choice(["a-pure", "a-keyed", "a-gather", "a-fail", "a-actor",
                               "a-variable"])  # fmt: skip

            async def op(kind: str = kind) -> None:
                if kind == "a-pure":  # collides with the sync client's pure calls
                    x = rng.randrange(20)
                    check(kind, await asyncio.wait_for(client.submit(inc, x), DEADLINE), inc(x))
                elif kind == "a-keyed":  # the same keys as the sync client's
                    i = rng.randrange(KEY_POOL)
                    f = client.submit(slow_square, i, 0.02, key=f"soak-key-{i}")
                    if rng.random() < 0.5:
                        client.cancel(f)
                        try:
                            check(kind, await asyncio.wait_for(f, DEADLINE), i * i)
                        except shoal.CancelledError:
                            s.note(kind, "cancelled")
                        f = client.submit(slow_square, i, 0.02, key=f"soak-key-{i}")
                    check(kind, await asyncio.wait_for(f, DEADLINE), i * i)
                elif kind == "a-gather":
                    n = rng.randrange(1, 20)
                    futures = client.map(inc, range(n))
                    got = await asyncio.wait_for(client.gather(futures), DEADLINE)
                    check(kind, got, [inc(i) for i in range(n)])
                elif kind == "a-fail":
                    x = rng.randrange(10)
                    try:
                        await asyncio.wait_for(client.submit(fail, x), DEADLINE)
                    except ValueError as e:
                        check(kind, str(e), f"soak failure {x}")
                        s.note(kind, "ValueError (expected)")
                    else:
                        raise WrongAnswer("a-fail: the task's error was not raised")
                elif kind == "a-actor":
                    handle = await asyncio.wait_for(client.submit(Counter, actor=True), DEADLINE)
                    values = [await asyncio.wait_for(handle.incr(2), DEADLINE) for _ in range(3)]
                    check(kind, values, [2, 4, 6])
                else:
                    variable = shoal.Variable("soak-variable-async", client=client)
                    x = rng.randrange(1000)
                    await asyncio.wait_for(variable.set(x), DEADLINE)
                    check(kind, await asyncio.wait_for(variable.get(timeout=DEADLINE),
                                                       DEADLINE + 5), x)  # fmt: skip
                    await asyncio.wait_for(variable.delete(), DEADLINE)

            await s.run_op_async(who, kind, op)
    finally:
        await asyncio.wait_for(client.close(), 30)


def async_thread(s: Soak, address: str) -> None:
    try:
        asyncio.run(async_loop(s, address))
    except BaseException as e:  # noqa: BLE001 - the client could not start or close
        s.fail("async: " + "".join(traceback.format_exception(e)))


# ------------------------------------------------------------------------ killing


def killer(s: Soak) -> None:
    """SIGKILL worker local-1 every ~KILL_EVERY s; wait until its nanny has a new one up."""
    rng = random.Random(f"{s.seed}-killer")
    cluster = s.client.cluster
    nanny = next(n for n in cluster.nannies if n.name == "local-1")
    while not s.stop.wait(rng.uniform(0.5 * KILL_EVERY, 1.5 * KILL_EVERY)):
        old = nanny.pid
        if old is None:
            s.fail("killer: worker local-1 has no process")
            return
        with s.lock:
            s.kill_times.append(time.monotonic())
            s.kills += 1
        start = time.monotonic()
        os.kill(old, signal.SIGKILL)

        def restarted(old: int = old) -> bool:
            pid = nanny.pid
            return (pid not in (None, old) and psutil.pid_exists(pid)
                    and len(cluster.scheduler.state.workers) == 2)  # fmt: skip

        try:
            wait_until(restarted, timeout=RESTART_DEADLINE, interval=0.05,
                       message="worker local-1 restarted by its nanny and back in the"
                       " scheduler")  # fmt: skip
        except AssertionError as e:
            s.fail(f"killer: {e}")
            return
        with s.lock:
            s.restart_seconds.append(time.monotonic() - start)
            s.kill_times.append(time.monotonic())  # recovery ends now: errors allowed after


# ---------------------------------------------------------------------- resources


def measure(pid: int) -> dict[str, int]:
    p = psutil.Process(pid)
    with p.oneshot():
        return {"rss": p.memory_info().rss, "fds": p.num_fds(), "threads": p.num_threads()}


def growth_problems(name: str, before: dict[str, int], after: dict[str, int]) -> list[str]:
    problems = []
    for what, slack in SLACK.items():
        allowed = max(before[what] * GROWTH, slack)
        if after[what] - before[what] > allowed:
            problems.append(f"{name} {what} grew {before[what]} -> {after[what]}"
                            f" (allowed +{allowed:g})")  # fmt: skip
    return problems


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- test


def test_soak(soak_minutes: float, soak_seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    seconds = soak_minutes * 60
    with capsys.disabled():
        print(f"\nsoak: {soak_minutes:g} min, seed {soak_seed} (replay: --soak-seed"
              f" {soak_seed} or SHOAL_SOAK_SEED={soak_seed})", flush=True)  # fmt: skip
    # The ini's faulthandler_timeout (120 s) would dump every stack mid-run: re-arm it for
    # this run's own budget (pytest cancels it after the test).
    faulthandler.dump_traceback_later(seconds + 280, exit=False, file=2)
    tmp = Path(tempfile.mkdtemp(prefix="shoal-soak-"))
    figures: dict[str, Any] = {}
    try:
        with gen_cluster(n_workers=2, threads_per_worker=2, processes=True,
                         timeout=seconds + 240, leak_timeout=20) as client:  # fmt: skip
            figures = run_soak(client, soak_seed, seconds, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(figures, capsys)
    assert not figures["failures"], "\n\n".join(figures["failures"])


def run_soak(client: shoal.Client, seed: int, seconds: float, tmp: Path) -> dict[str, Any]:
    s = Soak(client, seed, seconds, tmp)
    cluster = client.cluster
    steady = next(n for n in cluster.nannies if n.name == "local-0")
    steady_pid = steady.pid
    threads = [threading.Thread(target=sync_loop, args=(s, i), name=f"soak-sync-{i}")
               for i in range(SYNC_THREADS)]  # fmt: skip
    threads.append(threading.Thread(target=async_thread, args=(s, cluster.scheduler_address),
                                    name="soak-async"))  # fmt: skip
    threads.append(threading.Thread(target=killer, args=(s,), name="soak-killer"))
    start = time.monotonic()
    for t in threads:
        t.start()
    warm: dict[str, dict[str, int]] = {}
    end: dict[str, dict[str, int]] = {}
    try:
        while not s.stop.is_set():
            now = time.monotonic()
            if not warm and now - start >= WARM_UP * seconds:
                warm = {"scheduler+clients": measure(os.getpid()),
                        "worker local-0": measure(steady_pid)}  # fmt: skip
            if now - start >= seconds:
                end = {"scheduler+clients": measure(os.getpid()),
                       "worker local-0": measure(steady_pid)}  # fmt: skip
                break
            with s.lock:
                hung = [(who, kind, now - t0) for who, (kind, t0) in s.inflight.items()
                        if now - t0 > HANG]  # fmt: skip
            if hung:
                faulthandler.dump_traceback(file=2, all_threads=True)
                s.fail(f"hung operations: {hung}")
            s.stop.wait(0.5)
    finally:
        s.stop.set()
        joined_by = time.monotonic() + HANG  # every wait in an operation is bounded
        for t in threads:
            t.join(timeout=max(0.0, joined_by - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            faulthandler.dump_traceback(file=2, all_threads=True)
            s.fail(f"threads still running {HANG}s after the stop: {alive} (a hang)")
    elapsed = time.monotonic() - start

    # Nothing is wanted any more: the scheduler must forget every task.
    gc.collect()
    tasks = cluster.scheduler.state.tasks
    try:
        wait_until(lambda: len(tasks) == 0, timeout=30, interval=0.05,
                   message=lambda: f"the scheduler forgot every task (holds {len(tasks)}:"
                   f" {sorted(tasks)[:10]})")  # fmt: skip
    except AssertionError as e:
        s.fail(str(e))
    # The scheduler heard of each kill from the nanny (it keeps the latest MAX_DEATHS).
    from shoal.scheduler import MAX_DEATHS

    deaths = [d for d in client.worker_deaths()
              if d["name"] == "local-1" and d["reason"] == "signal SIGKILL"]  # fmt: skip
    if len(deaths) != min(s.kills, MAX_DEATHS):
        s.fail(f"{s.kills} kills, but the scheduler reports {len(deaths)} SIGKILL deaths of"
               f" local-1: {client.worker_deaths()}")  # fmt: skip
    if steady.pid != steady_pid:
        s.fail(f"worker local-0 (never killed) was restarted: {client.worker_deaths()}")

    growth = {}
    if warm and end:
        for name in warm:
            s.failures.extend(growth_problems(name, warm[name], end[name]))
            growth[name] = {k: {"warm": warm[name][k], "end": end[name][k]} for k in SLACK}
    elif not s.failures:
        s.fail("the run ended before its resources were measured")
    errors: Tally[str] = Tally()
    for key, n in s.outcomes.items():
        outcome = key.split(":", 1)[1]
        if "Error" in outcome or "cancelled" in outcome or "timed out" in outcome:
            errors[key] = n
    return {
        "seed": seed, "seconds": round(elapsed, 1), "ops": dict(s.ops),
        "outcomes": dict(s.outcomes), "errors": dict(errors), "kills": s.kills,
        "restart_seconds": [round(x, 2) for x in s.restart_seconds],
        "growth": growth, "failures": s.failures,
    }  # fmt: skip


def report(figures: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    if not figures:
        return
    ops = figures["ops"]
    rows = [[k, ops[k], sum(n for o, n in figures["outcomes"].items()
                            if o.startswith(k + ":") and o in figures["errors"])]
            for k in sorted(ops)]  # fmt: skip
    text = [(f"soak figures: seed {figures['seed']}, {figures['seconds']} s,"
             f" {sum(ops.values())} operations, {figures['kills']} kills (worker local-1;"
             f" restarts took {figures['restart_seconds']} s)"),
            table(rows, ["operation", "count", "errors/cancels (allowed)"]),
            table([[k, n] for k, n in sorted(figures["outcomes"].items())],
                  ["outcome", "count"])]  # fmt: skip
    grow_rows = []
    for name, values in figures["growth"].items():
        for what, v in values.items():
            scale = 2**20 if what == "rss" else 1
            unit = " MiB" if what == "rss" else ""
            grow_rows.append([name, what, f"{v['warm'] / scale:.1f}{unit}",
                              f"{v['end'] / scale:.1f}{unit}",
                              f"{(v['end'] - v['warm']) / max(v['warm'], 1):+.1%}"])  # fmt: skip
    text.append(table(grow_rows, ["process", "measure", "after warm-up", "end", "growth"]))
    if figures["failures"]:
        text.append(f"FAILURES: {len(figures['failures'])}")
    with capsys.disabled():
        print("\n" + "\n\n".join(text), flush=True)
    path = os.environ.get("SHOAL_SOAK_REPORT")
    if path:
        Path(path).write_text(json.dumps(figures, indent=2, sort_keys=True))
