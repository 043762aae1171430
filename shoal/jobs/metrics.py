"""A job worker's Prometheus metrics, served at ``/metrics`` (``shoal jobs worker
--metrics-port 9108``).

What this worker did, counted as it happens (`WorkerStats`): attempts per queue, job and
outcome, and a histogram of their run times; and what the broker holds, read when
scraped (at most every ``max_age`` seconds): jobs per queue and status, and the
dead-letter list's length. Every worker of a cluster reports the queue gauges alike (sum
the counters, take any one of the gauges).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("shoal.jobs.metrics")

#: upper bounds (seconds) of the run-time histogram's buckets
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
           1800.0, float("inf"))
#: outcomes of an attempt: finished ok, failed for good, failed and retried later,
#: cancelled while running, refused by the broker (the lease went to another worker)
OUTCOMES = ("succeeded", "failed", "retried", "cancelled", "stale")


class WorkerStats:
    """Counters a worker's slots update after each attempt (one short lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (queue, job, outcome) -> attempts
        self.attempts: dict[tuple[str, str, str], int] = {}
        #: (queue, job) -> [count per bucket (not cumulative), sum of seconds]
        self.run_times: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def record(self, queue: str, job: str, outcome: str, seconds: float) -> None:
        with self._lock:
            key = (queue, job, outcome)
            self.attempts[key] = self.attempts.get(key, 0) + 1
            buckets, total = self.run_times.setdefault((queue, job), ([0] * len(BUCKETS), [0.0]))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
                    break
            total[0] += seconds

    def snapshot(self) -> tuple[dict[tuple[str, str, str], int],
                                dict[tuple[str, str], tuple[list[int], float]]]:
        with self._lock:
            return dict(self.attempts), {k: (list(b), t[0]) for k, (b, t) in self.run_times.items()}


class WorkerCollector:
    """Reads a job worker's stats and its broker's counts when scraped."""

    def __init__(self, worker: Worker, max_age: float = 5.0) -> None:
        self.worker = worker
        self.max_age = max_age
        self._counts: tuple[float, dict[str, dict[str, int]], int] | None = None

    def _queue_counts(self) -> tuple[dict[str, dict[str, int]], int] | None:
        now = time.monotonic()
        cached = self._counts
        if cached is None or now - cached[0] > self.max_age:
            try:
                broker = self.worker.broker
                cached = (now, broker.counts(), broker.dead_count())
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail for this
                log.warning("job metrics: could not read the broker (%s)", exc)
                return None if cached is None else (cached[1], cached[2])
            self._counts = cached
        return cached[1], cached[2]

    def collect(self) -> Iterator[Metric]:
        attempts, run_times = self.worker.stats.snapshot()
        name = self.worker.name
        counter = CounterMetricFamily(
            "shoal_jobs_worker_attempts", "Attempts this job worker finished, by queue, job and "
            "outcome", labels=["worker", "queue", "job", "outcome"])
        for (queue, job, outcome), n in sorted(attempts.items()):
            counter.add_metric([name, queue, job, outcome], n)
        yield counter
        hist = HistogramMetricFamily(
            "shoal_jobs_worker_run_seconds", "Run time of this job worker's attempts",
            labels=["worker", "queue", "job"])
        for (queue, job), (buckets, total) in sorted(run_times.items()):
            cumulative, running = [], 0
            for bound, n in zip(BUCKETS, buckets):
                running += n
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            hist.add_metric([name, queue, job], cumulative, total)
        yield hist
        counts = self._queue_counts()
        if counts is not None:
            per_queue, dead = counts
            gauge = GaugeMetricFamily("shoal_jobs_queue_jobs", "Jobs in the broker by queue and "
                                      "status (finished ones as long as they are kept)",
                                      labels=["queue", "status"])
            for queue, per in sorted(per_queue.items()):
                for status, n in sorted(per.items()):
                    gauge.add_metric([queue, status], n)
            yield gauge
            yield GaugeMetricFamily("shoal_jobs_dead_letter_jobs",
                                    "Jobs in the dead-letter list", value=dead)


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: any free one) in a thread of its own."""

    def __init__(self, worker: Worker, host: str = "127.0.0.1", port: int = 0) -> None:
        registry = CollectorRegistry()
        registry.register(WorkerCollector(worker))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = host, int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="shoal-jobs-metrics", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
