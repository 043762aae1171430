"""Scheduling benchmark: placement when all inputs live on one worker, memory while a large
graph runs, and the per-task overhead after the placement work.

    .venv/bin/python bench/bench_scheduling.py            # full run; updates bench/RESULTS.md
    .venv/bin/python bench/bench_scheduling.py --quick    # small sizes, smoke test, no write

shoal runs in a fresh child process (its scheduler and client live there; 2 worker processes
x 1 thread beside it), then dask.distributed, when installed, runs (a) the same way for
comparison (information, not a target). The parent only orchestrates, prints the table and
writes the "## Scheduling benchmark" section of bench/RESULTS.md (leaving other sections as
they are). See METHOD for what each row measures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 2**20

SIZES = {
    "full": dict(a_tasks=400, a_sleep=0.02, a_input=1024, a_reps=3, b_roots=100_000,
                 b_roots_small=20_000,
                 b_chunk=100, b_blob=10_240, c_map=10_000, c_leaves=8_192, c_calls=200,
                 c_reps=3, child_timeout=1200.0, quiet_wait=180.0),
    "quick": dict(a_tasks=100, a_sleep=0.02, a_input=1024, a_reps=1, b_roots=10_000,
                  b_roots_small=2_000,
                  b_chunk=100, b_blob=10_240, c_map=1_000, c_leaves=512, c_calls=30,
                  c_reps=1, child_timeout=300.0, quiet_wait=0.0),
}

METHOD = """\
- Every system runs in a fresh child process that holds the scheduler, the client and the
  driver, with 2 worker processes x 1 thread (`shoal.Client(n_workers=2,
  threads_per_worker=1)`; dask: `LocalCluster(n_workers=2, threads_per_worker=1,
  processes=True, dashboard_address=None)` with its defaults).
- (a) 400 inputs of 1 KB (`bytes`) are made by tasks restricted to worker A
  (`map(make_input, range(400), workers=[A])`) and awaited; `who_has` must show all on A.
  Then 400 tasks `work(x)` (sleep 20 ms, return `len(x)`) are submitted with `map` and
  gathered, timed from `map` to the gathered list. Perfect balance is 400 x 20 ms / 2
  threads = 4.0 s. The "balanced" row runs 400 input-free `work_free(i)` tasks (same sleep)
  the same way: what the machine and scheduler achieve with nothing to balance. Median of
  the repeats; the split is where the results were held afterwards (`who_has`), i.e. where
  each task ran. Target: skewed time <= 1.3 x 4.0 s.
- (b) 100,000 root tasks `make_blob(i)` each return a 10 KB `bytes`; every 100 consecutive
  roots feed one `total_len(*roots)` (sum of lengths); the driver submits chunk by chunk
  (`map` 100 roots, `submit` their reducer, drop the root futures) and then gathers the
  1,000 sums (checked: 100,000 x 10,240). A thread samples every 10 ms the RSS (psutil) of
  both worker processes and, from the in-process scheduler, the bytes its books say the
  workers hold. Naive total = 100,000 x 10 KB = 1,024 MB (977 MiB): what holding every root
  result at once would take. Row: peak of (sum of both workers' RSS) minus the same sum
  just before the run. Target: under 10% of the naive total. "Held" rows: the bytes of
  results the scheduler's books say the workers hold (peak and mean over the samples). The
  same graph is also run with 20,000 roots: if roots are released in step, what is held does
  not grow with the graph. Each size runs on its own fresh cluster.
- (c) as in the core benchmark: `map(noop, range(10000), pure=False)` + `gather` (tasks/s,
  median of 3 after a warm-up); pairwise tree reduction of 8,192 leaves (16,383 tasks, from
  the first call to `result()` of the root, median of 3); `submit(inc, i, pure=False).result()`
  200 times one after the other (median ms). The "core bench" column is shoal's figure from
  the "## Core benchmark" section of this file (measured earlier, same machine), for
  comparison.
- "others' CPU": the share of the machine's CPU that processes outside this run used while
  the row was measured (this 2-core machine is shared); before each system the run waits
  (bounded) for a quiet machine.
"""


# ---------------------------------------------------------------------- task functions
# (module level in __main__: both systems pickle them by value)


def make_input(i: int, nbytes: int) -> bytes:
    return bytes([i % 251]) * nbytes


def work(x: bytes, seconds: float) -> int:
    time.sleep(seconds)
    return len(x)


def work_free(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i


def make_blob(i: int, nbytes: int) -> bytes:
    return bytes([i % 251]) * nbytes


def total_len(*blobs: bytes) -> int:
    return sum(len(b) for b in blobs)


def noop(x: Any) -> Any:
    return x


def inc(x: int) -> int:
    return x + 1


def add(x: Any, y: Any) -> Any:
    return x + y


# ------------------------------------------------------------------------ child helpers


class Recorder:
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1)

    def put(self, row: str, **fields: Any) -> None:
        self.f.write(json.dumps({"row": row, **fields}) + "\n")
        self.f.flush()


def _busy_cpu_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def _tree_cpu_seconds() -> float:
    """CPU time of this process, its live descendants and its reaped children."""
    import resource

    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = t.user + t.system + r.ru_utime + r.ru_stime
    for p in me.children(recursive=True):
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return float(total)


class LoadWatch:
    """How much CPU processes outside this tree used during a block (percent of machine)."""

    def __enter__(self) -> LoadWatch:
        self.busy0, self.ours0, self.t0 = _busy_cpu_seconds(), _tree_cpu_seconds(), time.monotonic()
        self.pct = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = max(time.monotonic() - self.t0, 1e-3)
        other = (_busy_cpu_seconds() - self.busy0) - (_tree_cpu_seconds() - self.ours0)
        self.pct = max(0.0, 100 * other / (wall * (os.cpu_count() or 1)))


def wait_quiet(max_wait: float) -> str:
    """Wait (bounded) until other processes leave the CPUs mostly idle; say how it went."""
    import psutil

    if max_wait <= 0:
        return ""
    t0 = time.monotonic()
    calm = 0
    said = False
    while True:
        busy = psutil.cpu_percent(interval=2.0)
        calm = calm + 1 if busy < 15 else 0
        if calm >= 2:
            waited = time.monotonic() - t0 - 4.0
            return f"waited {waited:.0f} s for a quiet machine" if waited > 3 else ""
        if time.monotonic() - t0 > max_wait:
            return f"machine still {busy:.0f}% busy after {max_wait:.0f} s; ran anyway"
        if not said:
            print(f"    waiting for the machine to go quiet ({busy:.0f}% CPU busy)", flush=True)
            said = True


class RssSampler(threading.Thread):
    """Samples the summed RSS of ``pids`` (and, optionally, a byte count) every ``interval``."""

    def __init__(self, pids: list[int], books: Callable[[], int] | None = None,
                 interval: float = 0.01) -> None:  # fmt: skip
        import psutil

        super().__init__(name="rss-sampler", daemon=True)
        self.procs = [psutil.Process(p) for p in pids]
        self.books = books
        self.interval = interval
        self.peak = 0
        self.peak_books = 0
        self.sum_books = 0
        self.samples = 0
        self.halt = threading.Event()

    def rss(self) -> int:
        total = 0
        for p in self.procs:
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, self.rss())
            if self.books is not None:
                try:
                    held = self.books()
                    self.peak_books = max(self.peak_books, held)
                    self.sum_books += held
                except RuntimeError:  # a dict changed size under us: skip this sample
                    pass
            self.samples += 1
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join()


def _split(who_has: dict[str, list[str]], workers: list[str]) -> list[float]:
    counts = {w: 0 for w in workers}
    for holders in who_has.values():
        for w in holders:
            counts[w] = counts.get(w, 0) + 1
    n = max(1, len(who_has))
    return [counts[w] / n for w in workers]


# ------------------------------------------------------------------------ measurements


def measure_a(client: Any, rec: Recorder, cfg: dict[str, Any], wait: Callable[..., Any],
              who_has: Callable[[list[Any]], dict[str, list[str]]],
              workers: list[str]) -> None:  # fmt: skip
    n, sleep, reps = cfg["a_tasks"], cfg["a_sleep"], cfg["a_reps"]
    a_addr = workers[0]
    ideal = n * sleep / 2
    rec.put("a_ideal", value=ideal, unit="s")
    # the group's duration is learned once, as it would be in any long-running session
    client.gather(client.map(work_free, range(4), [sleep] * 4, pure=False))
    skewed, balanced, splits, balanced_splits = [], [], [], []
    lw = LoadWatch().__enter__()
    for _ in range(reps):
        inputs = client.map(make_input, range(n), [cfg["a_input"]] * n, workers=[a_addr],
                            pure=False)  # fmt: skip
        wait(inputs)
        where = who_has(inputs)
        if any(v != [a_addr] for v in where.values()):
            raise RuntimeError(f"inputs not all on A: {sorted(set(map(tuple, where.values())))}")
        t0 = time.perf_counter()
        fs = client.map(work, inputs, [sleep] * n, pure=False)
        out = client.gather(fs)
        skewed.append(time.perf_counter() - t0)
        assert out == [cfg["a_input"]] * n
        splits.append(_split(who_has(fs), workers))
        del fs, out, inputs
        gc.collect()
        time.sleep(0.3)
        t0 = time.perf_counter()
        fs = client.map(work_free, range(n), [sleep] * n, pure=False)
        out = client.gather(fs)
        balanced.append(time.perf_counter() - t0)
        assert out == list(range(n))
        balanced_splits.append(_split(who_has(fs), workers))
        del fs, out
        gc.collect()
        time.sleep(0.3)
    lw.__exit__()
    rec.put("a_skewed", value=statistics.median(skewed), unit="s", samples=skewed,
            split=splits[len(splits) // 2], splits=splits, others_pct=lw.pct)
    rec.put("a_balanced", value=statistics.median(balanced), unit="s", samples=balanced,
            split=balanced_splits[len(balanced_splits) // 2], others_pct=lw.pct)


def measure_b(client: Any, rec: Recorder, cfg: dict[str, Any], n: int, row: str) -> None:
    chunk, blob = cfg["b_chunk"], cfg["b_blob"]
    pids = list(client.run(os.getpid).values())
    state = client.cluster.scheduler.state  # in-process scheduler: its books, read only

    def books() -> int:
        return sum(ws.nbytes for ws in list(state.workers.values()))

    sampler = RssSampler(pids, books)
    time.sleep(0.5)
    base = sampler.rss()
    import psutil

    me = psutil.Process()
    sched_base = me.memory_info().rss
    sampler.start()
    with LoadWatch() as lw:
        t0 = time.perf_counter()
        reducers = []
        for c in range(n // chunk):
            roots = client.map(make_blob, range(c * chunk, (c + 1) * chunk), [blob] * chunk,
                               pure=False)  # fmt: skip
            reducers.append(client.submit(total_len, *roots, pure=False))
            del roots
        submitted = time.perf_counter() - t0
        total = sum(client.gather(reducers))
        elapsed = time.perf_counter() - t0
    sampler.stop()
    sched_peak = me.memory_info().rss
    if total != n * blob:
        raise AssertionError(f"sum of lengths {total}, expected {n * blob}")
    naive = n * blob
    rec.put(row, value=(sampler.peak - base) / MIB, unit="MiB", naive=naive / MIB,
            frac=(sampler.peak - base) / naive, base=base / MIB, peak=sampler.peak / MIB,
            books_peak=sampler.peak_books / MIB, samples_taken=sampler.samples, roots=n,
            books_mean=sampler.sum_books / max(1, sampler.samples) / MIB,
            elapsed=elapsed, submitted=submitted, tasks=n + n // chunk,
            sched_growth=(sched_peak - sched_base) / MIB, others_pct=lw.pct)


def measure_c(client: Any, rec: Recorder, cfg: dict[str, Any], settle: Callable[[], None]) -> None:
    n, reps = cfg["c_map"], cfg["c_reps"]
    client.gather(client.map(noop, range(n // 10), pure=False))
    settle()
    rates = []
    with LoadWatch() as lw:
        for _ in range(reps):
            t0 = time.perf_counter()
            fs = client.map(noop, range(n), pure=False)
            out = client.gather(fs)
            rates.append(n / (time.perf_counter() - t0))
            assert out == list(range(n))
            del fs, out
            settle()
    rec.put("c_map", value=statistics.median(rates), unit="tasks/s", samples=rates,
            others_pct=lw.pct)

    leaves = cfg["c_leaves"]

    def tree(k: int) -> float:
        t0 = time.perf_counter()
        level = client.map(noop, range(k), pure=False)
        while len(level) > 1:
            level = [client.submit(add, level[i], level[i + 1], pure=False)
                     for i in range(0, len(level), 2)]  # fmt: skip
        r = level[0].result(timeout=600)
        dt = time.perf_counter() - t0
        assert r == sum(range(k)), r
        return dt

    tree(leaves // 16)
    settle()
    rates = []
    with LoadWatch() as lw:
        for _ in range(reps):
            rates.append((2 * leaves - 1) / tree(leaves))
            settle()
    rec.put("c_tree", value=statistics.median(rates), unit="tasks/s", samples=rates,
            tasks=2 * leaves - 1, others_pct=lw.pct)

    for i in range(20):
        client.submit(inc, i, pure=False).result(timeout=10)
    settle()
    lat = []
    with LoadWatch() as lw:
        for i in range(cfg["c_calls"]):
            t0 = time.perf_counter()
            r = client.submit(inc, i, pure=False).result(timeout=10)
            lat.append((time.perf_counter() - t0) * 1e3)
            assert r == i + 1
    q = sorted(lat)
    rec.put("c_latency", value=statistics.median(lat), unit="ms", others_pct=lw.pct,
            samples=[q[0], q[len(q) // 10], statistics.median(q), q[(9 * len(q)) // 10], q[-1]])


# ------------------------------------------------------------------------------ children


def child_shoal(out: str, quick: bool) -> int:
    import shoal

    cfg = SIZES["quick" if quick else "full"]
    rec = Recorder(out)

    def guarded(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:
            rec.put(name, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())

    client = shoal.Client(n_workers=2, threads_per_worker=1)
    try:
        client.gather(client.map(inc, range(10), pure=False))
        workers = sorted(client.scheduler_info()["workers"])
        state = client.cluster.scheduler.state

        def settle() -> None:
            gc.collect()
            deadline = time.monotonic() + 10
            while len(state.tasks) > 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.1)

        def wait(fs: list[Any]) -> None:
            shoal.wait(fs, timeout=120)

        def who_has(fs: list[Any]) -> dict[str, list[str]]:
            return {k: sorted(v) for k, v in client.who_has(fs).items()}

        guarded("c_map", lambda: measure_c(client, rec, cfg, settle))
        settle()
        guarded("a_skewed", lambda: measure_a(client, rec, cfg, wait, who_has, workers))
    finally:
        client.close()
    for n, row in ((int(cfg["b_roots_small"]), "b_small"), (int(cfg["b_roots"]), "b_peak")):
        client = shoal.Client(n_workers=2, threads_per_worker=1)  # (b) on a fresh cluster
        try:
            client.gather(client.map(inc, range(10), pure=False))
            guarded(row, lambda: measure_b(client, rec, cfg, n, row))
        finally:
            client.close()
    return 0


def child_dask(out: str, quick: bool) -> int:
    import distributed

    cfg = SIZES["quick" if quick else "full"]
    rec = Recorder(out)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)  # fmt: skip
    client = distributed.Client(cluster)
    try:
        client.gather(client.map(inc, range(10), pure=False))
        workers = sorted(client.scheduler_info()["workers"])

        def wait(fs: list[Any]) -> None:
            distributed.wait(fs, timeout=120)

        def who_has(fs: list[Any]) -> dict[str, list[str]]:
            return {k: sorted(v) for k, v in client.who_has(fs).items()}

        try:
            measure_a(client, rec, cfg, wait, who_has, workers)
        except BaseException as exc:
            rec.put("a_skewed", error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc())
    finally:
        client.close()
        cluster.close()
    return 0


# -------------------------------------------------------------------------------- parent


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()  # fmt: skip
    except Exception as exc:
        return f"({exc})"


def environment() -> dict[str, str]:
    cpu = "unknown"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dirty = sh(f"git -C {REPO} status --porcelain --untracked-files=no")
    return {
        "date": sh("date -u"),
        "uname": sh("uname -a"),
        "cpu": f"{cpu} ({os.cpu_count()} logical CPUs)",
        "python": sys.version.replace("\n", " "),
        "shoal": f"git {sh(f'git -C {REPO} rev-parse --short HEAD')}"
                 + (" + uncommitted changes in the working tree" if dirty else ""),
    }


def session_leftovers(sid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    found.append(int(name))
            except OSError:
                pass
    return found


def run_child(system: str, quick: bool, tmp: Path) -> tuple[dict[str, Any], list[str], str]:
    cfg = SIZES["quick" if quick else "full"]
    out, log = tmp / f"{system}.jsonl", tmp / f"{system}.log"
    out.write_text("")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--out", str(out)]
    if quick:
        cmd.append("--quick")
    print(f"--- {system}", flush=True)
    quiet = wait_quiet(cfg["quiet_wait"])
    problems: list[str] = []
    t0 = time.monotonic()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(REPO))  # fmt: skip
        try:
            proc.wait(cfg["child_timeout"])
        except subprocess.TimeoutExpired:
            problems.append(f"{system}: timed out after {cfg['child_timeout']:.0f} s; killed")
            os.killpg(proc.pid, 9)
            proc.wait()
    wall = time.monotonic() - t0
    if proc.returncode not in (0, None):
        problems.append(f"{system}: child exited with code {proc.returncode}")
    deadline = time.monotonic() + 15
    left = session_leftovers(proc.pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = session_leftovers(proc.pid)
    if left:
        problems.append(f"{system}: processes left behind after the run: {left}; killed them")
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    results: dict[str, Any] = {}
    for ln in out.read_text().splitlines():
        d = json.loads(ln)
        results[d["row"]] = d
        if "error" in d:
            problems.append(f"{system}: {d['row']} failed: {d['error']}\n{d.get('traceback', '')}")
    if problems:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        if tail:
            problems.append(f"{system}: last lines of its output:\n" + "\n".join(tail))
    print(f"    ({wall:.0f} s{'; ' + quiet if quiet else ''})", flush=True)
    return results, problems, f"{system}: {wall:.0f} s" + (f" ({quiet})" if quiet else "")


def core_figures() -> dict[str, str]:
    """shoal's figures from the "## Core benchmark" table in RESULTS.md, if there."""
    path = HERE / "RESULTS.md"
    found: dict[str, str] = {}
    if not path.exists():
        return found
    text = path.read_text()
    if "## Core benchmark" not in text:
        return found
    section = text.split("## Core benchmark", 1)[1].split("\n## ", 1)[0]
    for ln in section.splitlines():
        if ln.startswith("- date:") and "date" not in found:
            found["date"] = ln.split(":", 1)[1].strip()
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        for tag, row in (("(a)", "c_map"), ("(b)", "c_tree"), ("(c)", "c_latency")):
            if cells[0].startswith(tag) and row not in found:
                found[row] = cells[2]
    return found


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "tasks/s":
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.3f}" if v < 1 else f"{v:.2f}"
    if unit == "s":
        return f"{v:.2f}"
    return f"{v:.1f}"


def build_table(shoal: dict[str, Any], dask: dict[str, Any], quick: bool,
                core: dict[str, str]) -> tuple[list[str], list[list[str]], int, int]:  # fmt: skip
    cfg = SIZES["quick" if quick else "full"]
    header = ["measurement", "unit", "shoal", "target", "met?", "for comparison", "others' CPU"]
    rows: list[list[str]] = []
    met = total = 0

    def val(d: dict[str, Any], key: str) -> float | None:
        v = d.get(key, {}).get("value")
        return None if v is None else float(v)

    def load(key: str) -> str:
        pct = shoal.get(key, {}).get("others_pct")
        return "—" if pct is None else f"{pct:.0f}%"

    def split(d: dict[str, Any], key: str) -> str:
        s = d.get(key, {}).get("split")
        return "A {:.0%} / B {:.0%}".format(*s) if s else "—"

    n = cfg["a_tasks"]
    ideal = n * cfg["a_sleep"] / 2
    sk, ba = val(shoal, "a_skewed"), val(shoal, "a_balanced")
    dsk, dba = val(dask, "a_skewed"), val(dask, "a_balanced")
    ok = sk is not None and sk <= 1.3 * ideal
    total += 1
    met += ok
    rows.append([f"(a) {n} x 20 ms, inputs all on A", "s", _fmt(sk, "s"),
                 f"<= 1.3 x {ideal:.1f} s", "met" if ok else "NOT MET",
                 f"dask {_fmt(dsk, 's')}" if dsk else "—", load("a_skewed")])
    rows.append([f"(a)   ratio to perfect balance ({ideal:.1f} s)", "x",
                 f"{sk / ideal:.2f}" if sk else "—", "<= 1.30", "", (f"dask {dsk / ideal:.2f}"
                 if dsk else "—"), ""])  # fmt: skip
    rows.append(["(a)   ratio to the measured balanced run", "x",
                 f"{sk / ba:.2f}" if sk and ba else "—", "", "",
                 f"dask {dsk / dba:.2f}" if dsk and dba else "—", ""])
    rows.append(["(a)   where the tasks ran", "share", split(shoal, "a_skewed"), "", "",
                 f"dask {split(dask, 'a_skewed')}" if dsk else "—", ""])
    rows.append([f"(a) balanced: {n} x 20 ms, no inputs", "s", _fmt(ba, "s"), "", "",
                 f"dask {_fmt(dba, 's')}" if dba else "—", load("a_skewed")])
    b = shoal.get("b_peak", {})
    bv = b.get("value")
    naive = cfg["b_roots"] * cfg["b_blob"] / MIB
    ok = bv is not None and bv < 0.1 * naive
    total += 1
    met += ok
    rows.append([f"(b) {cfg['b_roots']:,} roots x 10 KB: peak worker RSS growth", "MiB",
                 _fmt(bv, "MiB"), f"< 10% of {naive:,.0f}", "met" if ok else "NOT MET",
                 f"{b['frac']:.1%} of naive" if bv is not None else "—", load("b_peak")])
    if bv is not None:
        rows.append(["(b)   root results held (scheduler's books): peak", "MiB",
                     _fmt(b["books_peak"], "MiB"), "", "", f"{b['books_peak'] / naive:.1%} of naive",
                     ""])  # fmt: skip
        rows.append(["(b)   root results held (scheduler's books): mean", "MiB",
                     _fmt(b["books_mean"], "MiB"), "", "", f"{b['books_mean'] / naive:.1%} of naive",
                     ""])  # fmt: skip
        small = shoal.get("b_small", {})
        if "value" in small:
            rows.append([f"(b)   same graph with {small['roots']:,} roots: RSS growth, peak held",
                         "MiB", f"{small['value']:.1f}, {small['books_peak']:.1f}", "", "",
                         f"graph {cfg['b_roots'] // small['roots']}x smaller", ""])
        rows.append([f"(b)   whole graph ({b['tasks']:,} tasks), submit to last sum", "s",
                     _fmt(b["elapsed"], "s"), "", "",
                     f"{b['tasks'] / b['elapsed']:,.0f} tasks/s", ""])
        rows.append(["(b)   scheduler+client process RSS growth", "MiB",
                     _fmt(b["sched_growth"], "MiB"), "", "", "", ""])
    labels = {
        "c_map": f"(c) {cfg['c_map']:,} no-op tasks, map+gather",
        "c_tree": f"(c) tree reduction, {cfg['c_leaves']:,} leaves ({2 * cfg['c_leaves'] - 1:,} tasks)",
        "c_latency": f"(c) submit+result latency, median of {cfg['c_calls']}",
    }
    for key, label in labels.items():
        unit = "ms" if key == "c_latency" else "tasks/s"
        core_fig = core.get(key)
        rows.append([label, unit, _fmt(val(shoal, key), unit), "", "",
                     f"core bench {core_fig}" if core_fig and not quick else "—", load(key)])
    if core.get("date") and not quick:
        rows.append(["(c)   \"core bench\": shoal's figures in the Core benchmark section of",
                     "", core["date"], "", "", "", ""])
    return header, rows, met, total


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the "## Scheduling benchmark" section; leave the rest as it is."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    marker = "## Scheduling benchmark"
    if marker in old:
        head, rest = old.split(marker, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def parent_main(args: argparse.Namespace) -> int:
    import importlib.util

    mode = "quick" if args.quick else "full"
    env = environment()
    print(f"shoal scheduling benchmark ({mode}); {env['date']}; {env['cpu']}", flush=True)
    core = core_figures()
    t0 = time.perf_counter()
    problems: list[str] = []
    runs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-sched-") as tmp:
        shoal_res, p, run = run_child("shoal", args.quick, Path(tmp))
        problems += p
        runs.append(run)
        dask_res: dict[str, Any] = {}
        if not args.no_dask and importlib.util.find_spec("distributed") is not None:
            time.sleep(1.0)
            dask_res, p, run = run_child("dask", args.quick, Path(tmp))
            problems += p
            runs.append(run)
    elapsed = time.perf_counter() - t0
    header, rows, met, total = build_table(shoal_res, dask_res, args.quick, core)
    table = plain_table(header, rows)
    print()
    print(table)
    summary = f"{met} of {total} targets met."
    print(summary)
    b = shoal_res.get("b_peak", {})
    if "value" in b:
        print(f"(b) detail: workers' RSS {b['base']:.0f} MiB before, {b['peak']:.0f} MiB at peak"
              f" ({b['samples_taken']} samples); graph submitted in {b['submitted']:.1f} s")
    if problems:
        print("\nPROBLEMS:")
        for prob in problems:
            print("  " + prob.replace("\n", "\n  "))
    else:
        print("No failures; no processes left behind.")
    print(f"(total {elapsed:.0f} s)")
    samples = []
    for name, res in (("shoal", shoal_res), ("dask", dask_res)):
        for key, d in res.items():
            if "samples" in d:
                xs = ", ".join(_fmt(x, d["unit"]) for x in d["samples"])
                extra = " (min, p10, median, p90, max)" if key == "c_latency" else ""
                if "splits" in d:
                    extra = "; splits A/B: " + ", ".join(f"{a:.0%}/{b_:.0%}" for a, b_ in d["splits"])
                samples.append(f"- {name} {key}: {xs} {d['unit']}{extra}")
    text = "\n".join([
        "## Scheduling benchmark",
        "",
        f"`.venv/bin/python bench/bench_scheduling.py{' --quick' if args.quick else ''}`"
        f" ({mode} run, {elapsed:.0f} s).",
        "",
        f"- date: {env['date']}",
        f"- uname: `{env['uname']}`",
        f"- CPU: {env['cpu']}",
        f"- Python: {env['python']}",
        f"- shoal: {env['shoal']}",
        "- runs: " + "; ".join(runs),
        "",
        table,
        "",
        f"**{summary}**",
        "",
        *(["### Problems found", "", *("```\n" + p + "\n```" for p in problems)] if problems
          else ["No failures; no processes left behind."]),
        "",
        "### What each row measures",
        "",
        METHOD,
        "### Samples",
        "",
        *samples,
        "",
    ])
    if (not args.quick or args.write) and not args.no_write:
        write_section(Path(args.results), text)
        print(f"wrote {args.results}")
    return 1 if problems else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test), no write")
    p.add_argument("--no-dask", action="store_true", help="skip the dask comparison for (a)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--write", action="store_true", help="write RESULTS.md even with --quick")
    p.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "shoal":
        return child_shoal(args.out, args.quick)
    if args.child == "dask":
        return child_dask(args.out, args.quick)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
