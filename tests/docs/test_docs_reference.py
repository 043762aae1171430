"""The API reference pages name every public name of shoal, shoal.jobs, shoal.integrations
and shoal.testing (mkdocstrings renders each `::: name` from its docstring)."""

from __future__ import annotations

import importlib
import importlib.util
import types
from collections.abc import Callable

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
