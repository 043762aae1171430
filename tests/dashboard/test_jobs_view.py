"""The dashboard's view of a `shoal.jobs` queue: counts per queue and status, the
dead-letter list, schedules and their next firing, in /api/jobs and /metrics."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal.dashboard.jobs import JobsView
from shoal.jobs import JobQueue
from shoal.testing import gen_cluster


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def test_api_jobs_and_metrics_show_an_attached_queue() -> None:
    app = JobQueue("memory://")

    @app.job(queue="mail", retries=0)
    def send(to: str) -> str:
        return to

    @app.job
    def report() -> None: ...

    @app.periodic(every=60.0, name="sweep")
    def sweep() -> None: ...

    for to in "abc":
        send.delay(to)
    report.delay()
    # the oldest mail is taken by a worker and fails for good: dead-lettered
    (first,) = app.broker.reserve(["mail"], "w1", 30.0, 1)
    assert app.broker.fail(first.id, first.token, "ValueError: no", None, None, retry_at=None)

    with gen_cluster(n_workers=1, jobs=app) as client:
        link = client.dashboard_link
        assert link is not None
        jobs = json.loads(get(link + "api/jobs"))
        assert jobs["attached"] and jobs["url"] == "memory://" and jobs["error"] is None
        assert jobs["queues"]["mail"]["queued"] == 2
        assert jobs["queues"]["mail"]["failed"] == 1 and jobs["queues"]["mail"]["dead"] == 1
        assert jobs["queues"]["default"]["queued"] == 1
        (schedule,) = jobs["schedules"]
        assert schedule["name"] == "sweep" and schedule["every"] == 60.0
        assert time.time() < schedule["next"] <= time.time() + 60.0

        text = get(link + "metrics").decode()
        samples = {(s.labels["queue"], s.labels["status"]): s.value
                   for f in text_string_to_metric_families(text) if f.name == "shoal_jobs"
                   for s in f.samples}  # fmt: skip
        assert samples[("mail", "dead")] == 1 and samples[("mail", "queued")] == 2

        # attaching another queue later replaces it
        client.cluster.scheduler.attach_jobs("memory://")
        assert json.loads(get(link + "api/jobs"))["queues"] == {}


def test_jobs_view_from_a_sqlite_url_and_errors(tmp_path: Path) -> None:
    import asyncio

    view = JobsView(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        snap = asyncio.run(view.snapshot())
        assert snap["attached"] and snap["queues"] == {} and snap["error"] is None
    finally:
        view.close()
    assert not view.attached
    with pytest.raises(TypeError, match="cannot show jobs"):
        JobsView(42)
    with pytest.raises(ValueError, match="unknown job broker URL"):
        JobsView("ftp://nowhere")
