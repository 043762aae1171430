"""The API reference pages name every public name of shoal, shoal.jobs, shoal.integrations
and shoal.testing (mkdocstrings renders each `::: name` from its docstring)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from docs_runnable import DOCS
from test_exports import PUBLIC

REFERENCE = DOCS / "reference"


def documented() -> set[str]:
    """Each `::: name` of the reference pages, and the `members: [...]` listed under one."""
    names: set[str] = set()
    for page in REFERENCE.glob("*.md"):
        current = ""
        for line in page.read_text().splitlines():
            if line.startswith("::: "):
                current = line[4:].strip()
                names.add(current)
            elif line.strip().startswith("members: [") and current:
                members = line.split("[", 1)[1].rstrip("]").split(",")
                names |= {current + "." + m.strip(" '\"") for m in members}
    return names


def public_names(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return {f"{module_name}.{n}" for n in module.__all__}
    return {f"{module_name}.{n}" for n, v in vars(module).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)}  # fmt: skip


def test_every_pinned_shoal_name_is_in_the_reference() -> None:
    missing = {f"shoal.{n}" for n in PUBLIC} - documented()
    assert not missing, f"not in docs/reference/shoal.md: {sorted(missing)}"


@pytest.mark.parametrize("module", ["shoal.jobs", "shoal.testing", "shoal.integrations.executor",
                                    "shoal.integrations.joblib", "shoal.integrations.dask"])
def test_every_public_name_of_the_module_is_in_the_reference(
        module: str, require: Callable[[object, str], None]) -> None:
    for library in ("joblib", "dask"):
        require(importlib.util.find_spec(library) is not None,
                f"{library} is not installed (pip install -e '.[test]')")
    missing = public_names(module) - documented()
    assert not missing, f"not in docs/reference/: {sorted(missing)}"


def test_the_site_builds_strict_and_renders_every_pinned_name(
        require: Callable[[object, str], None]) -> None:
    """``mkdocs build --strict`` (no broken link, no missing reference) into a temporary
    directory; each pinned name of ``shoal`` is an anchor of the rendered reference page."""
    require(importlib.util.find_spec("mkdocs") is not None
            and importlib.util.find_spec("mkdocstrings_handlers") is not None,
            "mkdocs is not installed (pip install -e '.[docs]')")
    root = DOCS.parent
    with tempfile.TemporaryDirectory(prefix="shoal-site-") as site:
        built = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", site],
            check=False, cwd=root, capture_output=True, text=True, timeout=300,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
        assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stderr[-6000:]}"
        page = Path(site, "reference", "shoal", "index.html").read_text()
    missing = {n for n in PUBLIC if f'id="shoal.{n}"' not in page}
    assert not missing, f"not rendered in the reference: {sorted(missing)}"
