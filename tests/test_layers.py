"""Layer rules from DESIGN.md, checked on the source: arrows point down only."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shoal"


def imports_of(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against shoal)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level]
                module = ".".join((*base, node.module) if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_core_is_pure(path: Path) -> None:
    """core/ does no I/O and imports nothing from the layers above it."""
    forbidden_std = {"asyncio", "socket", "time", "threading", "pickle", "cloudpickle", "os"}
    for name in imports_of(path):
        top = name.split(".")[0]
        assert top not in forbidden_std, f"{path.name} imports {name}"
        if name.startswith("shoal."):
            layer = name.split(".")[1]
            assert layer in {"core", "protocol"}, f"{path.name} imports {name} (a higher layer)"


@pytest.mark.parametrize("path", [PACKAGE / "scheduler.py", *sorted((PACKAGE / "core").glob("*.py"))],
                         ids=lambda p: p.name)
def test_scheduler_never_unpickles(path: Path) -> None:
    """The scheduler carries user payloads as opaque bytes: it cannot deserialize them."""
    for name in imports_of(path):
        assert name.split(".")[0] not in {"pickle", "cloudpickle"}, f"{path.name}: {name}"
        assert not name.endswith(".deserialize"), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "client").glob("*.py")), ids=lambda p: p.name)
def test_client_side_does_not_import_the_worker_server(path: Path) -> None:
    """The client side needs only the tasks' thread context from the worker side."""
    for name in imports_of(path):
        if name.startswith("shoal.worker"):
            assert name.startswith("shoal.worker.context"), f"{path.name} imports {name}"
