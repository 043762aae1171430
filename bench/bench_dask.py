"""dask collections benchmark: the same dask code on shoal, dask's threaded scheduler and
dask.distributed, in one run.

    .venv/bin/python bench/bench_dask.py            # full run; writes its section of RESULTS.md
    .venv/bin/python bench/bench_dask.py --quick    # small sizes, smoke test, no write
    .venv/bin/python bench/bench_dask.py --repeats 1 --rounds 1   # a short check, no write

Targets (issue #14), judged on the medians of shoal 1 worker x 2 threads for the largest
array and the group-by: at most 1.1x dask's threaded scheduler's time, and at most 0.5x
dask.distributed's (2x faster). The shoal 2x1 rows are shown for comparison.

Workloads (each built afresh for every repeat, so graph construction and optimization,
which are the same dask code for every system, are inside the timing):
- array mean: ``da.random.random((n, n), chunks=(1000, 1000)).mean()`` for n = 10,000 and
  20,000 (100 and 400 chunks of 8 MB; 0.8 and 3.2 GB generated on the workers);
- dataframe group-by: ``dd.from_map(make_partition, range(100))`` (100 partitions of
  200,000 rows generated on the workers: an integer key with 1,000 values and two float
  columns), then ``groupby("k").agg({"x": "sum", "y": "mean"})``.

Systems, each in its own fresh Python process, one after the other on this machine:
- shoal 2x1: ``shoal.Client(n_workers=2, threads_per_worker=1)`` (worker processes),
  ``compute(scheduler=client.get)``;
- shoal 1x2: ``shoal.Client(n_workers=1, threads_per_worker=2)``;
- dask threaded: ``compute(scheduler="threads")`` (a pool of one thread per core);
- dask.distributed 2x1: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
  dashboard_address=None)``, ``compute(scheduler=client)``.
Each system first runs every workload once at a small size (warm-up: imports, worker
start-up), then the measured repeats. The whole sequence runs twice (``--rounds``), the
second time in reverse order, so that a drift in the load other processes put on the
machine does not favour one system; the figure is the median of both rounds' samples.
Every result is checked:
array means within 0.001 of 0.5, group-by totals equal (to 1e-9) to pandas' on the same
partitions, computed by the parent process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SIZES: dict[str, dict[str, Any]] = {
    "full": dict(arrays=[10_000, 20_000], array_reps=[7, 5], parts=100, rows=200_000,
                 df_reps=5, child_timeout=1800.0, quiet_wait=120.0),
    "quick": dict(arrays=[2_000, 4_000], array_reps=[2, 1], parts=20, rows=20_000,
                  df_reps=2, child_timeout=300.0, quiet_wait=0.0),
}

SYSTEMS = {
    "shoal-2x1": "shoal 2x1",
    "shoal-1x2": "shoal 1x2",
    "threaded": "dask threaded",
    "distributed": "dask.distributed 2x1",
}
SHOAL = ["shoal-2x1", "shoal-1x2"]
#: the targets: shoal's median over dask threaded's, and over dask.distributed's, at most
TARGET_THREADED = 1.1
TARGET_DISTRIBUTED = 0.5
#: the system the targets are for (the others are shown for comparison)
TARGET_SYSTEM = "shoal-1x2"
#: a row during which other processes used this share of the CPU or more is "disturbed"
DISTURBED_PCT = 25.0

# ------------------------------------------------------------------------- the workloads


def make_partition(i: int, rows: int) -> Any:
    """Partition ``i`` of the group-by table (deterministic)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(i)
    return pd.DataFrame({"k": rng.integers(0, 1000, rows), "x": rng.random(rows),
                         "y": rng.standard_normal(rows)})  # fmt: skip


def array_mean(n: int) -> Any:
    import dask.array as da

    return da.random.random((n, n), chunks=(1000, 1000)).mean()


def groupby(parts: int, rows: int) -> Any:
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    meta = pd.DataFrame({"k": np.array([], dtype="int64"), "x": np.array([], dtype="float64"),
                         "y": np.array([], dtype="float64")})  # fmt: skip
    df = dd.from_map(make_partition, range(parts), rows=rows, meta=meta)
    return df.groupby("k").agg({"x": "sum", "y": "mean"})


def summarize_groupby(result: Any) -> list[float]:
    """What the check compares: groups, total of the x sums, total of the y means."""
    return [float(len(result)), float(result["x"].sum()), float(result["y"].sum())]


def expected_groupby(parts: int, rows: int) -> list[float]:
    import pandas as pd

    sums: Any = None
    for i in range(parts):
        g = make_partition(i, rows).groupby("k").agg(x=("x", "sum"), ysum=("y", "sum"),
                                                     n=("y", "count"))  # fmt: skip
        sums = g if sums is None else sums.add(g, fill_value=0)
    assert isinstance(sums, pd.DataFrame)
    return [float(len(sums)), float(sums["x"].sum()), float((sums["ysum"] / sums["n"]).sum())]


# ------------------------------------------------------------------------- systems


class System:
    def __init__(self, name: str) -> None:
        self.name = name
        self.client: Any = None
        self.cluster: Any = None

    def start(self) -> None:
        if self.name.startswith("shoal"):
            import shoal

            workers, threads = (2, 1) if self.name == "shoal-2x1" else (1, 2)
            self.client = shoal.Client(n_workers=workers, threads_per_worker=threads)
        elif self.name == "distributed":
            import distributed

            self.cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1,
                                                    processes=True, dashboard_address=None)
            self.client = distributed.Client(self.cluster)

    def compute(self, collection: Any) -> Any:
        import dask

        if self.name.startswith("shoal"):
            return dask.compute(collection, scheduler=self.client.get)[0]
        if self.name == "distributed":
            return dask.compute(collection, scheduler=self.client)[0]
        return dask.compute(collection, scheduler="threads")[0]

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# ------------------------------------------------------------------------- machine load


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


def wait_quiet(max_wait: float) -> str:
    """Wait (bounded) until other processes leave the CPUs mostly idle; say how it went."""
    import psutil

    if max_wait <= 0:
        return ""
    t0 = time.monotonic()
    while True:
        busy = psutil.cpu_percent(interval=2.0)
        if busy < 15:
            waited = time.monotonic() - t0 - 2.0
            return f"waited {waited:.0f} s for a quiet machine" if waited > 3 else ""
        if time.monotonic() - t0 > max_wait:
            return f"machine still {busy:.0f}% busy after {max_wait:.0f} s; ran anyway"


# ------------------------------------------------------------------------- the child


def child_main(system: str, out_path: str, quick: bool, repeats: int = 0) -> int:
    cfg = dict(SIZES["quick" if quick else "full"])
    if repeats:
        cfg["array_reps"] = [repeats] * len(cfg["arrays"])
        cfg["df_reps"] = repeats
    out = open(out_path, "a")

    def put(**row: Any) -> None:
        out.write(json.dumps(row) + "\n")
        out.flush()

    import dask  # noqa: F401  (the same imports for every system)
    import numpy  # noqa: F401
    import pandas  # noqa: F401

    sys_ = System(system)
    try:
        t0 = time.perf_counter()
        sys_.start()
        # warm-up: every workload once, small (imports and first-use costs on the workers)
        sys_.compute(array_mean(2000))
        sys_.compute(groupby(4, 1000))
        put(row="_start", value=time.perf_counter() - t0)
        jobs: list[tuple[str, Any, int]] = [
            (f"array{n}", (lambda n=n: array_mean(n)), reps)
            for n, reps in zip(cfg["arrays"], cfg["array_reps"])]  # fmt: skip
        jobs.append(("groupby", lambda: groupby(cfg["parts"], cfg["rows"]), cfg["df_reps"]))
        for row, build, reps in jobs:
            quiet = wait_quiet(cfg["quiet_wait"])
            busy0, ours0, wall0 = _busy_cpu_seconds(), _tree_cpu_seconds(), time.monotonic()
            samples: list[float] = []
            checks: list[Any] = []
            try:
                for _ in range(reps):
                    t = time.perf_counter()
                    value = sys_.compute(build())
                    samples.append(time.perf_counter() - t)
                    checks.append(float(value) if row.startswith("array")
                                  else summarize_groupby(value))  # fmt: skip
            except BaseException as exc:  # noqa: BLE001 - reported in the table
                put(row=row, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
                continue
            wall = time.monotonic() - wall0
            other = (_busy_cpu_seconds() - busy0) - (_tree_cpu_seconds() - ours0)
            put(row=row, value=statistics.median(samples), samples=samples, checks=checks,
                quiet=quiet, others_pct=max(0.0, 100 * other / (wall * (os.cpu_count() or 1))))
    finally:
        sys_.close()
        out.close()
    return 0


# ------------------------------------------------------------------------- the parent


def session_leftovers(sid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid and int(name) != sid:
                    out.append(int(name))
            except OSError:
                pass
    return out


def run_child(system: str, quick: bool, tmp: Path,
              repeats: int = 0) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    cfg = SIZES["quick" if quick else "full"]
    tmp.mkdir(parents=True, exist_ok=True)
    out, log = tmp / f"{system}.jsonl", tmp / f"{system}.log"
    out.write_text("")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--out", str(out)]
    if quick:
        cmd.append("--quick")
    if repeats:
        cmd += ["--repeats", str(repeats)]
    print(f"--- {SYSTEMS[system]}", flush=True)
    problems: list[str] = []
    t0 = time.monotonic()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(REPO))  # fmt: skip
        seen = 0
        while True:
            rc = proc.poll()
            lines = out.read_text().splitlines()
            for ln in lines[seen:]:
                d = json.loads(ln)
                if "error" in d:
                    print(f"    {d['row']}: ERROR {d['error']}", flush=True)
                else:
                    print(f"    {d['row']}: {d['value']:.3f} s"
                          + (f" (samples {', '.join(f'{s:.3f}' for s in d['samples'])};"
                             f" others {d['others_pct']:.0f}% CPU)" if "samples" in d else ""),
                          flush=True)  # fmt: skip
            seen = len(lines)
            if rc is not None:
                break
            if time.monotonic() - t0 > cfg["child_timeout"]:
                problems.append(f"{system}: timed out after {cfg['child_timeout']:.0f} s; killed")
                os.killpg(proc.pid, 9)
                proc.wait()
                break
            time.sleep(0.25)
    if proc.returncode not in (0, None):
        problems.append(f"{system}: child exited with code {proc.returncode}")
    deadline = time.monotonic() + 15
    left = session_leftovers(proc.pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = session_leftovers(proc.pid)
    if left:
        problems.append(f"{system}: processes left behind: {left}; killed them")
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    results: dict[str, Any] = {"_wall": time.monotonic() - t0}
    for ln in out.read_text().splitlines():
        d = json.loads(ln)
        results[d["row"]] = d
        if "error" in d:
            problems.append(f"{system}: {d['row']} failed: {d['error']}\n{d.get('traceback', '')}")
    if problems:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        problems.append(f"{system}: last lines of its output:\n" + "\n".join(tail))
    return results, problems


def merge_round(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Pool one round's rows of a system into its results so far (median of all samples)."""
    for row, d in new.items():
        old = into.get(row)
        if not isinstance(d, dict) or "samples" not in d or not isinstance(old, dict) \
                or "samples" not in old:  # fmt: skip
            into.setdefault(row, d)
            continue
        old["samples"] = old["samples"] + d["samples"]
        old["checks"] = old["checks"] + d["checks"]
        old["value"] = statistics.median(old["samples"])
        old["others_pct"] = max(old["others_pct"], d["others_pct"])
        old["quiet"] = "; ".join(q for q in (old.get("quiet"), d.get("quiet")) if q)


def check_results(results: dict[str, dict[str, Any]], quick: bool) -> list[str]:
    cfg = SIZES["quick" if quick else "full"]
    problems = []
    expected = expected_groupby(cfg["parts"], cfg["rows"])
    for system, rows in results.items():
        for row, d in rows.items():
            if not isinstance(d, dict) or "checks" not in d:
                continue
            for got in d["checks"]:
                if row.startswith("array"):
                    ok = abs(got - 0.5) < 1e-3
                else:
                    ok = got[0] == expected[0] and all(
                        abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(got[1:], expected[1:]))
                if not ok:
                    problems.append(f"{system}: {row} gave a wrong answer {got}"
                                    + ("" if row.startswith("array") else f" (expected {expected})"))
    return problems


def _label(row: str, quick: bool) -> str:
    cfg = SIZES["quick" if quick else "full"]
    if row.startswith("array"):
        n = int(row[5:])
        return f"array mean {n:,}x{n:,} ({(n // 1000) ** 2} chunks)"
    return f"dataframe groupby ({cfg['parts']} partitions x {cfg['rows']:,} rows)"


def target_rows(quick: bool) -> list[str]:
    """The rows the targets are for: the largest array, and the group-by."""
    return [f"array{SIZES['quick' if quick else 'full']['arrays'][-1]}", "groupby"]


def build_table(results: dict[str, dict[str, Any]], quick: bool) -> tuple[list[str], list[list[str]]]:
    cfg = SIZES["quick" if quick else "full"]
    rows_order = [f"array{n}" for n in cfg["arrays"]] + ["groupby"]
    header = ["workload", "shoal", "shoal s", "dask threaded s", "shoal / threaded",
              "dask.distributed s", "shoal / distributed", "met?", "others' CPU",
              "best / best threaded"]
    out = []

    def val(system: str, row: str) -> float | None:
        v = results.get(system, {}).get(row, {}).get("value")
        return float(v) if v is not None else None

    def best(system: str, row: str) -> float | None:
        samples = results.get(system, {}).get(row, {}).get("samples")
        return float(min(samples)) if samples else None

    for row in rows_order:
        threaded, dist = val("threaded", row), val("distributed", row)
        for system in SHOAL:
            s = val(system, row)
            r1 = s / threaded if s is not None and threaded else None
            r2 = s / dist if s is not None and dist else None
            loads = [results[x].get(row, {}).get("others_pct") for x in (system, "threaded", "distributed")
                     if x in results]  # fmt: skip
            loads = [x for x in loads if x is not None]
            if system != TARGET_SYSTEM or row not in target_rows(quick):
                met = "(no target)"
            elif r1 is None or r2 is None:
                met = "no figure"
            else:
                met = ("met" if r1 <= TARGET_THREADED and r2 <= TARGET_DISTRIBUTED
                       else "NOT MET")  # fmt: skip
                if loads and max(loads) >= DISTURBED_PCT:
                    met += " (disturbed)"
            out.append([
                _label(row, quick), SYSTEMS[system].replace("shoal ", ""),
                "—" if s is None else f"{s:.3f}",
                "—" if threaded is None else f"{threaded:.3f}",
                "—" if r1 is None else f"{r1:.2f}x",
                "—" if dist is None else f"{dist:.3f}",
                "—" if r2 is None else f"{r2:.2f}x",
                met, f"{max(loads):.0f}%" if loads else "—",
                _ratio(best(system, row), best("threaded", row)),
            ])  # fmt: skip
    return header, out


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}x"


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()  # fmt: skip
    except Exception as exc:  # noqa: BLE001
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
    versions = sh(f"{sys.executable} -c \"import dask, distributed, numpy, pandas; "
                  "print(f'dask {dask.__version__}, distributed {distributed.__version__}, "
                  "numpy {numpy.__version__}, pandas {pandas.__version__}')\"")  # fmt: skip
    dirty = sh(f"git -C {REPO} status --porcelain --untracked-files=no")
    return {
        "date": sh("date -u"),
        "cpu": f"{cpu} ({os.cpu_count()} logical CPUs)",
        "python": sys.version.split()[0],
        "shoal": f"git {sh(f'git -C {REPO} rev-parse --short HEAD')}"
                 + (" + uncommitted changes" if dirty else ""),
        "others": versions,
    }


MARKER = "## dask collections benchmark"


def write_results(path: Path, text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (or append it); leave the rest alone."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARKER in old:
        head, rest = old.split(MARKER, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        new = head + text.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def parent_main(args: argparse.Namespace) -> int:
    systems = args.systems.split(",") if args.systems else list(SYSTEMS)
    mode = "quick" if args.quick else "full"
    env = environment()
    print(f"dask collections benchmark ({mode}); {env['date']}; {env['cpu']}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-dask-") as tmp:
        for round_ in range(args.rounds):
            # Later rounds go in reverse order, so a drift in the machine's load does not
            # always favour the same system; samples of all rounds are pooled.
            for s in (systems if round_ % 2 == 0 else systems[::-1]):
                if args.rounds > 1:
                    print(f"(round {round_ + 1} of {args.rounds})", flush=True)
                r, p = run_child(s, args.quick, Path(tmp) / f"r{round_}", args.repeats)
                merge_round(results.setdefault(s, {}), r)
                problems += p
    problems += check_results(results, args.quick)
    elapsed = time.monotonic() - t_start
    header, rows = build_table(results, args.quick)
    table = plain_table(header, rows)
    judged = [r for r in rows if r[7] != "(no target)"]
    met = sum(r[7].startswith("met") for r in judged)
    quiet_met = sum(r[7] == "met" for r in judged)
    quiet_rows = sum(r[7] in ("met", "NOT MET") for r in judged)
    summary = (f"{met} of the {len(judged)} target rows ({SYSTEMS[TARGET_SYSTEM]}) meet both"
               f" targets (<= {TARGET_THREADED}x dask threaded, <= {TARGET_DISTRIBUTED}x"
               f" dask.distributed) on the medians; {quiet_met} of the {quiet_rows} measured"
               f" while other processes used < {DISTURBED_PCT:.0f}% of the CPU do.")
    print()
    print(table)
    print(summary)
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print("  " + p.replace("\n", "\n  "))
    else:
        print("All answers checked; no failures; no processes left behind.")
    print(f"(total {elapsed:.0f} s)")
    samples = []
    for s, rs in results.items():
        for row, d in rs.items():
            if isinstance(d, dict) and "samples" in d:
                samples.append(f"- {SYSTEMS[s]}, {_label(row, args.quick)}: "
                               + ", ".join(f"{x:.3f}" for x in d["samples"]) + " s"
                               + (f" ({d['quiet']})" if d.get("quiet") else ""))  # fmt: skip
    starts = [f"{SYSTEMS[s]} {rs['_start']['value']:.1f} s" for s, rs in results.items()
              if "_start" in rs]  # fmt: skip
    text = "\n".join([
        MARKER,
        "",
        f"`.venv/bin/python bench/bench_dask.py{' --quick' if args.quick else ''}` ({mode} run,"
        f" {elapsed:.0f} s). Seconds are medians of the repeats (lower is better); targets"
        f" (issue #14), for {SYSTEMS[TARGET_SYSTEM]} on the largest array and the group-by:"
        f" <= {TARGET_THREADED}x dask's threaded scheduler, and <= {TARGET_DISTRIBUTED}x"
        " dask.distributed 2x1 (2x faster). The shoal 2x1 rows are for comparison.",
        "",
        f"- date: {env['date']}; CPU: {env['cpu']}; Python {env['python']}",
        f"- shoal: {env['shoal']}; {env['others']}",
        "",
        table,
        "",
        f"**{summary}**",
        "",
        "All answers were checked (see below)." if not problems else "### Problems found",
        *(["", *("```\n" + p + "\n```" for p in problems)] if problems else []),
        "",
        "\"others' CPU\" is the highest share of the machine's CPU that unrelated processes used"
        " while that row was measured (any of the three systems in the row): other sessions"
        " share this 2-core machine, so rows with a high figure there are disturbed. The last"
        " column compares the fastest repeat of each (less sensitive to that disturbance);"
        " the targets are judged on the medians.",
        "",
        "### What each row measures",
        "",
        (__doc__ or "").split("Workloads", 1)[1].join(["Workloads", ""]).strip(),
        "",
        "Start-up including the warm-up runs: " + "; ".join(starts) + ".",
        "",
        "### Samples",
        "",
        *samples,
        "",
    ])
    if (not (args.quick or args.repeats) or args.write) and not args.no_write:
        write_results(Path(args.results), text)
        print(f"wrote {args.results}")
    return 1 if problems else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--systems", default="", help="comma list of " + ",".join(SYSTEMS))
    p.add_argument("--rounds", type=int, default=2,
                   help="run every system this many times, alternating the order (default 2)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--repeats", type=int, default=0,
                   help="measured repeats per workload (default: 5-7 full, 1-2 quick)")
    p.add_argument("--write", action="store_true", help="write RESULTS.md even with --quick")
    p.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args.child, args.out, args.quick, args.repeats)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
