"""``shoal.progress(futures)``: a progress bar per task group, until the futures are done.

    futures = client.map(inc, range(1000))
    total = client.submit(sum, futures)
    shoal.progress(total)            # bars for "inc" (1000 tasks) and "sum" (1)

It follows every task the futures need, not only the futures themselves: the scheduler
walks the graph once (`ProgressWatch`) and then counts, per group, the tasks done and erred
as their runs are reported (`ProgressUpdate`, see `shoal.diagnostics.service`). It accepts
futures, containers of futures, and what ``client.compute`` / ``client.persist`` return
(futures, or dask collections whose graph holds futures).

Where it draws: in Jupyter, ipywidgets bars when ipywidgets is installed; in a terminal,
rich bars; anywhere else (a pipe, a log file, ``file=``), plain text once at the end. With
an asynchronous client, ``await shoal.progress(...)``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from ..client.future import Future
from ..protocol.messages import ProgressUnwatch, ProgressUpdate, ProgressWatch
from ..comm.rpc import next_rid

if TYPE_CHECKING:
    from ..client.client import Client

__all__ = ["TextBars", "futures_of", "progress"]

Report = dict[str, Any]


def futures_of(obj: Any) -> list[Future]:
    """Every `Future` in ``obj``: a future, nested lists/tuples/sets/dicts of them, or a dask
    collection whose graph holds futures (what ``client.persist`` returns)."""
    found: dict[str, Future] = {}
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, Future):
            found.setdefault(x.key, x)
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif hasattr(x, "__dask_graph__"):
            graph = x.__dask_graph__()
            for value in (graph.values() if graph is not None else ()):
                inner = getattr(value, "value", value)  # dask's DataNode wraps the future
                if isinstance(inner, Future):
                    found.setdefault(inner.key, inner)
    return list(found.values())


def progress(*futures: Any, notebook: bool | None = None, multi: bool = True,
             complete: bool = True, interval: float = 0.1, file: IO[str] | None = None,
             timeout: float | None = None) -> Any:  # fmt: skip
    """Show how the tasks that ``futures`` need are getting on, until all of them are done
    (finished, erred or cancelled).

    ``multi``: a bar per task group (default), or one bar for all. ``complete``: keep the bars
    of groups that are done (False: hide them while others run). ``notebook``: force (True)
    or forbid (False) Jupyter widgets; None detects. ``file``: write plain text there.
    ``timeout``: stop waiting after that many seconds (raises ``TimeoutError``).
    With an asynchronous client, returns a coroutine to await."""
    found = futures_of(list(futures))
    if not found:
        return None
    client = found[0].client
    if notebook is None:
        notebook = file is None and _in_notebook()
    bars = _make_bars(notebook, multi, complete, file)
    if client.asynchronous:
        return _follow_async(client, found, bars, interval, timeout)
    return _follow(client, found, bars, interval, timeout)


def _follow(client: Client, futures: list[Future], bars: Bars, interval: float,
            timeout: float | None) -> None:  # fmt: skip
    keys = [f.key for f in futures]
    report: Report = client._sync(client._request(ProgressWatch(next_rid(), keys)))
    watch_id = report["id"]
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    try:
        bars.start(report)
        while True:
            pending = next((f for f in futures if not f.done()), None)
            if pending is None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the futures were not done within {timeout}s")
            pending._state.event.wait(interval)
            report = client._sync(client._request(ProgressUpdate(next_rid(), watch_id)))
            bars.update(report, time.monotonic() - start)
        report = client._sync(client._request(ProgressUpdate(next_rid(), watch_id)))
        bars.finish(report, time.monotonic() - start, _failed(futures))
    finally:
        if client.status == "running":
            client._send(ProgressUnwatch(watch_id))


async def _follow_async(client: Client, futures: list[Future], bars: Bars, interval: float,
                        timeout: float | None) -> None:  # fmt: skip
    keys = [f.key for f in futures]
    report: Report = await client._request(ProgressWatch(next_rid(), keys))
    watch_id = report["id"]
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        bars.start(report)
        while not all(f.done() for f in futures):
            if timeout is not None and loop.time() - start >= timeout:
                raise TimeoutError(f"the futures were not done within {timeout}s")
            await asyncio.sleep(interval)
            report = await client._request(ProgressUpdate(next_rid(), watch_id))
            bars.update(report, loop.time() - start)
        report = await client._request(ProgressUpdate(next_rid(), watch_id))
        bars.finish(report, loop.time() - start, _failed(futures))
    finally:
        if client.status == "running":
            client._send_now(ProgressUnwatch(watch_id))


def _failed(futures: list[Future]) -> int:
    return sum(1 for f in futures if f.status != "finished")


def _in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


# ------------------------------------------------------------------------ drawing


def _rows(report: Report, multi: bool, complete: bool) -> list[tuple[str, int, int, int]]:
    """``(name, done, erred, total)`` per bar."""
    groups = report["groups"]
    if not multi:
        done = sum(g["done"] for g in groups.values())
        erred = sum(g["erred"] for g in groups.values())
        return [("all", done, erred, sum(g["total"] for g in groups.values()))]
    rows = [(name, g["done"], g["erred"], g["total"]) for name, g in groups.items()]
    if not complete:
        rows = [r for r in rows if r[1] + r[2] < r[3]]
    return sorted(rows)


class Bars:
    """Draws progress; `start` once, `update` often, `finish` once."""

    def __init__(self, multi: bool, complete: bool) -> None:
        self.multi = multi
        self.complete = complete

    def start(self, report: Report) -> None:
        """The first counts."""

    def update(self, report: Report, elapsed: float) -> None:
        """New counts."""

    def finish(self, report: Report, elapsed: float, failed: int) -> None:
        """The last counts; ``failed`` futures did not finish well."""


class TextBars(Bars):
    """Plain text, written once at the end (for pipes, logs and tests)."""

    WIDTH = 40

    def __init__(self, multi: bool, complete: bool, file: IO[str] | None) -> None:
        super().__init__(multi, complete)
        self.file = file

    def finish(self, report: Report, elapsed: float, failed: int) -> None:
        out = self.file if self.file is not None else sys.stdout
        rows = _rows(report, self.multi, True)
        width = max((len(r[0]) for r in rows), default=3)
        for name, done, erred, total in rows:
            frac = (done + erred) / total if total else 1.0
            filled = int(round(frac * self.WIDTH))
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            note = f"  ({erred} erred)" if erred else ""
            out.write(f"{name:<{width}} [{bar}] {done + erred:>{len(str(total))}}/{total}"
                      f" {100 * frac:5.1f}%{note}\n")  # fmt: skip
        status = "completed" if not failed else f"finished, {failed} not successfully"
        out.write(f"{_plural(sum(r[3] for r in rows), 'task')} {status} in {elapsed:.1f}s\n")
        out.flush()


class RichBars(Bars):
    """rich progress bars in a terminal (refreshed by us: no thread of its own)."""

    def __init__(self, multi: bool, complete: bool, file: IO[str] | None) -> None:
        super().__init__(multi, complete)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TimeElapsedColumn(),
            console=Console(file=file) if file is not None else None, auto_refresh=False,
        )  # fmt: skip
        self.ids: dict[str, Any] = {}

    def start(self, report: Report) -> None:
        self.progress.start()
        self.update(report, 0.0)

    def update(self, report: Report, elapsed: float) -> None:
        shown = set()
        for name, done, erred, total in _rows(report, self.multi, self.complete):
            shown.add(name)
            label = f"{name} ({erred} erred)" if erred else name
            if name not in self.ids:
                self.ids[name] = self.progress.add_task(label, total=total)
            self.progress.update(self.ids[name], completed=done + erred, total=total,
                                 description=label, visible=True)  # fmt: skip
        for name, task_id in self.ids.items():
            if name not in shown:
                self.progress.update(task_id, visible=False)
        self.progress.refresh()

    def finish(self, report: Report, elapsed: float, failed: int) -> None:
        self.complete = True
        self.update(report, elapsed)
        self.progress.stop()


class WidgetBars(Bars):
    """ipywidgets bars in Jupyter."""

    def __init__(self, multi: bool, complete: bool) -> None:
        super().__init__(multi, complete)
        import ipywidgets
        from IPython.display import display

        self.widgets: Any = ipywidgets
        self.box = ipywidgets.VBox([])
        self.bars: dict[str, tuple[Any, Any]] = {}
        display(self.box)

    def update(self, report: Report, elapsed: float) -> None:
        w = self.widgets
        for name, done, erred, total in _rows(report, self.multi, self.complete):
            if name not in self.bars:
                bar = w.IntProgress(min=0, max=max(1, total), description=name[:20])
                label = w.HTML()
                self.bars[name] = (bar, label)
                self.box.children = (*self.box.children, w.HBox([bar, label]))
            bar, label = self.bars[name]
            bar.max = max(1, total)
            bar.value = done + erred
            bar.bar_style = "danger" if erred else ("success" if done >= total else "")
            label.value = f"{done + erred} / {total}" + (f" ({erred} erred)" if erred else "")

    def start(self, report: Report) -> None:
        self.update(report, 0.0)

    def finish(self, report: Report, elapsed: float, failed: int) -> None:
        self.complete = True
        self.update(report, elapsed)


def _make_bars(notebook: bool, multi: bool, complete: bool, file: IO[str] | None) -> Bars:
    if notebook:
        try:
            return WidgetBars(multi, complete)
        except ImportError:
            pass  # no ipywidgets: rich draws in Jupyter too
        return RichBars(multi, complete, file)
    stream = file if file is not None else sys.stdout
    isatty: Callable[[], bool] = getattr(stream, "isatty", lambda: False)
    if isatty():
        return RichBars(multi, complete, file)
    return TextBars(multi, complete, file)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
