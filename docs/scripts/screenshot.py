"""Make docs/images/dashboard.png: the dashboard of a real local cluster during a run.

    python docs/scripts/screenshot.py [--out docs/images/dashboard.png]

Starts a two-worker cluster, keeps it busy with a few hundred short tasks in several groups,
and has headless Chromium (Debian's ``chromium``, as the dashboard tests use) take a
screenshot once the page has run its scripts for a few seconds. The image is generated, not
pasted: run this again after a change to the dashboard.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import shoal

OUT = Path(__file__).resolve().parents[1] / "images" / "dashboard.png"


def load(x: int) -> int:
    time.sleep(0.05)
    return x


def transform(x: int) -> int:
    time.sleep(0.1)
    return x * 2


def screenshot(url: str, out: Path, chromium: str, timeout: float = 60.0) -> None:
    with tempfile.TemporaryDirectory(prefix="shoal-screenshot-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-background-networking", "--disable-sync",
               "--disable-component-update", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", "--window-size=1366,860",
               # let the page's scripts poll the API for a while before the picture
               "--timeout=6000", f"--screenshot={out}", url]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        finally:  # chromium's helpers are in its session: none is left behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"chromium made no screenshot (exit {proc.returncode}): "
                               f"{err.decode(errors='replace')[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs chromium (apt-get install -y chromium)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with shoal.Client(n_workers=2, threads_per_worker=2) as client:
        loaded = client.map(load, range(400))
        transformed = client.map(transform, loaded)
        total = client.submit(sum, transformed)
        # wait until some work is done and much is still to do: a picture of a live run
        deadline = time.monotonic() + 30
        while sum(f.done() for f in loaded) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.dashboard_link is not None
        screenshot(client.dashboard_link, args.out, chromium)
        total.result(timeout=120)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
