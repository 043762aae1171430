"""The scheduler's diagnostics extension: log requests and progress watches.

- `SchedulerLogs`: this process's log ring. `WorkerLogs`: the scheduler asks each worker
  (`GetLogs` on its peer listener, like `RunOnWorkers`) and answers with every reply.
- `ProgressWatch` / `ProgressUpdate` / `ProgressUnwatch`: counts per task group of the tasks
  that some keys need, for ``shoal.progress``. A watch walks the graph once, when it is
  made (stopping at results already in memory); after that each update reads only the task
  runs finished since the last one (from the scheduler's task stream), so following 100,000
  tasks costs the scheduler O(new runs) per update. It re-checks every pending task only
  when it cannot trust the stream: rows missed because the ring wrapped, a task that erred
  (its dependents fail without running), or a few pending tasks left (cheap, and it catches
  results that appeared without a run, e.g. scattered or recomputed elsewhere).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING, Any

from ..protocol.messages import (
    GetLogs,
    Msg,
    ProgressUnwatch,
    ProgressUpdate,
    ProgressWatch,
    Reply,
    SchedulerLogs,
    WorkerLogs,
)
from ..comm.rpc import next_rid
from ..scheduler import Extension
from .logs import log_ring

if TYPE_CHECKING:
    from ..comm.batched import BatchedSend
    from ..core.scheduler_records import TaskState
    from ..scheduler import Scheduler

__all__ = ["DiagnosticsExtension", "Watch"]

#: pending tasks few enough to re-check on every update
RECHECK_BELOW = 2_000
#: seconds the scheduler waits for a worker's logs
LOGS_TIMEOUT = 10.0


class Watch:
    """The tasks some keys need, by group: how many there are, are done, erred."""

    __slots__ = ("client", "done", "erred", "pending", "position", "totals")

    def __init__(self, client: str, position: int) -> None:
        self.client = client
        #: group -> tasks, done, erred
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.erred: dict[str, int] = {}
        #: key -> group, for the tasks not done yet
        self.pending: dict[str, str] = {}
        #: the task stream's row number to read from next
        self.position = position

    def add(self, group: str, outcome: str | None, key: str) -> None:
        self.totals[group] = self.totals.get(group, 0) + 1
        if outcome is None:
            self.pending[key] = group
        else:
            self._finish(group, outcome)

    def _finish(self, group: str, outcome: str) -> None:
        into = self.erred if outcome == "erred" else self.done
        into[group] = into.get(group, 0) + 1

    def finish(self, key: str, outcome: str) -> None:
        group = self.pending.pop(key, None)
        if group is not None:
            self._finish(group, outcome)

    def report(self, watch_id: int) -> dict[str, Any]:
        return {
            "id": watch_id,
            "groups": {g: {"total": n, "done": self.done.get(g, 0),
                           "erred": self.erred.get(g, 0)}
                       for g, n in self.totals.items()},
            "done": not self.pending,
        }  # fmt: skip


def _outcome(ts: TaskState | None) -> str | None:
    """How a task that was pending when its watch began stands now (None: still going)."""
    if ts is None or ts.state in ("memory", "released"):
        return "done"  # released or forgotten after it was computed (or cancelled)
    if ts.state == "erred":
        return "erred"
    return None


class DiagnosticsExtension(Extension):
    handles = (SchedulerLogs, WorkerLogs, ProgressWatch, ProgressUpdate, ProgressUnwatch)

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__(scheduler)
        self.watches: dict[int, Watch] = {}
        self._ids = itertools.count(1)

    def handle(self, client: str, msg: Msg, send: BatchedSend) -> None:
        if isinstance(msg, SchedulerLogs):
            send.send(Reply(msg.rid, log_ring().rows(msg.n)))
        elif isinstance(msg, WorkerLogs):
            self.scheduler._spawn(self._worker_logs(msg, send))
        elif isinstance(msg, ProgressWatch):
            watch_id = next(self._ids)
            self.watches[watch_id] = watch = self._watch(client, msg.keys)
            send.send(Reply(msg.rid, watch.report(watch_id)))
        elif isinstance(msg, ProgressUpdate):
            found = self.watches.get(msg.id)
            if found is None or found.client != client:
                send.send(Reply(msg.rid, error=f"KeyError: no progress watch {msg.id}"))
            else:
                self._update(found)
                send.send(Reply(msg.rid, found.report(msg.id)))
        elif isinstance(msg, ProgressUnwatch):
            found = self.watches.get(msg.id)
            if found is not None and found.client == client:
                del self.watches[msg.id]

    def client_left(self, client: str) -> None:
        for watch_id in [i for i, w in self.watches.items() if w.client == client]:
            del self.watches[watch_id]

    # ------------------------------------------------------------------ progress

    def _watch(self, client: str, keys: list[str]) -> Watch:
        tasks = self.scheduler.state.tasks
        watch = Watch(client, self.scheduler.task_stream.count)
        seen: set[str] = set()
        stack = [tasks[k] for k in dict.fromkeys(keys) if k in tasks]
        while stack:
            ts = stack.pop()
            if ts.key in seen:
                continue
            seen.add(ts.key)
            if ts.state == "memory":
                watch.add(ts.group, "done", ts.key)
            elif ts.state == "erred":
                watch.add(ts.group, "erred", ts.key)
            else:
                watch.add(ts.group, None, ts.key)
                stack.extend(d for d in ts.dependencies if d.key not in seen)
        return watch

    def _update(self, watch: Watch) -> None:
        stream = self.scheduler.task_stream
        rows, watch.position, missed = stream.since(watch.position)
        recheck = missed > 0 or len(watch.pending) <= RECHECK_BELOW
        pending = watch.pending
        for row in rows:
            if row.key in pending:
                if row.status == "ok":
                    watch.finish(row.key, "done")
                else:
                    recheck = True  # a retry, or an error that fails its dependents too
        if recheck and pending:
            tasks = self.scheduler.state.tasks
            for key in list(pending):
                outcome = _outcome(tasks.get(key))
                if outcome is not None:
                    watch.finish(key, outcome)

    # ---------------------------------------------------------------------- logs

    async def _worker_logs(self, msg: WorkerLogs, send: BatchedSend) -> None:
        s = self.scheduler
        targets = [a for a, w in s.state.workers.items()
                   if msg.workers is None or a in msg.workers or w.name in msg.workers]  # fmt: skip

        async def one(address: str) -> tuple[str, Any]:
            peers = s._peers
            assert peers is not None
            try:
                reply = await peers.request(address, GetLogs(next_rid(), msg.n),
                                            timeout=LOGS_TIMEOUT)  # fmt: skip
                return address, reply.value
            except (OSError, asyncio.TimeoutError) as exc:
                return address, {"error": f"{type(exc).__name__}: {exc}"}

        results = dict(await asyncio.gather(*(one(a) for a in targets)))
        if not send.closed:
            send.send(Reply(msg.rid, results))
