"""dask collections on a shoal cluster: client.get / compute / persist / as_dask_scheduler."""

from __future__ import annotations

import asyncio
import operator
import warnings
from typing import Any

import pytest

import shoal
from shoal.protocol.messages import TaskSpec
from shoal.testing import Gate, gen_cluster, wait_until
from shoal.worker.context import get_worker

dask = pytest.importorskip("dask", reason="dask is an optional extra: pip install 'shoal[dask]'")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas", reason="pandas is an optional extra: pip install 'shoal[dask]'")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")
dd = pytest.importorskip("dask.dataframe", reason="dask[dataframe] is needed (pyarrow, pandas)")

from shoal.integrations.dask import shoal_key  # noqa: E402 - after the importorskip

# dask decides its shuffle method by looking for a dask.distributed client; shoal has none.


def where_am_i(_: Any = None) -> str:
    return get_worker().address


def boom(x: Any) -> Any:
    raise ValueError(f"boom {x}")


@pytest.fixture
def submitted(client: shoal.Client, monkeypatch: pytest.MonkeyPatch) -> list[list[TaskSpec]]:
    """Every batch of specs the client submits (still submitted for real)."""
    batches: list[list[TaskSpec]] = []
    original = client._submit_specs

    def record(specs: list[TaskSpec], wanted: list[str]) -> list[shoal.Future]:
        batches.append(list(specs))
        return original(specs, wanted)

    monkeypatch.setattr(client, "_submit_specs", record)
    return batches


def test_shoal_keys_are_deterministic_strings() -> None:
    assert shoal_key("x-123") == "x-123"
    assert shoal_key(("x-123", 0, 4)) == "('x-123', 0, 4)"
    assert shoal_key(("x", 1)) == shoal_key(("x", 1))


def test_array_mean_matches_dask(client: shoal.Client,
                                 submitted: list[list[TaskSpec]]) -> None:  # fmt: skip
    x = da.random.random((2000, 2000), chunks=(250, 250))
    expected = x.mean().compute(scheduler="sync")
    got = x.mean().compute(scheduler=client.get)
    assert got == pytest.approx(expected) and 0.49 < got < 0.51
    assert dask.compute(x.sum(), scheduler=client)[0] == pytest.approx(x.sum().compute(scheduler="sync"))
    # One SubmitTasks batch per computation; the reduction depends on the chunks' keys.
    assert len(submitted) == 2
    specs = submitted[0]
    assert len(specs) > 64
    assert sum(len(s.dependencies) for s in specs) >= 64


def test_large_array_mean_from_the_issue(client: shoal.Client) -> None:
    x = da.random.random((10000, 10000), chunks=(1000, 1000))
    assert x.mean().compute(scheduler=client.get) == pytest.approx(0.5, abs=1e-3)


def test_dataframe_groupby_over_many_partitions(client: shoal.Client) -> None:
    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"k": rng.integers(0, 13, 20_000), "x": rng.random(20_000),
                        "y": rng.integers(0, 100, 20_000)})  # fmt: skip
    df = dd.from_pandas(pdf, npartitions=40)
    got = df.groupby("k").agg({"x": "sum", "y": "mean"}).compute(scheduler=client.get)
    expected = pdf.groupby("k").agg({"x": "sum", "y": "mean"})
    pd.testing.assert_frame_equal(got.sort_index(), expected.sort_index())
    counts = df.k.value_counts().compute(scheduler=client.get)
    pd.testing.assert_series_equal(counts.sort_index(), pdf.k.value_counts().sort_index())


def test_dataframe_merge_and_set_index(client: shoal.Client) -> None:
    left = pd.DataFrame({"k": np.arange(200) % 17, "a": np.arange(200)})
    right = pd.DataFrame({"k": np.arange(17), "b": np.arange(17) * 10})
    dl, dr = dd.from_pandas(left, npartitions=8), dd.from_pandas(right, npartitions=3)
    merged = dl.merge(dr, on="k").compute(scheduler=client.get)
    expected = left.merge(right, on="k")
    assert sorted(map(tuple, merged[["k", "a", "b"]].values.tolist())) == sorted(
        map(tuple, expected[["k", "a", "b"]].values.tolist()))  # fmt: skip
    # set_index computes its divisions while building the graph, on dask's default
    # scheduler: make that this client too.
    with client.as_dask_scheduler():
        indexed = dl.set_index("a").compute()
    assert list(indexed.index) == list(range(200))


def test_bag(client: shoal.Client) -> None:
    b = db.from_sequence(range(1000), npartitions=10)
    assert b.map(lambda v: v * 2).filter(lambda v: v % 3 == 0).sum().compute(
        scheduler=client.get) == sum(v * 2 for v in range(1000) if (v * 2) % 3 == 0)  # fmt: skip
    words = db.from_sequence(["a b", "b c", "c c"], npartitions=3)
    freq = dict(words.map(str.split).flatten().frequencies().compute(scheduler=client.get))
    assert freq == {"a": 1, "b": 2, "c": 3}


def test_delayed_with_shared_dependencies(client: shoal.Client) -> None:
    inc = dask.delayed(lambda v: v + 1, pure=True)
    base = [inc(i) for i in range(10)]
    total = dask.delayed(sum)([dask.delayed(operator.mul)(a, b) for a in base for b in base[:2]])
    assert total.compute(scheduler=client.get) == sum(a * b for a in range(1, 11) for b in (1, 2))
    places = dask.compute(*[dask.delayed(where_am_i)(i) for i in range(20)], scheduler=client.get)
    assert set(places) <= set(client.nthreads()) and len(places) == 20  # spread: see below


#: addresses of the workers that started a `held_where` task (in-process workers only)
_STARTED: list[str] = []


def held_where(gate: Gate, i: int) -> str:
    """Note where this runs, then hold the worker's only thread until ``gate`` opens."""
    address = get_worker().address
    _STARTED.append(address)
    gate(i)
    return address


def test_delayed_spread_over_the_workers(client: shoal.Client, gate: Gate) -> None:
    # Each task holds its worker's single thread until the gate opens, so a second task can
    # start only on the other worker: the graph is spread, whatever the timing.
    _STARTED.clear()
    futures = client.compute([dask.delayed(held_where)(gate, i) for i in range(6)])
    wait_until(lambda: len(set(_STARTED)) >= 2, timeout=10,
               message="tasks of one graph run on both workers at once")  # fmt: skip
    gate.open()
    places = client.gather(futures)
    assert len(places) == 6 and set(places) == set(client.nthreads())


def test_task_errors_keep_their_type(client: shoal.Client) -> None:
    with pytest.raises(ValueError, match="boom 3"):
        dask.delayed(boom)(3).compute(scheduler=client.get)


def test_get_with_legacy_graphs_and_nested_keys(client: shoal.Client) -> None:
    dsk = {"x": 1, "y": (operator.add, "x", 10), ("z", 0): (operator.mul, "y", 2),
           "alias": ("z", 0)}  # fmt: skip
    assert client.get(dsk, "y") == 11
    assert client.get(dsk, ["y", [("z", 0), "x"]]) == [11, [22, 1]]
    assert client.get(dsk, "alias") == 22


def test_compute_returns_futures(client: shoal.Client) -> None:
    x = da.ones((100, 100), chunks=(10, 10))
    future = client.compute(x.sum())
    assert isinstance(future, shoal.Future)
    assert future.result(timeout=10) == 10_000
    futures = client.compute([x.sum(), 7, dask.delayed(operator.add)(1, 2)])
    assert isinstance(futures[0], shoal.Future) and futures[1] == 7
    assert client.gather(futures) == [10_000, 7, 3]
    assert client.compute([x.max(), x.min()], sync=True) == [1, 1]
    array_future = client.compute(x + 1)
    np.testing.assert_array_equal(array_future.result(timeout=10), np.full((100, 100), 2.0))


def test_persist_keeps_chunks_on_the_workers(client: shoal.Client, tally: Any) -> None:
    x = da.random.random((400, 400), chunks=(50, 50))  # 64 chunks
    xp = client.persist(x)
    futures = list(dict(xp.__dask_graph__()).values())
    assert len(futures) == 64 and all(isinstance(f, shoal.Future) for f in futures)
    shoal.wait(futures, timeout=10)
    holders = {w for ws in client.who_has(futures).values() for w in ws}
    assert len(holders) == 2, "the chunks are spread over both workers"
    assert xp.sum().compute(scheduler=client.get) == pytest.approx(x.sum().compute(scheduler="sync"))

    # Work built on a persisted collection does not recompute it.
    counted = dask.delayed(tally.record)(5)
    persisted = client.persist(counted)
    for _ in range(3):
        assert (persisted + 1).compute(scheduler=client.get) == 6
    assert tally.count() == 1


def test_persist_of_a_dataframe_and_a_bag(client: shoal.Client) -> None:
    pdf = pd.DataFrame({"k": np.arange(100) % 5, "x": np.arange(100.0)})
    # (One collection kind per call: dask warns about mixing expression-backed collections
    # with graph-backed ones such as bags in one computation.)
    [dfp] = client.persist([dd.from_pandas(pdf, npartitions=10)])
    bp = client.persist(db.from_sequence(range(50), npartitions=5))
    got = dfp.groupby("k").x.sum().compute(scheduler=client.get)
    pd.testing.assert_series_equal(got.sort_index(), pdf.groupby("k").x.sum())
    assert bp.sum().compute(scheduler=client.get) == sum(range(50))


def test_as_dask_scheduler(client: shoal.Client) -> None:
    previous = dask.config.get("scheduler", None)
    with client.as_dask_scheduler() as c:
        assert c is client
        assert dask.delayed(where_am_i)().compute() in client.nthreads()
        (xp,) = dask.persist(da.ones(10, chunks=5))
        assert all(isinstance(v, shoal.Future) for v in dict(xp.__dask_graph__()).values())
        assert xp.sum().compute() == 10
    assert dask.config.get("scheduler", None) is previous


def test_as_dask_scheduler_steps_aside_once_the_client_closes() -> None:
    with dask.config.set(scheduler="sync"):
        with gen_cluster(n_workers=1) as client:
            setting = client.as_dask_scheduler()
            assert dask.delayed(where_am_i)().compute() in client.nthreads()
        # Closed: the next computation restores "sync" and runs there.
        assert dask.delayed(operator.add)(1, 2).compute() == 3
        assert dask.config.get("scheduler") == "sync"
        assert "restored" in repr(setting)


def test_annotations_and_options_become_task_options(client: shoal.Client,
                                                    submitted: list[list[TaskSpec]]) -> None:  # fmt: skip
    with dask.annotate(retries=2):
        a = dask.delayed(operator.add)(1, 2)
    b = dask.delayed(operator.mul)(a, 10)
    assert client.compute(b, priority=5).result(timeout=10) == 30
    (specs,) = submitted
    by_group = {s.key.split("-")[0]: s for s in specs}
    assert by_group["add"].retries == 2 and by_group["mul"].retries == 0
    assert all(s.priority == 5 for s in specs)


def test_intermediate_results_are_released(client: shoal.Client) -> None:
    x = da.random.random((400, 400), chunks=(100, 100))
    assert x.mean().compute(scheduler=client.get) > 0
    wait_until(lambda: not client.who_has(), timeout=10, message="the cluster holds nothing")


def test_asynchronous_client() -> None:
    async def main() -> None:
        async with shoal.Client(asynchronous=True, processes=False, n_workers=1) as client:
            x = da.arange(100, chunks=10)
            assert await client.compute(x.sum()) == sum(range(100))
            assert await client.get({"a": 1, "b": (operator.add, "a", 1)}, ["b"]) == [2]
            with pytest.raises(RuntimeError, match="asynchronous"):
                client.as_dask_scheduler()

    asyncio.run(main())


def test_a_graph_naming_an_unknown_key_fails_instead_of_hanging(client: shoal.Client) -> None:
    from dask._task_spec import Alias, Task, TaskRef

    with pytest.raises(shoal.FutureLostError, match="not known"):
        client.get({"a": Alias("a", "never-submitted")}, "a")
    with pytest.raises(Exception, match="unknown key"):
        client.get({"b": Task("b", operator.add, TaskRef("never-submitted"), 1)}, "b")


# ------------------------------------------------------------- dask's scheduler protocol


def test_get_ignores_keywords_meant_for_other_schedulers(client: shoal.Client) -> None:
    x = da.ones(10, chunks=5)
    # dask passes every keyword of compute/persist on to the scheduler, which takes the
    # ones it knows (shoal: the task options) and ignores the rest, as dask's own do.
    assert dask.compute(x.sum(), scheduler=client.get, any_kwarg=1, num_workers=3,
                        pool=None, cache=None)[0] == 10  # fmt: skip
    assert x.sum().compute(scheduler=client, any_kwarg=1) == 10
    (xp,) = dask.persist(x, scheduler=client, any_kwarg=1)
    assert xp.sum().compute(scheduler=client.get) == 10
    with client.as_dask_scheduler():
        assert x.sum().compute(any_kwarg=1) == 10
        (xp,) = dask.persist(x, any_kwarg=1)
        assert xp.sum().compute() == 10
    # The keywords shoal knows still apply.
    first = min(client.nthreads())
    places = dask.compute(*[dask.delayed(where_am_i)(i) for i in range(4)],
                          scheduler=client.get, workers=[first], any_kwarg=1)  # fmt: skip
    assert set(places) == {first}


# ------------------------------------------------------------- warnings of every task


def _recorded(fn: Any) -> list[str]:
    """The messages of the warnings ``fn()`` lets reach this thread's caller, sorted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return sorted(str(w.message) for w in caught if issubclass(w.category, UserWarning))


def _warning_graph(pure: bool = True) -> Any:
    """A diamond whose tasks warn: a -> (b, c) -> d, plus two leaves e, f summed into d.
    (``pure=False``: keys of its own, so no earlier hold of the same keys, whose warnings
    were shown already, is reused.)"""
    def warn(value: Any, message: str) -> Any:
        warnings.warn(message, UserWarning, stacklevel=1)
        return value

    delayed = dask.delayed(pure=pure)
    a = delayed(warn)(1, "a warned")
    b = delayed(warn)(delayed(operator.add)(a, 1), "b warned")
    c = delayed(warn)(delayed(operator.mul)(a, 2), "c warned")
    leaves = [delayed(warn)(i, f"leaf {i} warned") for i in range(2)]
    return delayed(sum)([b, c, *leaves])


def test_warnings_of_intermediate_tasks_reach_the_caller(process_client: shoal.Client) -> None:
    # Worker processes: the warnings cannot reach this process but through shoal.
    total = _warning_graph()
    expected = _recorded(lambda: total.compute(scheduler="sync"))
    assert expected == ["a warned", "b warned", "c warned", "leaf 0 warned", "leaf 1 warned"]
    assert _recorded(lambda: total.compute(scheduler=process_client.get)) == expected
    assert _recorded(lambda: dask.compute(total, total + 1, scheduler=process_client)) == expected
    future = process_client.compute(_warning_graph(pure=False))
    assert _recorded(lambda: future.result(timeout=30)) == expected
    # Values are plain values, whether or not their inputs warned.
    values: list[Any] = []
    _recorded(lambda: values.append(process_client.compute(total, sync=True)))
    (persisted,) = process_client.persist([total])
    _recorded(lambda: values.append(persisted.compute(scheduler=process_client.get)))
    assert values == [5, 5]


# ------------------------------------------------------------- fusion of linear chains


def _inc(x: int) -> int:
    return x + 1


def _frame(i: int) -> Any:
    return pd.DataFrame({"a": [i, i + 1], "b": [str(i)] * 2})


def _graph_shapes() -> dict[str, tuple[dict[Any, Any], Any]]:
    from dask._task_spec import Alias, DataNode, List, Task, TaskRef

    return {
        "chain": ({"a": 1, "b": (_inc, "a"), "c": (_inc, "b"), "d": (_inc, "c")}, "d"),
        "chain through aliases": (
            {"a": 1, "b": (_inc, "a"), "c": "b", "d": "c", "e": (_inc, "d")}, "e"),
        "a wanted key inside a chain": (
            {"a": 1, "b": (_inc, "a"), "c": (_inc, "b"), "d": (_inc, "c")}, ["d", "b"]),
        "a wanted alias inside a chain": (
            {"a": 1, "b": (_inc, "a"), "c": "b", "d": (_inc, "c")}, ["d", "c"]),
        "diamond": ({"a": 1, "b": (_inc, "a"), "c": (_inc, "a"), "d": (operator.add, "b", "c"),
                     "e": (_inc, "d")}, "e"),
        "triangle": ({"a": 1, "b": (_inc, "a"), "c": (_inc, "b"), "d": (operator.add, "a", "c")},
                     "d"),
        "fan out into chains": (
            {"a": 1, **{f"b{i}": (_inc, "a") for i in range(3)},
             **{f"c{i}": (_inc, f"b{i}") for i in range(3)},
             "d": (sum, [f"c{i}" for i in range(3)])}, "d"),
        "two chains into one": (
            {"x": 1, "y": 2, "x1": (_inc, "x"), "y1": (_inc, "y"), "x2": "x1", "y2": "y1",
             "z": (operator.mul, "x2", "y2")}, ["z", "x1"]),
        # Nodes stored under another key than their own, as dask.dataframe's from_delayed
        # makes them: the graph's key is the one that counts.
        "nodes under other keys": (
            {"t0": Task("t0", _inc, 1), "t1": Task("t1", _inc, 2),
             "c0": Alias("t0"), "c1": Alias("t1"),
             "f0": Alias("c0"), "f1": Alias("c1"),
             "s": Task("s", operator.add, TaskRef("f0"), TaskRef("f1"))}, "s"),
        "a container node without a key": (
            {"a": DataNode("a", 1), "b": Task("b", _inc, TaskRef("a")),
             "c": List(TaskRef("b"), TaskRef("a"))}, "c"),
        "a task under another key": (
            {"d": DataNode("d", 5), "x": Task("other", _inc, TaskRef("d")),
             "y": Task("y", _inc, TaskRef("x"))}, "y"),
    }


@pytest.mark.parametrize("shape", list(_graph_shapes()))
def test_graph_shapes_compute_as_with_dask(client: shoal.Client, shape: str) -> None:
    dsk, keys = _graph_shapes()[shape]
    expected = dask.get(dsk, keys)  # dask's synchronous scheduler (a tuple for a list)
    got = client.get(dsk, keys)  # (a list for a list, as dask.distributed's)
    assert (list(got) if isinstance(keys, list) else got) == (
        list(expected) if isinstance(keys, list) else expected)


def test_dataframe_from_delayed_frames(client: shoal.Client) -> None:
    parts = [dask.delayed(_frame)(0), dask.delayed(_frame)(10)]
    with dask.config.set(scheduler="sync"):  # it computes its meta from the first part
        df = dd.from_delayed(parts, verify_meta=False)
    expected = df.compute(scheduler="sync")
    pd.testing.assert_frame_equal(df.compute(scheduler=client.get), expected)
    pd.testing.assert_frame_equal(client.compute(df, sync=True), expected)
    assert df.a.sum().compute(scheduler=client.get) == expected.a.sum()
    typed = dd.from_delayed(parts, meta=_frame(0).iloc[:0])
    pd.testing.assert_frame_equal(typed.compute(scheduler=client.get),
                                  typed.compute(scheduler="sync"))  # fmt: skip


def test_collections_with_chains_compute_as_with_dask(client: shoal.Client) -> None:
    x = da.arange(40, chunks=8)
    y = ((x + 1) * 2 - 3)[::2].rechunk(5) ** 2
    np.testing.assert_array_equal(y.compute(scheduler=client.get), y.compute(scheduler="sync"))
    b = db.from_sequence(range(30), npartitions=4).map(_inc).filter(lambda v: v % 2).map(str)
    assert b.compute(scheduler=client.get) == b.compute(scheduler="sync")
    chain = dask.delayed(_inc)(0)
    for _ in range(20):
        chain = dask.delayed(_inc)(chain)
    assert chain.compute(scheduler=client.get) == 21
