"""A job worker's /metrics (attempts by outcome, run times, queue counts) and
``shoal jobs list --state``."""

from __future__ import annotations

import urllib.request

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from shoal.cli import main
from shoal.jobs import JobQueue


def _scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "worker"))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_worker_metrics(app: JobQueue) -> None:
    calls = {"flaky": 0}

    @app.job(queue="mail")
    def ok(x: int) -> int:
        return x

    @app.job(retries=0)
    def broken() -> None:
        raise ValueError("no")

    @app.job(retries=1, backoff=0.01)
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("once")
        return "fine"

    handles = [ok.delay(i) for i in range(3)]
    bad, retried = broken.delay(), flaky.delay()
    with app.worker(queues=["default", "mail"], metrics_port=0) as w:
        assert w.metrics is not None
        for h in handles:
            h.result(timeout=10)
        with pytest.raises(ValueError):
            bad.result(timeout=10)
        assert retried.result(timeout=10) == "fine"
        m = _scrape(w.metrics.url)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(w.metrics.url.replace("/metrics", "/other"), timeout=10)
    attempts = m["shoal_jobs_worker_attempts_total"]
    name = ok.name.rpartition(".")[0]
    assert attempts[(("job", f"{name}.ok"), ("outcome", "succeeded"), ("queue", "mail"))] == 3
    assert attempts[(("job", f"{name}.broken"), ("outcome", "failed"), ("queue", "default"))] == 1
    assert attempts[(("job", f"{name}.flaky"), ("outcome", "retried"), ("queue", "default"))] == 1
    assert attempts[(("job", f"{name}.flaky"), ("outcome", "succeeded"), ("queue", "default"))] == 1
    counts = m["shoal_jobs_worker_run_seconds_count"]
    assert counts[(("job", f"{name}.ok"), ("queue", "mail"))] == 3
    assert m["shoal_jobs_worker_run_seconds_sum"][(("job", f"{name}.ok"), ("queue", "mail"))] >= 0
    queue = m["shoal_jobs_queue_jobs"]
    assert queue[(("queue", "mail"), ("status", "succeeded"))] == 3
    assert queue[(("queue", "default"), ("status", "failed"))] == 1
    assert m["shoal_jobs_dead_letter_jobs"][()] == 1


@pytest.mark.parametrize("backend", ["sqlite"])
def test_cli_list_by_state(broker_url: str) -> None:
    app = JobQueue(broker_url)

    @app.job
    def later() -> None: ...

    a, b = later.enqueue(delay=60), later.enqueue(delay=60)
    assert b.cancel()
    runner = CliRunner()
    out = runner.invoke(main, ["jobs", "list", broker_url, "--state", "cancelled"])
    assert out.exit_code == 0 and b.id in out.output and a.id not in out.output
    out = runner.invoke(main, ["jobs", "list", broker_url, "--state", "scheduled"])
    assert out.exit_code == 0 and a.id in out.output and b.id not in out.output
    app.close()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_dashboard_view_has_run_times(app: JobQueue) -> None:
    """The dashboard's jobs view (and its /metrics) sum up run times per queue from the
    retained history."""
    from shoal.dashboard.jobs import JobsView
    from shoal.dashboard.metrics import SchedulerCollector

    @app.job(queue="slow")
    def nap(seconds: float) -> None:
        import time

        time.sleep(seconds)

    handles = [nap.delay(0.05), nap.delay(0.15)]
    with app.worker(queues=["slow"]):
        for h in handles:
            h.result(timeout=10)
    assert all(0.04 <= (h.record.run_time or 0) < 5 for h in handles)
    view = JobsView(app)
    snapshot = view._collect()
    stats = snapshot["run_times"]["slow"]
    assert stats["n"] == 2 and stats["max"] >= 0.15 and stats["p50"] >= 0.05
    assert snapshot["queues"]["slow"]["succeeded"] == 2
    view._cached = snapshot
    families = {f.name: f for f in SchedulerCollector(None, view)._jobs()}  # type: ignore[arg-type]
    samples = {tuple(s.labels.values()): s.value for s in families["shoal_jobs_run_seconds"].samples}
    assert samples[("slow", "n")] == 2 and samples[("slow", "max")] == stats["max"]
