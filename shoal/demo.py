"""`shoal demo`: what shoal does, in a minute, on a local cluster."""

from __future__ import annotations

import random
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from .client.client import Client
from .client.future import as_completed


def sample_pi(seed: int, n: int = 2_000) -> int:
    """Points of ``n`` random throws that land inside the unit quarter circle."""
    rng = random.Random(seed)
    return sum(1 for _ in range(n) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)


def load(part: int) -> list[int]:
    return list(range(part * 100, part * 100 + 100))


def clean(rows: list[int]) -> list[int]:
    return [r for r in rows if r % 3]


def total(*parts: list[int]) -> int:
    return sum(sum(p) for p in parts)


def parse_record(text: str) -> int:
    return int(text)


def run_demo(tasks: int = 10_000, n_workers: int = 2) -> None:
    console = Console()
    console.rule("[bold]shoal demo")
    start = time.perf_counter()
    with Client(n_workers=n_workers, threads_per_worker=1) as client:
        console.print(f"Local cluster up in {time.perf_counter() - start:.2f}s: "
                      f"{len(client.nthreads())} workers at {client.scheduler_address}")

        console.print(f"\n[bold]1. Monte Carlo estimate of pi over {tasks:,} tasks")
        t0 = time.perf_counter()
        futures = client.map(sample_pi, range(tasks))
        inside = 0
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
            job = bar.add_task("sample_pi", total=len(futures))
            for _future, hits in as_completed(futures, with_results=True):
                inside += hits
                bar.advance(job)
        pi = 4 * inside / (tasks * 2_000)
        elapsed = time.perf_counter() - t0
        console.print(f"pi ~ {pi:.5f} from {tasks * 2000:,} throws in {elapsed:.2f}s "
                      f"({tasks / elapsed:,.0f} tasks/s)")
        del futures

        console.print("\n[bold]2. A dependent graph: load -> clean -> total")
        t0 = time.perf_counter()
        loaded = client.map(load, range(8))
        cleaned = [client.submit(clean, part) for part in loaded]
        result = client.submit(total, *cleaned).result()
        console.print(f"total = {result:,} ({len(loaded) * 2 + 1} tasks, inputs moved worker "
                      f"to worker, {time.perf_counter() - t0:.3f}s)")

        console.print("\n[bold]3. A task that raises")
        bad = client.submit(parse_record, "not-a-number")
        try:
            bad.result()
        except ValueError as exc:
            console.print(f"result() raised {type(exc).__name__}: {exc}")
            console.print("with the worker's traceback attached as its cause:")
            console.print(str(exc.__cause__).strip(), style="dim")
    console.rule(f"done in {time.perf_counter() - start:.1f}s")
