"""The dashboard's HTTP API on a real local cluster: JSON shapes, /health, /metrics, the
event stream, and how the dashboard is turned on, off and placed."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import shoal
from shoal.testing import gen_cluster, wait_until


def get(url: str, timeout: float = 10.0) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def get_json(url: str) -> Any:
    status, ctype, body = get(url)
    assert status == 200, (url, status, body[:300])
    assert ctype.startswith("application/json"), ctype
    return json.loads(body)


def inc(x: int) -> int:
    return x + 1


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def metric_samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, []).extend(family.samples)
    return out


def test_json_api_shapes() -> None:
    with gen_cluster(n_workers=2) as client:
        # given: a dashboard, and some finished and failed work
        link = client.dashboard_link
        assert link is not None and link.startswith("http://127.0.0.1:")
        futures = client.map(inc, range(10))
        total = client.submit(sum, futures)
        bad = client.submit(boom, 1)
        assert total.result() == 55
        shoal.wait([bad])

        # then: /health answers "ok"
        assert get(link + "health")[::2] == (200, b"ok")
        # /api lists the routes; the page and its script are served
        assert "/api/workers" in get_json(link + "api")
        status, ctype, page = get(link)
        assert status == 200 and ctype.startswith("text/html") and b"shoal dashboard" in page
        assert get(link + "static/dashboard.js")[0] == 200

        info = get_json(link + "api/info")
        assert info["address"] == client.scheduler_address and info["workers"] == 2
        assert info["dashboard"] == link

        workers = get_json(link + "api/workers")
        assert len(workers) == 2
        assert set(workers[0]) >= {"address", "name", "nthreads", "memory", "memory_limit", "cpu",
                                   "executing", "ready", "processing", "in_memory", "nbytes",
                                   "bytes_in", "bytes_out", "spilled_bytes", "dashboard"}  # fmt: skip
        assert sum(w["in_memory"] for w in workers) >= 12

        tasks = get_json(link + "api/tasks?limit=5")
        assert tasks["total"] == 12 and len(tasks["tasks"]) == 5
        assert tasks["by_state"] == {"memory": 11, "erred": 1}
        groups = {g["name"]: g["states"] for g in tasks["groups"]}
        assert groups == {"inc": {"memory": 10}, "sum": {"memory": 1}, "boom": {"erred": 1}}
        erred = get_json(link + "api/tasks?state=erred")["tasks"]
        assert [t["key"] for t in erred] == [bad.key] and "boom 1" in erred[0]["error"]
        page2 = get_json(link + "api/tasks?group=inc&offset=8&limit=5")["tasks"]
        assert len(page2) == 2 and all(t["group"] == "inc" for t in page2)

        stream = get_json(link + "api/task-stream?since=0")
        assert stream["next"] == 12 and stream["missed"] == 0
        rows = {row[0]: row for row in stream["rows"]}
        key, group, worker, start, stop, status_ = rows[total.key]
        assert group == "sum" and worker in {w["address"] for w in workers}
        assert 0 < start <= stop and status_ == "ok" and rows[bad.key][5] == "error"
        assert get_json(link + f"api/task-stream?since={stream['next']}")["rows"] == []

        graph = get_json(link + "api/graph")
        assert graph["count"] == 12 and not graph["too_big"]
        keys = [n["key"] for n in graph["nodes"]]
        assert sorted(keys.index(f.key) for f in futures) == sorted(
            src for src, dst in graph["edges"] if keys[dst] == total.key)

        story = get_json(link + f"api/story/{total.key}")
        assert story["known"] and story["task"]["state"] == "memory"
        assert [t["finish"] for t in story["transitions"]][-1] == "memory"
        assert story["runs"] and story["runs"][0]["status"] == "ok"
        # a dask-style key with slashes and quotes still finds its story
        assert get_json(link + "api/story/" + urllib.request.quote("('x/y', 1)"))["known"] is False

        jobs = get_json(link + "api/jobs")
        assert jobs["attached"] is False and jobs["queues"] == {}

        assert isinstance(get_json(link + "api/logs?n=5")["rows"], list)
        snapshot = get_json(link + "api/snapshot")
        assert set(snapshot) == {"info", "workers", "tasks", "jobs", "stream"}

        # bad parameters are a 400 with a reason, unknown routes a 404
        status, _, body = get(link + "api/tasks?limit=many")
        assert status == 400 and b"limit must be an integer" in body
        assert get(link + "api/nothing")[0] == 404


def test_metrics_parse_as_prometheus_text() -> None:
    with gen_cluster(n_workers=2) as client:
        futures = client.map(inc, range(20))
        client.gather(futures)
        bad = client.submit(boom, 2)
        shoal.wait([bad])
        status, ctype, body = get(client.dashboard_link + "metrics")  # type: ignore[operator]
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        samples = metric_samples(body.decode())

        by_state = {s.labels["state"]: s.value for s in samples["shoal_tasks"]}
        assert by_state["memory"] == 20 and by_state["erred"] == 1
        per_group = {(s.labels["group"], s.labels["state"]): s.value
                     for s in samples["shoal_group_tasks"]}  # fmt: skip
        assert per_group[("inc", "memory")] == 20
        transitions = {(s.labels["start"], s.labels["finish"]): s.value
                       for s in samples["shoal_transitions"] if s.name.endswith("_total")}  # fmt: skip
        assert transitions[("processing", "memory")] == 20
        buckets = [s for s in samples["shoal_task_duration_seconds"]
                   if s.name.endswith("_bucket") and s.labels["group"] == "inc"]  # fmt: skip
        assert buckets and max(s.value for s in buckets) == 20
        workers = {s.labels["worker"] for s in samples["shoal_worker_memory_bytes"]}
        assert workers == set(client.scheduler_info()["workers"])
        assert {s.labels["direction"] for s in samples["shoal_worker_transfer_bytes"]} == {"in", "out"}
        assert "shoal_jobs" in samples and "shoal_worker_spilled_bytes" in samples
        assert "process_cpu_seconds" in samples  # the process's own metrics too


def test_event_stream_sends_snapshots_with_new_task_runs() -> None:
    with gen_cluster(n_workers=1) as client:
        url = client.dashboard_link + "api/events?interval=0.1"  # type: ignore[operator]
        with urllib.request.urlopen(url, timeout=10) as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")

            def next_event() -> dict[str, Any]:
                while True:
                    line = stream.readline()
                    assert line, "the stream ended"
                    if line.startswith(b"data: "):
                        event: dict[str, Any] = json.loads(line[6:])
                        return event

            first = next_event()
            assert set(first) == {"info", "workers", "tasks", "jobs", "stream"}
            assert len(first["workers"]) == 1

            # when: work runs while the page listens
            future = client.submit(inc, 41)
            assert future.result() == 42

            # then: a later event carries the run, once
            seen: list[str] = []

            def arrived() -> bool:
                seen.extend(row[0] for row in next_event()["stream"]["rows"])
                return future.key in seen

            wait_until(arrived, timeout=10, message="the task run in the event stream")
            assert seen.count(future.key) == 1


def test_dashboard_can_be_turned_off() -> None:
    with gen_cluster(n_workers=1, dashboard_address=None) as client:
        assert client.dashboard_link is None
        assert client.scheduler_info()["dashboard"] == ""


def test_dashboard_port_in_use_falls_back_to_a_free_one(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="shoal.dashboard"):
            with gen_cluster(n_workers=1, dashboard_address=f"127.0.0.1:{port}") as client:
                link = client.dashboard_link
                assert link is not None and f":{port}/" not in link
                assert get(link + "health")[2] == b"ok"
        assert any(f"port {port} is in use" in r.message for r in caplog.records)


def test_bad_dashboard_address_fails_early() -> None:
    with pytest.raises(ValueError, match="bad dashboard address"):
        shoal.Scheduler(dashboard_address="localhost:http")
