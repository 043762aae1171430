"""Every runnable block of the documentation runs, so the docs cannot drift from the code.

Each page's runnable blocks (see `docs_runnable.py`) run in order as one program, in a fresh
Python process in a temporary directory; the programs start their own local clusters
(``shoal.Client(n_workers=2)``, as a reader would). A page passes when its program exits 0
and leaves no process behind in its session.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from docs_runnable import DOCS, Page, parse, runnable_pages

PAGES = runnable_pages()
TIMEOUT = 120.0
#: libraries of the extras that some pages use (all in the ``test`` extra)
OPTIONAL = ("dask", "pandas", "numpy", "joblib", "sklearn", "flask", "redis", "croniter")


def missing_libraries(page: Page) -> list[str]:
    imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", page.program, flags=re.MULTILINE))
    return [name for name in OPTIONAL
            if name in imported and importlib.util.find_spec(name) is None]  # fmt: skip


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_page(page: Page) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="shoal-docs-") as workdir:
        env = {**os.environ, "PYTHONPATH": str(DOCS.parent), "SHOAL_LOG_LEVEL": "warning"}
        proc = subprocess.Popen([sys.executable, "-"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=workdir, env=env, start_new_session=True)
        try:
            out, _ = proc.communicate(page.program, timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # the program's workers must be gone too: poll for it with a deadline, then kill
        deadline = time.monotonic() + 10.0
        while _session_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        leaked = _session_alive(proc.pid)
        if leaked:
            os.killpg(proc.pid, signal.SIGKILL)
        assert not leaked, f"{page.path.name} left processes running:\n{out}"
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def _param(page: Page) -> object:
    marks = [pytest.mark.slow] if page.slow else []
    return pytest.param(page, id=str(page.path.relative_to(DOCS)), marks=marks)


@pytest.mark.parametrize("page", [_param(p) for p in PAGES])
def test_page_runs(page: Page, require: Callable[[object, str], None]) -> None:
    missing = missing_libraries(page)
    require(not missing, f"{page.path.name} needs {missing} (pip install -e '.[test]')")
    done = run_page(page)
    assert done.returncode == 0, (
        f"{page.path.relative_to(DOCS)}: its runnable blocks failed "
        f"(line numbers are the page's):\n{done.stdout[-6000:]}")


def test_the_guides_have_runnable_blocks() -> None:
    # a collector that finds nothing would pass everything: make sure it finds the guides
    found = {p.path.relative_to(DOCS).as_posix() for p in PAGES}
    for page in ("getting-started.md", "guides/parallel-map.md", "guides/jobs.md"):
        assert page in found, f"no runnable block found in docs/{page}"


def test_a_marker_without_a_python_fence_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.md"
    bad.write_text("<!-- run -->\nprint('not in a fence')\n")
    with pytest.raises(ValueError, match="must come right before"):
        parse(bad)


def test_a_failing_block_fails_with_the_pages_line_number(tmp_path: Path) -> None:
    page_path = tmp_path / "failing.md"
    page_path.write_text("# A page\n\ntext\n\n<!-- run -->\n```python\nx = 1\n"
                         "raise RuntimeError('drifted')\n```\n")
    done = run_page(parse(page_path))
    assert done.returncode != 0
    assert "line 8" in done.stdout and "drifted" in done.stdout


def test_blocks_of_a_page_join_in_order_and_a_slow_marker_marks_the_page(tmp_path: Path) -> None:
    page_path = tmp_path / "two.md"
    page_path.write_text("<!-- run -->\n```python\nx = 1\n```\n\n```python\nnot run\n```\n"
                         "<!-- run: slow -->\n```python\nassert x == 1\n```\n")
    page = parse(page_path)
    assert [code for _, code in page.blocks] == ["x = 1", "assert x == 1"]
    assert page.slow
    assert page.program.splitlines()[2] == "x = 1"  # line 3 of the page is line 3 here
    assert run_page(page).returncode == 0
