"""The journal is part of the scheduler: it never unpickles user data, and it imports only
the core and the protocol below it (the scheduler imports it, not the other way round)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "shoal"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level] if node.level else ()
            module = ".".join((*base, node.module) if node.module else base) if node.level \
                else node.module or ""  # fmt: skip
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "journal").glob("*.py")), ids=lambda p: p.name)
def test_the_journal_never_unpickles_and_stays_below_the_scheduler(path: Path) -> None:
    names = imports_of(path)
    assert names, path
    for name in names:
        assert name.split(".")[0] not in {"pickle", "cloudpickle", "marshal"}, name
        assert not name.endswith((".deserialize", ".loads")), f"{path.name} imports {name}"
        if name.startswith("shoal."):
            assert name.split(".")[1] in {"core", "protocol", "journal"}, f"{path.name}: {name}"
