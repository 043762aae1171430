"""Each worker's own /metrics server, advertised to the scheduler; and the CLI flags."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import shoal
from shoal.testing import gen_cluster, spawn_scheduler, spawn_worker, wait_until


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def samples(url: str) -> dict[str, list[Any]]:
    status, ctype, body = get(url)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(body.decode()):
        out.setdefault(family.name, []).extend(family.samples)
    return out


def make(n: int) -> bytes:
    return b"x" * n


def size(data: bytes) -> int:
    return len(data)


def test_worker_metrics_servers_are_advertised_and_count_transfers() -> None:
    with gen_cluster(n_workers=2, worker_dashboard_address=":0") as client:
        # given: each worker serves /metrics, and the scheduler knows where
        workers = client.scheduler_info()["workers"]
        a, b = sorted(workers)
        links = {addr: w["dashboard"] for addr, w in workers.items()}
        assert all(link.startswith("http://127.0.0.1:") for link in links.values())

        # when: one worker's result is needed on the other (1 MB moves between them)
        data = client.submit(make, 1_000_000, workers=[a])
        n = client.submit(size, data, workers=[b], allow_other_workers=False)
        assert n.result() == 1_000_000

        # then: each worker's own /metrics says so, and parses
        got_b = samples(links[b] + "metrics")
        moved_in = {s.labels["direction"]: s.value for s in got_b["shoal_worker_transfer_bytes"]}
        assert moved_in["in"] >= 1_000_000
        got_a = samples(links[a] + "metrics")
        assert {s.labels["direction"]: s.value
                for s in got_a["shoal_worker_transfer_bytes"]}["out"] >= 1_000_000  # fmt: skip
        assert got_a["shoal_worker_threads"][0].value == 1
        assert get(links[a] + "health")[2] == b"ok"
        info = json.loads(get(links[a] + "api/info")[2])
        assert info["address"] == a and info["bytes_out"] >= 1_000_000

        # and the scheduler hears of the transfers in heartbeats
        def dashboard_shows_transfer() -> bool:
            rows = json.loads(get(client.dashboard_link + "api/workers")[2])  # type: ignore[operator]
            return any(r["address"] == b and r["bytes_in"] >= 1_000_000 for r in rows)

        wait_until(dashboard_shows_transfer, timeout=10, message="bytes_in on the dashboard")


def test_cli_scheduler_and_worker_serve_dashboards() -> None:
    with spawn_scheduler(extra_args=["--dashboard-address", ":0"]) as scheduler:
        match = scheduler.wait_for_line(r"shoal dashboard at (http://\S+)", timeout=10)
        link = match.group(1)
        assert get(link + "health")[2] == b"ok"
        with spawn_worker(scheduler.address, name="cli-worker"):  # a metrics server by default

            def worker_link() -> str:
                rows = json.loads(get(link + "api/workers")[2])
                return str(rows[0]["dashboard"]) if rows and rows[0]["dashboard"] else ""

            worker_url = wait_until(worker_link, timeout=20, message="the worker's metrics URL")
            assert "shoal_worker_threads" in samples(worker_url + "metrics")
        # the worker left: the scheduler forgets its link
        wait_until(lambda: json.loads(get(link + "api/workers")[2]) == [], timeout=20,
                   message="the worker gone from the dashboard")  # fmt: skip


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` and its children listen on."""
    proc = psutil.Process(pid)
    return {c.laddr.port for p in [proc, *proc.children(recursive=True)]
            for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}  # fmt: skip


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.parametrize("nanny", ["--nanny", "--no-nanny"])
def test_cli_no_dashboard(nanny: str) -> None:
    with (
        spawn_scheduler(extra_args=["--no-dashboard"]) as scheduler,
        spawn_worker(scheduler.address, extra_args=["--no-dashboard", nanny]) as worker,
    ):
        # then: the worker serves its comm port and nothing else (no /metrics, /health)
        assert listening_ports(worker.pid) == {port_of(worker.address)}
        # and it tells the scheduler it has no dashboard
        with shoal.Client(scheduler.address, set_as_default=False) as client:
            workers = client.scheduler_info()["workers"]
            assert [w["dashboard"] for w in workers.values()] == [""]
        # and the scheduler serves its comm port only
        assert listening_ports(scheduler.pid) == {port_of(scheduler.address)}
    assert not any("dashboard at" in line for line in scheduler.stdout)
