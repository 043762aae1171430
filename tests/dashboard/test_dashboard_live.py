"""The dashboard live: its event stream from a real ``shoal scheduler`` process while work
runs on a ``shoal worker`` process, and every tab of the page in real headless Chromium.

The browser is driven over the Chrome DevTools Protocol (``--remote-debugging-port``, a
websocket through aiohttp): the page runs in real time with its default transport, the
server-sent-event stream, and the test clicks its tabs and polls the DOM with a deadline.
(test_browser.py instead dumps the DOM of a polling page under virtual time.)

Chromium is Debian's ``chromium`` package (.ci/run installs it); without it the browser
test skips locally and fails under CI (the ``require`` fixture, tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import cloudpickle

import shoal
from shoal.jobs import JobQueue
from shoal.testing import Gate, gen_cluster, spawn_scheduler, spawn_worker, wait_until

# Worker processes cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# --------------------------------------------------------------------- the event stream


def wait_for_file(path: str, value: int) -> int:
    """A task that runs until ``path`` exists (at most 60 s), then returns ``value``."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def double(x: int) -> int:
    return 2 * x


class EventStream:
    """``/api/events`` read line by line; every read is bounded by the socket timeout."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.response = urllib.request.urlopen(url, timeout=timeout)
        assert self.response.headers["Content-Type"].startswith("text/event-stream")

    def next(self) -> dict[str, Any]:
        while True:
            line = self.response.readline()
            assert line, "the event stream ended"
            if line.startswith(b"data: "):
                event: dict[str, Any] = json.loads(line[6:])
                return event

    def until(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        """The first event for which ``predicate`` holds, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.next()
            if predicate(event):
                return event
        raise AssertionError(f"no event with {what} within {timeout}s")

    def close(self) -> None:
        self.response.close()


def test_event_stream_of_a_scheduler_process_follows_running_work(tmp_path: Path) -> None:
    # a job queue for the scheduler to show (--jobs-url), with two jobs waiting
    jobs_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    jobs = JobQueue(jobs_url)
    send = jobs.job(name="send", queue="mail")(double)
    send.delay(1), send.delay(2)
    jobs.close()
    with spawn_scheduler(extra_args=["--dashboard-address", ":0", "--jobs-url", jobs_url]) \
            as scheduler, \
            spawn_worker(scheduler.address, name="sse-worker",
                         extra_args=["--no-dashboard"]) as worker:  # fmt: skip
        link = scheduler.wait_for_line(r"shoal dashboard at (\S+)", 10).group(1)
        with shoal.Client(scheduler.address, timeout=10, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=20)
            stream = EventStream(link + "api/events?interval=0.1")
            try:
                # given: a listener, which first gets the state as it is
                first = stream.next()
                assert set(first) == {"info", "workers", "tasks", "jobs", "stream"}
                assert [w["name"] for w in first["workers"]] == ["sse-worker"]
                assert first["info"]["address"] == scheduler.address
                # (the queue's counts are read on a thread: the first event may precede them)
                mail = stream.until(lambda e: e["jobs"]["queues"], 15, "the job queue")
                assert mail["jobs"]["attached"] and mail["jobs"]["url"] == jobs_url
                assert mail["jobs"]["queues"]["mail"]["queued"] == 2

                # when: a task starts and keeps running
                release = str(tmp_path / "release")
                running = client.submit(wait_for_file, release, 1, pure=False)

                # then: an event shows it processing on the worker, before it finishes
                def processing(event: dict[str, Any]) -> bool:
                    groups = {g["name"]: g["states"] for g in event["tasks"]["groups"]}
                    busy = [w for w in event["workers"] if w["processing"] == 1]
                    return groups.get("wait_for_file", {}).get("processing") == 1 and bool(busy)

                stream.until(processing, 15, "wait_for_file processing")
                assert not running.done()

                # when: it finishes, and a group of other tasks runs
                Path(release).touch()
                assert running.result(timeout=20) == 1
                doubled = client.map(double, range(5))
                assert client.gather(doubled) == [0, 2, 4, 6, 8]

                # then: later events carry each run once, on that worker, with its status
                runs: dict[str, list[Any]] = {}

                def all_runs(event: dict[str, Any]) -> bool:
                    for row in event["stream"]["rows"]:
                        assert row[0] not in runs, f"run of {row[0]} sent twice"
                        runs[row[0]] = row
                    return {running.key, *(f.key for f in doubled)} <= set(runs)

                last = stream.until(all_runs, 15, "all six task runs")
                for key in [running.key, *(f.key for f in doubled)]:
                    _, group, where, start, stop, status = runs[key]
                    assert where == worker.address and status == "ok" and start <= stop
                    assert group == ("wait_for_file" if key == running.key else "double")
                # and the counts follow (the counts in an event may lag its runs by the
                # dashboard's shared-snapshot age, a quarter second)
                def five_doubles(event: dict[str, Any]) -> bool:
                    all_runs(event)
                    states = {g["name"]: g["states"] for g in event["tasks"]["groups"]}
                    return bool(states.get("double", {}).get("memory") == 5)

                last = stream.until(five_doubles, 15, "five doubles in memory")
            finally:
                stream.close()

            # and a job enqueued now shows in a later event (the broker is read every 2 s)
            send.delay(3)
            jobs.close()
            third = EventStream(link + "api/events?interval=0.1")
            try:
                third.until(lambda e: e["jobs"]["queues"].get("mail", {}).get("queued") == 3,
                            15, "three queued jobs")  # fmt: skip
            finally:
                third.close()

            # and a new listener that gives ``since`` gets only what came after
            since = int(last["stream"]["next"])
            later = client.submit(double, 100)
            assert later.result(timeout=20) == 200
            resumed = EventStream(link + f"api/events?interval=0.1&since={since}")
            try:
                event = resumed.until(lambda e: e["stream"]["rows"], 15, "a task run")
                assert [row[0] for row in event["stream"]["rows"]] == [later.key]
            finally:
                resumed.close()
        worker.stop(signal.SIGTERM, timeout=15)


# ------------------------------------------------------------------ headless Chromium


class Page:
    """One browser tab over the DevTools Protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> Any:
        rid = next(self.ids)
        await self.ws.send_json({"id": rid, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == rid:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (promises awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)  # fmt: skip
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll ``expression`` until it is truthy in JS terms; its value (an element comes
        back as ``{}``)."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expression)
            if value not in (None, False, 0, ""):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"the page did not show {what} within {timeout}s"
                                     f" (last value {value!r})")  # fmt: skip
            await asyncio.sleep(0.1)

    async def click(self, selector: str) -> None:
        """A real click, at the element's centre, through the browser's input pipeline."""
        box = await self.eval(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return null;
            e.scrollIntoView({{block: "center"}});
            const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()""")
        assert box is not None, f"nothing matches {selector!r}"
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                            button="left", clickCount=1)  # fmt: skip

    async def text(self, selector: str) -> str:
        return str(await self.eval(f"document.querySelector({json.dumps(selector)}).innerText"))


@contextmanager
def chromium() -> Iterator[str]:
    """Headless Chromium with remote debugging; yields the DevTools HTTP base URL. Its
    process group and profile directory go at the end."""
    assert CHROMIUM is not None, "the test requires chromium first"
    profile = tempfile.mkdtemp(prefix="shoal-chromium-")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--window-size=1366,900", "--remote-debugging-port=0", "about:blank"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        seen = b""
        while True:
            match = re.search(rb"DevTools listening on ws://([^/\s]+)/", seen)
            if match:
                break
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, f"chromium did not start: {seen[-2000:]!r}"
            ready, _, _ = select.select([proc.stderr], [], [], left)
            if ready:
                seen += os.read(proc.stderr.fileno(), 65536)
        yield f"http://{match.group(1).decode()}"
    finally:
        # Its singleton socket lives in a directory of its own under /tmp: remove it too.
        try:
            singleton: str | None = os.path.dirname(os.readlink(Path(profile, "SingletonSocket")))
        except OSError:
            singleton = None
        proc.terminate()  # a clean exit first, then whatever helpers are left
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(profile, ignore_errors=True)
        if singleton and os.path.basename(singleton).startswith("org.chromium.Chromium."):
            shutil.rmtree(singleton, ignore_errors=True)


@asynccontextmanager
async def open_page(devtools: str, url: str) -> AsyncIterator[Page]:
    """The browser's first tab, navigated to ``url``."""
    async with aiohttp.ClientSession() as session:
        async with session.get(devtools + "/json/list") as r:
            targets = await r.json()
        (target,) = [t for t in targets if t["type"] == "page"]
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.send("Page.navigate", url=url)
            await page.wait_for(f"location.href.startsWith({json.dumps(url)})"
                                " && document.readyState === 'complete'", 20, "the page loaded")
            yield page


def nap(x: int) -> int:
    time.sleep(0.01)
    return x + 1


def total(*xs: int) -> int:
    return sum(xs)


def count_nodes(selector: str) -> str:
    return f"document.querySelectorAll({json.dumps(selector)}).length"


async def browse_every_tab(page: Page, *, workers: dict[str, Any], story_key: str,
                           client: shoal.Client) -> None:  # fmt: skip
    # ---- Status: live over server-sent events, with every panel drawn
    await page.wait_for("document.getElementById('connection-text').textContent === 'live'",
                        20, "the live (event stream) indicator")  # fmt: skip
    await page.wait_for(" && ".join(f"document.querySelector('[data-worker=\"{a}\"]')"
                                    for a in workers), 20, "a row per worker")  # fmt: skip
    await page.wait_for("+document.getElementById('task-stream').dataset.runs >= 41", 20,
                        "the task stream's runs")  # fmt: skip
    assert await page.eval("!!document.querySelector('#stream-legend [data-group=\"nap\"]')")
    await page.wait_for("document.querySelector('.progress-row[data-group=\"nap\"]')", 10,
                        "nap's progress bar")  # fmt: skip
    progress = await page.text('.progress-row[data-group="nap"]')
    assert "40 / 40" in progress, progress
    states = await page.text("#states")
    assert "processing" in states and "memory" in states, states
    # the small graph: one circle per task the scheduler holds, edges into total
    held = int(await page.wait_for("document.querySelectorAll('#graph-small circle').length",
                                   15, "the task graph"))  # fmt: skip
    assert held >= 42  # 40 naps, total, the gated task
    assert await page.eval(count_nodes("#graph-small line")) >= 40
    header = await page.text("#summary")
    assert re.search(r"workers\s+2", header), header

    # ---- and it follows new work as it comes, without a reload
    late = client.map(total, range(7), [1] * 7)
    shoal.wait(late, timeout=20)
    await page.wait_for("document.querySelector('.progress-row[data-group=\"total\"]')"
                        " && document.querySelector('.progress-row[data-group=\"total\"]')"
                        ".innerText.includes('8 / 8')", 15, "the new group's progress")  # fmt: skip

    # ---- Workers: the detail table, one row per worker, with its memory limit
    await page.click('#tabs button[data-tab="workers"]')
    await page.wait_for("document.getElementById('tab-workers').classList.contains('active')",
                        5, "the Workers tab")  # fmt: skip
    assert await page.eval("location.hash") == "#workers"
    assert await page.text("#workers-count") == "2 workers"
    rows = await page.eval("[...document.querySelectorAll('#workers-detail tr')]"
                           ".map(r => [...r.cells].map(c => c.innerText))")  # fmt: skip
    assert sorted(r[1] for r in rows) == sorted(workers)
    for r in rows:
        info = workers[r[1]]
        assert r[0] == info["name"] and r[2] == str(info["nthreads"])
        assert r[5] == "954 MiB", r  # the 1 GB limit
    assert await page.eval("document.getElementById('tab-status').classList.contains('active')"
                           ) is False  # fmt: skip

    # ---- Tasks: the big graph, the task list, and a task's story
    await page.click('#tabs button[data-tab="tasks"]')
    await page.wait_for(count_nodes("#graph-big circle") + " >= 42", 15, "the big task graph")
    note = await page.wait_for("document.getElementById('tasks-note').textContent", 10,
                               "the task list")  # fmt: skip
    assert re.match(r"\d+ tasks; showing 1–\d+", note), note
    listed = await page.eval("[...document.querySelectorAll('#tasks-body tr td:first-child')]"
                             ".map(td => td.innerText)")  # fmt: skip
    assert story_key in listed
    # filter by state: the one running task
    await page.eval("document.getElementById('tasks-state').value = 'processing'")
    await page.click("#tasks-form button[type=submit]")
    await page.wait_for("document.querySelectorAll('#tasks-body tr').length === 1", 10,
                        "only the processing task listed")  # fmt: skip
    processing_row = await page.text("#tasks-body tr")
    assert "gate" in processing_row.lower() and "processing" in processing_row
    # the story of a finished task, asked for through the form
    await page.eval(f"document.getElementById('story-key').value = {json.dumps(story_key)}")
    await page.click("#story-form button[type=submit]")
    story = await page.wait_for(
        "document.querySelector('#story table') && document.getElementById('story').innerText",
        10, "the task's story")  # fmt: skip
    assert "now memory" in story and "processing" in story and "memory" in story, story
    assert any(address in story for address in workers), story  # the run, and where
    # clicking a node of the graph tells that task's story
    await page.eval("document.getElementById('story').replaceChildren()")
    await page.click("#graph-big circle")
    await page.wait_for("document.querySelector('#story table')", 10, "a clicked node's story")

    # ---- Jobs: the attached queue's counts and its schedule
    await page.click('#tabs button[data-tab="jobs"]')
    await page.wait_for("document.querySelector('#jobs tr[data-queue=\"mail\"]')", 15,
                        "the mail queue's row")  # fmt: skip
    headers = await page.eval("[...document.querySelectorAll('#jobs th')].map(t => t.innerText)")
    mail = await page.eval("[...document.querySelector('#jobs tr[data-queue=\"mail\"]').cells]"
                           ".map(c => c.innerText)")  # fmt: skip
    assert len(headers) == len(mail), (headers, mail)
    per_status = dict(zip(headers[1:], mail[1:], strict=True))
    assert per_status["succeeded"] == "2" and per_status["queued"] == "1", per_status
    assert per_status["dead"] == "1" and per_status["failed"] == "1", per_status
    schedules = await page.text("#schedules")
    assert "nightly" in schedules and "0 3 * * *" in schedules, schedules

    # ---- Logs: the scheduler's newest records
    await page.click('#tabs button[data-tab="logs"]')
    logs = await page.wait_for("document.querySelectorAll('#logs div').length &&"
                               " document.getElementById('logs').innerText", 10,
                               "log rows")  # fmt: skip
    assert "shoal.scheduler" in logs and "connected" in logs, logs[-2000:]


def test_every_dashboard_tab_shows_the_running_cluster_in_chromium(
    tmp_path: Path, require: Callable[[object, str], None]
) -> None:
    require(CHROMIUM is not None, "chromium is not installed (apt-get install -y chromium)")
    # a job queue with finished, failed, queued jobs and a schedule, for the Jobs tab
    jobs = JobQueue(f"sqlite:///{tmp_path / 'jobs.db'}")

    @jobs.job(name="send", queue="mail", retries=0)
    def send(to: str) -> str:
        if to == "nobody":
            raise ValueError("no such address")
        return to

    @jobs.periodic("0 3 * * *", name="nightly")
    def nightly() -> None: ...

    handles = [send.delay("ada"), send.delay("bob"), send.delay("nobody")]
    with jobs.worker(queues=["mail"], schedules=False):
        wait_until(lambda: all(h.done() for h in handles), timeout=20, message="jobs finished")
    send.delay("carol")  # stays queued

    shoal_logger = __import__("logging").getLogger("shoal")
    level = shoal_logger.level
    shoal_logger.setLevel("INFO")  # what SHOAL_LOG_LEVEL=info does, for the Logs tab
    try:
        with gen_cluster(n_workers=2, threads_per_worker=2, memory_limit="1GB", jobs=jobs,
                         timeout=90) as client:  # fmt: skip
            gate = Gate()
            try:
                # given: finished work, and a task still running behind a gate
                naps = client.map(nap, range(40))
                summed = client.submit(total, *naps)
                assert summed.result(timeout=30) == sum(range(1, 41))
                running = client.submit(gate, 1)
                workers = client.scheduler_info()["workers"]
                with chromium() as devtools:

                    async def go() -> None:
                        async with open_page(devtools, client.dashboard_link or "") as page:
                            await browse_every_tab(page, workers=workers, story_key=summed.key,
                                                   client=client)  # fmt: skip

                    asyncio.run(asyncio.wait_for(go(), 75))
                assert not running.done()
            finally:
                gate.close()
    finally:
        shoal_logger.setLevel(level)
        jobs.close()
