"""The dashboard page in a real browser: headless Chromium loads it while tasks run, and the
workers table, task stream, progress bars and task states must be drawn by its JS.

Chromium is Debian's ``chromium`` package (.ci/run installs it). The page is loaded with
``?transport=poll`` (it polls /api/snapshot): a server-sent-event stream never finishes
loading, and Chromium's virtual time, which makes ``--dump-dom`` deterministic, does not
advance while a fetch is open. The event stream itself is tested in test_api.py.

Set ``SHOAL_SCREENSHOT_DIR`` to keep the screenshot it takes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import shoal
from shoal.testing import Gate, gen_cluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(autouse=True)
def _needs_chromium(require: Callable[[object, str], None]) -> None:
    require(CHROMIUM is not None,
            "chromium is not installed (apt-get install -y chromium; .ci/run does it)")  # fmt: skip


def chromium(url: str, *args: str, timeout: float = 45.0) -> str:
    """Run headless Chromium on ``url``; its stdout. Its whole process group goes at the end."""
    assert CHROMIUM is not None, "chromium is required in CI: .ci/run installs it"
    profile = tempfile.mkdtemp(prefix="shoal-chromium-")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--window-size=1366,900", *args, url]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"chromium did not finish within {timeout}s") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helpers it may have left behind
        except ProcessLookupError:
            pass
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return out


def nap(x: int) -> int:
    time.sleep(0.02)
    return x + 1


def test_dashboard_page_renders_live_cluster_state(tmp_path: Path) -> None:
    with gen_cluster(n_workers=2, threads_per_worker=2) as client:
        # given: finished work (task runs to draw), and a task still running behind a gate
        gate = Gate()
        try:
            done = client.map(nap, range(40))
            shoal.wait(done)
            running = client.submit(gate, 1)
            workers = sorted(client.scheduler_info()["workers"])
            url = f"{client.dashboard_link}?transport=poll&interval=0.5"

            # when: a browser loads the page and runs its script for a few (virtual) seconds
            dom = chromium(url, "--virtual-time-budget=4000", "--dump-dom")

            # then: the JS drew the workers table, one row per worker...
            for address in workers:
                assert f'data-worker="{address}"' in dom, "a worker row is missing"
            assert "No workers yet." not in dom
            # ...the task stream (its runs counted, their groups in the legend)...
            runs = re.search(r'id="task-stream"[^>]*data-runs="(\d+)"', dom)
            assert runs is not None and int(runs.group(1)) >= 40, "the task stream is empty"
            assert 'data-group="nap"' in dom
            # ...the progress bars and the task states, and the live indicator
            assert re.search(r'class="progress-row" data-group="nap"', dom)
            assert 'data-state="processing"' in dom and 'data-state="memory"' in dom
            assert "live (polling)" in dom

            # and a screenshot a person can read
            shot = tmp_path / "dashboard.png"
            chromium(url, "--virtual-time-budget=4000", f"--screenshot={shot}")
            assert shot.exists() and shot.stat().st_size > 20_000
            keep = os.environ.get("SHOAL_SCREENSHOT_DIR")
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, Path(keep) / "dashboard.png")
            assert not running.done()
        finally:
            gate.close()
