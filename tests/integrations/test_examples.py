"""Every script in examples/ runs with --small (a smoke test) and prints what it computed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: script -> (modules it needs beyond shoal, a line its output must contain)
CASES = {
    "monte_carlo.py": ((), "option price"),
    "word_count.py": ((), "most common:"),
    "dataframe_groupby.py": (("dask.dataframe", "pandas"), "top stores by revenue"),
    "reports.py": ((), "HTML statements written"),
    "sklearn_search.py": (("sklearn", "joblib"), "best: "),
}


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:  # the parent package is missing
            missing.append(name)
    return missing


#: examples that are not --small scripts, and the test that drives each one
COVERED_ELSEWHERE = {"flask_jobs.py": "tests/docs/test_docs_flask_example.py"}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted([*CASES, *COVERED_ELSEWHERE])
    for test in COVERED_ELSEWHERE.values():
        assert (EXAMPLES.parent / test).is_file(), test


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_small(script: str) -> None:
    needs, expected = CASES[script]
    missing = _missing(needs)
    if missing:
        pytest.skip(f"{script} needs the optional {', '.join(missing)}"
                    " (pip install 'shoal[dask,sklearn]')")  # fmt: skip
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--small"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    assert expected in proc.stdout, proc.stdout
    assert "took " in proc.stdout and " s" in proc.stdout
