"""shoal/security is a leaf: comm/ and every server import it, so it imports nothing from
the rest of shoal (a cycle would follow), and servers load no ``cryptography`` unless they
make certificates."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "shoal" / "security"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_imports_nothing_from_the_rest_of_shoal(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert node.level == 1 or not module.startswith("shoal"), f"{path.name}: {module}"
            assert node.level <= 1, f"{path.name} imports from {'.' * node.level}{module}"
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("shoal") for a in node.names), path.name


def test_servers_do_not_load_cryptography() -> None:
    code = ("import sys, shoal, shoal.cli, shoal.scheduler, shoal.worker.server;"
            " print('cryptography' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()  # fmt: skip
    assert out == "False"
