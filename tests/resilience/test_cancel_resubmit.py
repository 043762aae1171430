"""A key reused for other work: a future cancelled while its task runs, then the same
explicit key submitted with another function, gives the new function's result (the worker
cannot stop the old run's thread, but drops what it returns)."""

from __future__ import annotations

from shoal.testing import Gate, gen_cluster, wait_until


def fast_b() -> str:
    return "b"


def test_cancel_then_resubmit_under_the_same_key_runs_the_new_function() -> None:
    gate = Gate()
    try:
        with gen_cluster(n_workers=1, threads_per_worker=1, processes=False) as client:
            [worker] = client.cluster.workers

            def running(key: str) -> bool:
                state = worker.state
                return state is not None and key in state.tasks and \
                    state.tasks[key].state == "executing"  # fmt: skip

            def asked_for(key: str, name: bytes) -> bool:
                state = worker.state
                ts = state.tasks.get(key) if state is not None else None
                return ts is not None and ts.compute is not None and name in ts.compute.function

            # given k = slow_a(), running on the worker's only thread
            f = client.submit(gate, "a", key="k")
            wait_until(lambda: running("k"), timeout=10, message="k runs")

            # when it is cancelled, and k is submitted again as fast_b()
            f.cancel()
            g = client.submit(fast_b, key="k")
            wait_until(lambda: asked_for("k", b"fast_b"), timeout=10,
                       message="the worker is asked for k = fast_b()")  # fmt: skip
            # and the old run ends (its thread could not be stopped)
            gate.open()

            # then g is fast_b's result, never slow_a's
            assert g.result(timeout=10) == "b"
            # and the worker serves on
            assert client.submit(fast_b, key="k2").result(timeout=10) == "b"
    finally:
        gate.close()
