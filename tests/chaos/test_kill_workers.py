"""Chaos: SIGKILL a random worker at a random moment of a 1,000-task dependent graph, 20
times over, and check that every run still gives the right answer within a deadline.

A real ``shoal scheduler`` and three ``shoal worker`` processes (the CLI worker has no
nanny: SIGKILL ends the worker itself). After each kill a replacement worker is started, so
three remain for the next trial. Recovery time = the disturbed run's time minus the
undisturbed baseline (the median of three runs before the trials). The table is printed;
with ``SHOAL_WRITE_RESULTS=1`` it also replaces the "Chaos test (recovery times)" section
of ``bench/RESULTS.md``. ``SHOAL_CHAOS_SEED`` picks the victims and moments.
"""

from __future__ import annotations

import collections
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import shoal
from shoal.testing import ShoalProcess, no_leaks, spawn_scheduler, wait_until

pytestmark = [pytest.mark.stress, pytest.mark.timeout(400)]

# The workers cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRIALS = 20
N_WORKERS = 3
NTHREADS = 2
WIDTH, DEPTH = 40, 25  # 1,000 dependent tasks, and one that sums the last layer
PAUSE = 0.008  # seconds of "work" per task, so that a run lasts long enough to be hit
RUN_DEADLINE = 60.0  # a disturbed run must finish within this: no hang
MODULUS = 1_000_003
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md"
SECTION = "## Chaos test (recovery times)"


def leaf(i: int, seed: int) -> int:
    return (i * 7919 + seed) % MODULUS


def combine(a: int, b: int, pause: float) -> int:
    if pause:
        time.sleep(pause)
    return (a * 31 + b) % MODULUS


def total(values: list[int]) -> int:
    return sum(values)


def expected_total(seed: int) -> int:
    layer = [leaf(i, seed) for i in range(WIDTH)]
    for _ in range(DEPTH - 1):
        layer = [combine(layer[j], layer[(j + 1) % WIDTH], 0) for j in range(WIDTH)]
    return total(layer)


def submit_graph(client: shoal.Client, seed: int) -> list[shoal.Future]:
    """Every future of the graph (the client holds them all); the final sum is the last."""
    layer = [client.submit(leaf, i, seed) for i in range(WIDTH)]
    futures = list(layer)
    for _ in range(DEPTH - 1):
        layer = [client.submit(combine, layer[j], layer[(j + 1) % WIDTH], PAUSE)
                 for j in range(WIDTH)]  # fmt: skip
        futures += layer
    futures.append(client.submit(total, layer))
    return futures


class WorkerPool:
    """``shoal worker`` processes: started, SIGKILLed, and at the end stopped cleanly."""

    def __init__(self, scheduler_address: str) -> None:
        self.scheduler_address = scheduler_address
        self.live: list[ShoalProcess] = []
        self.killed: list[ShoalProcess] = []
        self._names = iter(range(1000))

    def launch(self) -> ShoalProcess:
        """Start a worker; `ready` waits for it to join."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("SHOAL_TOKEN", None)
        name = f"chaos-{next(self._names)}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "worker", self.scheduler_address,
             "--nthreads", str(NTHREADS), "--name", name, "--log-level", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env)  # fmt: skip
        process = ShoalProcess(proc, f"shoal worker {name}")
        self.live.append(process)
        return process

    def ready(self, process: ShoalProcess, timeout: float = 30.0) -> None:
        process.address = process.wait_for_line(r"listening at (\S+)", timeout).group(1)

    def sigkill(self, process: ShoalProcess) -> None:
        self.live.remove(process)
        self.killed.append(process)
        os.kill(process.pid, signal.SIGKILL)

    def close(self) -> None:
        """SIGTERM the live workers (each must exit with 0); reap the killed ones."""
        errors = []
        for process in self.live:
            try:
                process.stop(signal.SIGTERM, timeout=15)
            except AssertionError as exc:
                errors.append(str(exc))
        for process in self.killed:
            process.kill()  # reaps it; it is dead already
            assert process.proc.returncode == -signal.SIGKILL, process.output()
        assert not errors, "\n".join(errors)


def count_reports(client: shoal.Client) -> collections.Counter[str]:
    """Count the `KeyInMemory` messages the client gets, per key."""
    from shoal.protocol.messages import KeyInMemory

    counts: collections.Counter[str] = collections.Counter()
    original = client._on_message

    def on_message(msg: Any) -> None:
        if isinstance(msg, KeyInMemory):
            counts[msg.key] += 1
        original(msg)

    client._on_message = on_message  # type: ignore[method-assign]
    return counts


def run_once(client: shoal.Client, seed: int) -> float:
    start = time.monotonic()
    futures = submit_graph(client, seed)
    assert futures[-1].result(timeout=RUN_DEADLINE) == expected_total(seed)
    return time.monotonic() - start


def table(rows: list[dict[str, Any]], baseline: float) -> str:
    head = ("| trial | victim | killed at | graph done before kill? | run time | recovery"
            " (run - baseline) | kill -> done | results recomputed |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['trial']} | {r['victim']} | {r['kill_at']:.2f} s | {'yes' if r['before'] else 'no'}"
            f" | {r['run']:.2f} s | {r['recovery']:+.2f} s | {r['kill_to_done']:.2f} s"
            f" | {r['recomputed']} |")  # fmt: skip
    recoveries = sorted(r["recovery"] for r in rows if not r["before"])
    if recoveries:
        p90 = recoveries[min(len(recoveries) - 1, round(0.9 * (len(recoveries) - 1)))]
        lines.append("")
        lines.append(f"Baseline (undisturbed, median of 3): {baseline:.2f} s. Recovery over"
                     f" {len(recoveries)} kills: median {statistics.median(recoveries):+.2f} s,"
                     f" p90 {p90:+.2f} s, max {recoveries[-1]:+.2f} s; every run gave the"
                     " right answer.")  # fmt: skip
    return "\n".join(lines)


def write_section(text: str, took: float, seed: int) -> None:
    """Replace (or append) this test's section of bench/RESULTS.md, and only that."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=RESULTS.parent, check=False).stdout.strip()  # fmt: skip
    except OSError:
        rev = "?"
    intro = (
        "`SHOAL_WRITE_RESULTS=1 .venv/bin/python -m pytest -m stress"
        f" {Path(__file__).resolve().relative_to(RESULTS.parents[1])}`"
        f" ({took:.0f} s; seed {seed}). A real `shoal scheduler` and {N_WORKERS} `shoal worker`"
        f" processes ({NTHREADS} threads each) on loopback; each trial runs a"
        f" {WIDTH * DEPTH:,}-task dependent graph ({WIDTH} wide, {DEPTH} deep, each task"
        f" depending on two of the layer before, {PAUSE * 1000:g} ms of work per task, plus a"
        " final sum), SIGKILLs a random worker at a random moment of it and starts a"
        " replacement. \"run time\" is from submitting the graph to its result; \"results"
        " recomputed\" counts keys the client was told about twice (lost with the killed"
        " worker, computed again)."
    )
    date = time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())
    machine = (f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python"
               f" {platform.python_version()}; other processes were using the machine meanwhile")
    body = "\n".join([SECTION, "", intro, "",
                      f"- date: {date}; git {rev} (plus uncommitted changes)", machine,
                      "", text, ""])  # fmt: skip
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(current):
        updated = pattern.sub(lambda _: body + "\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + body
    RESULTS.write_text(updated)


def test_sigkill_a_random_worker_at_a_random_moment(capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("SHOAL_CHAOS_SEED", "20261122"))
    rng = random.Random(seed)
    began = time.monotonic()
    rows: list[dict[str, Any]] = []
    with no_leaks(timeout=30), spawn_scheduler(extra_args=["--log-level", "warning"]) as scheduler:
        pool = WorkerPool(scheduler.address)
        try:
            for process in [pool.launch() for _ in range(N_WORKERS)]:
                pool.ready(process)
            with shoal.Client(scheduler.address, timeout=10, set_as_default=False) as client:
                client.wait_for_workers(N_WORKERS, timeout=30)
                reports = count_reports(client)
                # given: the undisturbed time of the graph
                run_once(client, seed=1)  # warm-up
                baseline = statistics.median(run_once(client, seed=s) for s in (2, 3, 4))
                for trial in range(1, TRIALS + 1):
                    graph_seed = 1000 * seed % 7919 + trial * 17 + 100
                    kill_at = rng.uniform(0.05, 0.8) * baseline
                    victim = rng.choice(pool.live)
                    reports.clear()
                    # when the graph runs and a random worker is SIGKILLed at a random moment
                    start = time.monotonic()
                    futures = submit_graph(client, graph_seed)
                    time.sleep(max(0.0, start + kill_at - time.monotonic()))  # the moment
                    before = futures[-1].done()
                    pool.sigkill(victim)
                    killed = time.monotonic()
                    replacement = pool.launch()
                    # then the graph still gives the right answer, within the deadline
                    try:
                        value = futures[-1].result(timeout=RUN_DEADLINE)
                    except TimeoutError:
                        pending = [f.key for f in futures if not f.done()]
                        raise AssertionError(
                            f"trial {trial}: the graph hung after a worker was killed"
                            f" ({len(pending)} keys pending; story of {pending[0]}:"
                            f" {client.story(pending[0])})") from None  # fmt: skip
                    done = time.monotonic()
                    assert value == expected_total(graph_seed), f"trial {trial}: wrong answer"
                    assert all(f.status == "finished" for f in futures), f"trial {trial}"
                    rows.append({
                        "trial": trial, "victim": victim.what.split()[-1], "kill_at": kill_at,
                        "before": before, "run": done - start, "recovery": done - start - baseline,
                        "kill_to_done": done - killed,
                        "recomputed": sum(1 for n in reports.values() if n > 1)})  # fmt: skip
                    # and the replacement joins, the killed worker is gone, for the next trial
                    pool.ready(replacement)
                    live = {p.address for p in pool.live}
                    wait_until(lambda live=live: set(client.nthreads()) == live, timeout=30,
                               message=f"trial {trial}: the scheduler sees exactly {live}")  # fmt: skip
                    del futures
                # and afterwards nothing is held: every key was released with its future
                wait_until(lambda: client.who_has() == {}, timeout=30,
                           message="the scheduler holds no keys once the futures are gone")  # fmt: skip
        finally:
            pool.close()
    took = time.monotonic() - began
    text = table(rows, baseline)
    with capsys.disabled():
        print(f"\n{SECTION} ({took:.0f} s)\n\n{text}\n")
    if os.environ.get("SHOAL_WRITE_RESULTS") == "1":
        write_section(text, took, seed)
    assert took < 300, f"the chaos test took {took:.0f}s, over its 5-minute budget"
