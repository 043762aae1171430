"""Resources declared on the command line: ``shoal worker --resources "GPU=1,MEM=16e9"``
processes, with tasks that ask for them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import shoal
from shoal.testing import no_leaks, spawn_scheduler, spawn_worker


def timed_task(path: str) -> Callable[[str, float], str]:
    """A task that holds a thread for ``seconds`` and appends ``label start end`` to
    ``path``. A closure, so cloudpickle sends it by value: worker processes cannot import
    this test module."""

    def hold(label: str, seconds: float) -> str:
        start = time.monotonic()
        time.sleep(seconds)
        with open(path, "a") as f:
            f.write(f"{label} {start} {time.monotonic()}\n")
        return label

    return hold


def test_tasks_needing_a_gpu_run_only_on_the_worker_declaring_one(tmp_path: Path) -> None:
    # given: a scheduler, a worker declaring one GPU and a worker declaring none (2 threads each)
    log = tmp_path / "spans.txt"
    with no_leaks(timeout=15), spawn_scheduler() as scheduler, \
            spawn_worker(scheduler.address, nthreads=2, name="gpu-box",
                         extra_args=["--resources", "GPU=1,MEM=16e9"]) as gpu_box, \
            spawn_worker(scheduler.address, nthreads=2, name="cpu-box") as cpu_box:  # fmt: skip
        with shoal.Client(scheduler.address, timeout=10, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=20)
            hold = timed_task(str(log))

            # when GPU tasks and plain tasks are submitted together
            gpu = [client.submit(hold, f"g{i}", 0.1, resources={"GPU": 1, "MEM": 4e9})
                   for i in range(4)]  # fmt: skip
            plain = [client.submit(hold, f"p{i}", 0.1) for i in range(4)]
            assert client.gather(gpu + plain) == [f"g{i}" for i in range(4)] + [
                f"p{i}" for i in range(4)]
            who_has = client.who_has(gpu + plain)

    # then: every GPU task ran on the GPU worker, one at a time
    assert {w for f in gpu for w in who_has[f.key]} == {gpu_box.address}
    spans: dict[str, tuple[float, float]] = {}
    for line in log.read_text().splitlines():
        label, began, ended = line.split()
        spans[label] = (float(began), float(ended))
    gpu_spans = sorted(spans[f"g{i}"] for i in range(4))
    for (_, end), (start, _) in zip(gpu_spans, gpu_spans[1:]):
        assert start >= end - 1e-3, f"GPU tasks overlapped: {gpu_spans}"
    # and the plain tasks were free to use the other worker
    assert cpu_box.address in {w for f in plain for w in who_has[f.key]}
