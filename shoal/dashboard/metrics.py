"""Prometheus metrics: custom collectors that read the server's state when scraped.

Nothing is counted twice and nothing is kept up to date between scrapes: each scrape reads
the scheduler's counters (tasks per state from `SchedulerState.groups`, transitions from
``transition_counts``, durations from the task stream's histograms, workers from their
heartbeats, jobs from the dashboard's cached `JobsView` snapshot) in time proportional to the
number of workers and groups. Every server has its own `CollectorRegistry`, so several
servers in one process (an in-process `LocalCluster`) do not collide.

Series with a ``group`` label are limited to the `MAX_GROUP_SERIES` groups holding the most
tasks, so that keys without a common prefix cannot explode the number of series.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from ..protocol.messages import Heartbeat

if TYPE_CHECKING:
    from ..scheduler import Scheduler
    from ..worker.server import Worker
    from .jobs import JobsView

__all__ = [
    "CONTENT_TYPE",
    "MAX_GROUP_SERIES",
    "SchedulerCollector",
    "WorkerCollector",
    "render",
    "scheduler_registry",
    "worker_registry",
]  # fmt: skip

#: the text exposition format's content type (without the charset, which aiohttp adds)
CONTENT_TYPE = "text/plain; version=0.0.4"
MAX_GROUP_SERIES = 100
_STATES = ("released", "waiting", "no-worker", "queued", "processing", "memory", "erred")


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class SchedulerCollector:
    """The scheduler's tasks, transitions, durations, workers and jobs."""

    def __init__(self, scheduler: Scheduler, jobs: JobsView | None = None) -> None:
        self.scheduler = scheduler
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        s = self.scheduler
        state = s.state
        tasks = GaugeMetricFamily("shoal_tasks", "Tasks the scheduler holds, by state",
                                  labels=["state"])  # fmt: skip
        by_state = state.groups.by_state()
        for name in _STATES:
            tasks.add_metric([name], by_state.get(name, 0))
        yield tasks

        groups = state.groups.groups
        top = heapq.nlargest(MAX_GROUP_SERIES, groups.items(), key=lambda item: item[1].live)
        per_group = GaugeMetricFamily("shoal_group_tasks", "Tasks the scheduler holds, by"
                                      " task group and state", labels=["group", "state"])  # fmt: skip
        forgotten = CounterMetricFamily("shoal_group_forgotten_tasks", "Tasks of a group"
                                        " forgotten since the group appeared", labels=["group"])  # fmt: skip
        for group, counts in sorted(top):
            for name, n in counts.states.items():
                per_group.add_metric([group, name], n)
            forgotten.add_metric([group], counts.forgotten)
        yield per_group
        yield forgotten

        transitions = CounterMetricFamily("shoal_transitions", "Task state transitions",
                                          labels=["start", "finish"])  # fmt: skip
        for (start, finish), n in sorted(state.transition_counts.items()):
            transitions.add_metric([start, finish], n)
        yield transitions

        durations = HistogramMetricFamily("shoal_task_duration_seconds", "Run time of tasks"
                                          " as their workers measured it, by task group",
                                          labels=["group"])  # fmt: skip
        hists = s.task_stream.durations
        for group in sorted(heapq.nlargest(MAX_GROUP_SERIES, hists,
                                           key=lambda g: hists[g].count)):  # fmt: skip
            hist = hists[group]
            durations.add_metric([group], hist.cumulative(), hist.total)
        yield durations

        runs = CounterMetricFamily("shoal_task_runs", "Task runs reported by workers",
                                   labels=["status"])  # fmt: skip
        runs.add_metric(["ok"], s.task_stream.count - s.task_stream.errors)
        runs.add_metric(["error"], s.task_stream.errors)
        yield runs

        yield from self._workers()
        yield GaugeMetricFamily("shoal_clients", "Clients connected", value=len(state.clients))
        yield GaugeMetricFamily("shoal_scheduler_uptime_seconds", "Seconds since the"
                                " scheduler started", value=max(0.0, time.time() - s.started))  # fmt: skip
        yield GaugeMetricFamily("shoal_scheduler_event_loop_lag_max_seconds", "Longest the"
                                " scheduler's event loop was blocked since it started",
                                value=s.loop_monitor.max_lag if s.loop_monitor else 0.0)  # fmt: skip
        yield from self._jobs()

    def _workers(self) -> Iterator[Metric]:
        s = self.scheduler
        labels = ["worker", "name"]
        fams: dict[str, GaugeMetricFamily] = {
            "threads": GaugeMetricFamily("shoal_worker_threads", "Threads", labels=labels),
            "memory": GaugeMetricFamily("shoal_worker_memory_bytes", "Process memory (RSS)",
                                        labels=labels),
            "limit": GaugeMetricFamily("shoal_worker_memory_limit_bytes", "Memory limit (0:"
                                       " none)", labels=labels),
            "managed": GaugeMetricFamily("shoal_worker_managed_bytes", "Bytes of results held"
                                         " in memory", labels=labels),
            "spilled": GaugeMetricFamily("shoal_worker_spilled_bytes", "Bytes of results"
                                         " spilled to disk", labels=labels),
            "cpu": GaugeMetricFamily("shoal_worker_cpu_percent", "CPU use of the process",
                                     labels=labels),
            "executing": GaugeMetricFamily("shoal_worker_executing_tasks", "Tasks running",
                                           labels=labels),
            "ready": GaugeMetricFamily("shoal_worker_ready_tasks", "Tasks queued on the"
                                       " worker, ready to run", labels=labels),
            "processing": GaugeMetricFamily("shoal_worker_processing_tasks", "Tasks the"
                                            " scheduler assigned to the worker", labels=labels),
            "keys": GaugeMetricFamily("shoal_worker_keys", "Results held", labels=labels),
            "lag": GaugeMetricFamily("shoal_worker_event_loop_lag_seconds", "Longest the"
                                     " worker's event loop was blocked between its last two"
                                     " heartbeats", labels=labels),
        }  # fmt: skip
        transfer = CounterMetricFamily("shoal_worker_transfer_bytes", "Bytes of data fetched"
                                       " from (in) and sent to (out) peers and clients",
                                       labels=["worker", "name", "direction"])  # fmt: skip
        empty = Heartbeat()
        for address, w in s.state.workers.items():
            beat = s.heartbeats.get(address) or empty
            lv = [address, w.name]
            fams["threads"].add_metric(lv, w.nthreads)
            fams["memory"].add_metric(lv, beat.memory)
            fams["limit"].add_metric(lv, w.memory_limit)
            fams["managed"].add_metric(lv, getattr(beat, "managed_bytes", 0))
            fams["spilled"].add_metric(lv, getattr(beat, "spilled_bytes", 0))
            fams["cpu"].add_metric(lv, beat.cpu)
            fams["executing"].add_metric(lv, beat.executing)
            fams["ready"].add_metric(lv, beat.ready)
            fams["processing"].add_metric(lv, len(w.processing))
            fams["keys"].add_metric(lv, len(w.has_what))
            fams["lag"].add_metric(lv, getattr(beat, "loop_lag", 0.0))
            transfer.add_metric([*lv, "in"], getattr(beat, "bytes_in", 0))
            transfer.add_metric([*lv, "out"], getattr(beat, "bytes_out", 0))
        yield GaugeMetricFamily("shoal_workers", "Workers connected", value=len(s.state.workers))
        yield from fams.values()
        yield transfer

    def _jobs(self) -> Iterator[Metric]:
        snapshot = self.jobs.cached() if self.jobs is not None else None
        jobs = GaugeMetricFamily("shoal_jobs", "Jobs of the attached shoal.jobs queue, by"
                                 " queue and status (dead: the dead-letter list)",
                                 labels=["queue", "status"])  # fmt: skip
        run_times = GaugeMetricFamily("shoal_jobs_run_seconds", "Run times of the attached "
                                      "queue's latest succeeded jobs, by queue and statistic",
                                      labels=["queue", "stat"])  # fmt: skip
        if snapshot is not None:
            for queue, per in snapshot.get("queues", {}).items():
                for status, n in per.items():
                    jobs.add_metric([queue, status], n)
            for queue, stats in snapshot.get("run_times", {}).items():
                for stat, value in stats.items():
                    run_times.add_metric([queue, stat], value)
        yield jobs
        yield run_times


class WorkerCollector:
    """One worker's own view: tasks, memory, transfers."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        st = w.state
        yield GaugeMetricFamily("shoal_worker_threads", "Threads", value=w.nthreads)
        executing = len(st.executing) if st is not None else 0
        ready = len(st.ready) if st is not None else 0
        yield GaugeMetricFamily("shoal_worker_executing_tasks", "Tasks running", value=executing)
        yield GaugeMetricFamily("shoal_worker_ready_tasks", "Tasks ready to run", value=ready)
        tasks = GaugeMetricFamily("shoal_worker_tasks", "Tasks the worker knows, by state",
                                  labels=["state"])  # fmt: skip
        if st is not None:
            counts: dict[str, int] = {}
            for ts in st.tasks.values():
                counts[ts.state] = counts.get(ts.state, 0) + 1
            for name, n in sorted(counts.items()):
                tasks.add_metric([name], n)
        yield tasks
        data: Any = w.data
        yield GaugeMetricFamily("shoal_worker_keys", "Results held", value=len(data))
        yield GaugeMetricFamily("shoal_worker_managed_bytes", "Bytes of results held in"
                                " memory", value=getattr(data, "memory_bytes", 0))  # fmt: skip
        yield GaugeMetricFamily("shoal_worker_spilled_bytes", "Bytes of results spilled to"
                                " disk", value=getattr(data, "spilled_bytes", 0))  # fmt: skip
        yield GaugeMetricFamily("shoal_worker_memory_limit_bytes", "Memory limit (0: none)",
                                value=w.memory_limit)  # fmt: skip
        transfer = CounterMetricFamily("shoal_worker_transfer_bytes", "Bytes of data fetched"
                                       " from (in) and sent to (out) peers and clients",
                                       labels=["direction"])  # fmt: skip
        transfer.add_metric(["in"], getattr(w, "bytes_in", 0))
        transfer.add_metric(["out"], getattr(w, "bytes_out", 0))
        yield transfer
        yield GaugeMetricFamily("shoal_worker_paused", "1 while memory pauses new tasks",
                                value=1 if st is not None and getattr(st, "paused", False)
                                else 0)  # fmt: skip
        monitor = getattr(w, "loop_monitor", None)
        yield GaugeMetricFamily("shoal_worker_event_loop_lag_max_seconds", "Longest the"
                                " worker's event loop was blocked since it started",
                                value=monitor.max_lag if monitor is not None else 0.0)  # fmt: skip


def scheduler_registry(scheduler: Scheduler, jobs: JobsView | None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SchedulerCollector(scheduler, jobs))
    ProcessCollector(registry=registry)
    return registry


def worker_registry(worker: Worker) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))
    ProcessCollector(registry=registry)
    return registry
