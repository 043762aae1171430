"""The joblib backend "shoal": Parallel and scikit-learn on the cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import pytest

import shoal
from shoal.protocol.messages import TaskSpec
from shoal.worker.context import get_worker

joblib = pytest.importorskip("joblib", reason="joblib is an optional extra: pip install 'shoal[joblib]'")
np = pytest.importorskip("numpy")

import shoal.integrations.joblib  # noqa: E402 - registers the backend, after the importorskip


class _Workers:
    """The workers that have started a call (in-process workers share this object).

    `arrive` holds the first call on each worker until calls have started on ``n`` workers
    (or 10 s pass): while one worker is held, more calls can start only on another, so a
    backend that spreads work passes, whatever the timing, and one that does not fails."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.changed = threading.Condition()
        self.n = 2

    def arrive(self) -> str:
        address = get_worker().address  # raises ValueError outside a worker's task
        with self.changed:
            if address in self.seen:
                return address
            self.seen.add(address)
            self.changed.notify_all()
            self.changed.wait_for(lambda: len(self.seen) >= self.n, timeout=10)
        return address


_WORKERS = _Workers()


@pytest.fixture
def workers_seen() -> _Workers:
    global _WORKERS
    _WORKERS = _Workers()
    return _WORKERS


def where_held(x: Any) -> tuple[Any, str]:
    return x, _WORKERS.arrive()


#: where each fit of a `RecordingTree` ran: a worker's address, or "here" outside tasks
_FITTED_ON: list[str] = []


def _recording_tree() -> Any:
    from sklearn.tree import DecisionTreeClassifier

    class RecordingTree(DecisionTreeClassifier):  # type: ignore[misc]
        """A decision tree that notes where it is fitted."""

        def fit(self, X: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                _FITTED_ON.append(_WORKERS.arrive())
            except ValueError:  # not in a task: GridSearchCV's refit, in this process
                _FITTED_ON.append("here")
            return super().fit(X, y, *args, **kwargs)

    RecordingTree.__module__ = __name__
    RecordingTree.__qualname__ = "RecordingTree"
    globals()["RecordingTree"] = RecordingTree  # pickled by reference, to this module
    return RecordingTree


def first_plus(x: int, data: Any) -> float:
    return x + float(data[0])


def boom(x: int) -> int:
    raise KeyError(f"missing {x}")


def inner_sum(n: int) -> int:
    return sum(joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(-i) for i in range(n)))


def test_import_shoal_imports_neither_joblib_nor_dask() -> None:
    code = ("import sys, shoal; bad = [m for m in ('joblib', 'dask', 'sklearn', 'pandas')"
            " if m in sys.modules]; assert not bad, bad")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_parallel_runs_on_the_workers(client: shoal.Client, workers_seen: _Workers) -> None:
    with joblib.parallel_backend("shoal"):
        results = joblib.Parallel(batch_size=1)(joblib.delayed(where_held)(i) for i in range(30))
    assert [x for x, _ in results] == list(range(30))
    # Each call ran in a worker's task (get_worker raises anywhere else), on both workers.
    assert {w for _, w in results} == set(client.nthreads()) == workers_seen.seen


def test_parallel_runs_in_the_worker_processes(process_client: shoal.Client) -> None:
    def where(x: Any) -> tuple[Any, int, str]:
        """``x``, and the process and worker that ran this (a local function: pickled by
        value, as worker processes cannot import test modules)."""
        return x, os.getpid(), get_worker().address

    worker_pids = process_client.run(os.getpid)  # {address: pid}
    with joblib.parallel_backend("shoal"):
        results = joblib.Parallel(batch_size=1)(joblib.delayed(where)(i) for i in range(20))
    assert [x for x, _, _ in results] == list(range(20))
    assert os.getpid() not in {pid for _, pid, _ in results}
    assert all(worker_pids[address] == pid for _, pid, address in results), (
        "every call ran in the process of the worker that ran its task")


def test_n_jobs_means_the_clusters_threads(client: shoal.Client) -> None:
    with joblib.parallel_backend("shoal"):
        assert joblib.effective_n_jobs(-1) == 2
        assert joblib.effective_n_jobs(5) == 5
    with joblib.parallel_config(backend="shoal", n_jobs=-1):
        assert joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(5)) == [0, 1, 2, 3, 4]


def test_exceptions_keep_their_type(client: shoal.Client) -> None:
    with joblib.parallel_backend("shoal"), pytest.raises(KeyError, match="missing 3"):
        joblib.Parallel()(joblib.delayed(boom)(i) for i in [3, 3, 3])
    assert client.submit(abs, -1).result(timeout=10) == 1  # still usable afterwards


def test_large_arguments_are_scattered_once(client: shoal.Client,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    scatters: list[Any] = []
    specs: list[TaskSpec] = []
    scatter, submit_specs = client.scatter, client._submit_specs

    def counting_scatter(data: Any, *args: Any, **kwargs: Any) -> Any:
        scatters.append(data)
        return scatter(data, *args, **kwargs)

    def recording_submit(batch: list[TaskSpec], wanted: list[str]) -> list[shoal.Future]:
        specs.extend(batch)
        return submit_specs(batch, wanted)

    monkeypatch.setattr(client, "scatter", counting_scatter)
    monkeypatch.setattr(client, "_submit_specs", recording_submit)
    big = np.arange(500_000, dtype=np.float64) + 1  # 4 MB
    small = np.ones(10)
    with joblib.parallel_backend("shoal"):
        out = joblib.Parallel(batch_size=1)(
            joblib.delayed(first_plus)(i, data=big) for i in range(20))  # fmt: skip
        assert out == [i + 1.0 for i in range(20)]
        joblib.Parallel(batch_size=1)(joblib.delayed(first_plus)(i, small) for i in range(5))
    assert len(scatters) == 1, "the 4 MB array went to the cluster once"
    assert len(specs) == 25 and max(s.args.nbytes for s in specs) < 100_000
    assert sum(1 for s in specs if s.dependencies) == 20


def test_broadcast_scatter_up_front(client: shoal.Client) -> None:
    data = np.arange(1000.0) + 7
    with joblib.parallel_backend("shoal", scatter=[data]):
        assert joblib.Parallel()(joblib.delayed(first_plus)(i, data) for i in range(4)) == [
            7.0, 8.0, 9.0, 10.0]  # fmt: skip


def test_nested_parallel_inside_tasks(client: shoal.Client) -> None:
    with joblib.parallel_backend("shoal"):
        out = joblib.Parallel(batch_size=1)(joblib.delayed(inner_sum)(n) for n in range(2, 6))
    assert out == [sum(range(n)) for n in range(2, 6)]


def test_return_as_generator(client: shoal.Client) -> None:
    with joblib.parallel_backend("shoal"):
        gen = joblib.Parallel(return_as="generator_unordered")(
            joblib.delayed(abs)(-i) for i in range(10))  # fmt: skip
        assert sorted(gen) == list(range(10))


def test_grid_search_cv_spreads_over_the_workers(client: shoal.Client,
                                                 workers_seen: _Workers) -> None:  # fmt: skip
    sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is optional")
    from sklearn.model_selection import GridSearchCV

    tree = _recording_tree()
    X, y = sklearn_datasets.make_classification(n_samples=300, n_features=8, random_state=0)
    grid = {"max_depth": [2, 4, 8], "min_samples_leaf": [1, 5]}
    local = GridSearchCV(tree(random_state=0), grid, cv=3).fit(X, y)
    assert _FITTED_ON.count("here") == 6 * 3 + 1
    _FITTED_ON.clear()
    with joblib.parallel_backend("shoal"):
        remote = GridSearchCV(tree(random_state=0), grid, cv=3, n_jobs=-1).fit(X, y)
    assert remote.best_params_ == local.best_params_
    assert remote.best_score_ == pytest.approx(local.best_score_)
    np.testing.assert_allclose(remote.cv_results_["mean_test_score"],
                               local.cv_results_["mean_test_score"])  # fmt: skip
    # Every cross-validation fit ran on a worker, over both; only the final refit ran here.
    assert len(_FITTED_ON) == 6 * 3 + 1 and _FITTED_ON.count("here") == 1
    assert {w for w in _FITTED_ON if w != "here"} == set(client.nthreads())
