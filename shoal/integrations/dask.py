"""A shoal client as a dask scheduler: dask.array, dask.dataframe, dask.bag and dask.delayed
run on the cluster.

    dask.compute(x, scheduler=client.get)      # or scheduler=client
    client.get(dsk, keys)                      # a dask graph (dict or expression)
    client.compute(x) -> Future                # results stay on the cluster
    client.persist(x) -> collection            # chunks stay on workers, held as futures
    with client.as_dask_scheduler(): x.compute()

How a graph runs: the collection's expression is optimized on the client, as dask does, and
materialized into dask task specs (`dask._task_spec`: `Task`, `Alias`, `DataNode`...). Each
task becomes one shoal task whose function calls the dask node with its dependencies'
values; the dependencies are the shoal task's dependencies, so the scheduler places work
near its inputs and data moves worker to worker. The whole graph goes to the scheduler in
one `SubmitTasks` batch, in `dask.order` order (the tie-break among ready tasks), and only
the requested keys are wanted: intermediate results are released as soon as their
dependents have run. Linear chains (each task feeding only the next) are fused into one
task first (`dask._task_spec.fuse_linear_task_spec`, as dask.array and dask.bag do): a
chain has no parallelism to lose, and each task saved is a round trip through the scheduler.

Keys: a dask key (a string, or a tuple like ``('x-<token>', 0, 1)``) names a shoal key
`shoal_key(key)`: a string stays as it is, anything else becomes its ``repr`` (the same in
every process, so the same dask computation submitted twice runs once). An `Alias` is not a
task: it names its target's shoal key. A persisted collection's chunks are shoal futures in
its graph; a task that uses them depends on those futures' keys directly.

Shuffles: without a dask.distributed client, dask shuffles dataframes through files in a
local temporary directory (its "disk" method), which only works where every worker sees
the same disk. `compute`, `persist` and `as_dask_scheduler` therefore build graphs with the
"tasks" method (data moves as task results) unless ``dataframe.shuffle.method`` is set.
``dask.compute(x, scheduler=client.get)`` optimizes the graph before shoal sees it, so it
keeps dask's choice: a disk shuffle runs when all workers are on one host, and is refused
with an explanation otherwise.

Per-key ``dask.annotate`` values for ``priority``, ``retries``, ``resources``, ``workers``
and ``allow_other_workers`` become the task's options; keyword arguments to `get`,
`compute` and `persist` apply to every task of the graph (`get` and `persist`, which dask
calls with every keyword the user gave it, ignore the ones that are not task options).

Warnings: as with dask's local schedulers, a warning raised by any task of a graph reaches
the caller (when the results are read), not only those of the tasks whose results are
returned, and each once. A worker captures a task's warnings; the scheduler sends those of
the requested keys to the client with their results, and those of an intermediate task ride
with its value: an intermediate task that warned returns its value wrapped with the
warnings (`_Warned`; only `run_dask_node` sees it: it unwraps its inputs). Of the tasks
that use an intermediate result, one, chosen when the graph is submitted, takes those
warnings as its own, so they travel one path to one requested key and cost no round trip.
(A key that one graph computes as an intermediate and another requests at the same time
holds the wrapped value: a corner that deterministic keys make possible.)
"""

from __future__ import annotations

import pickle
import weakref
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import dask
import dask.config
from dask._task_spec import (
    Alias,
    DataNode,
    GraphNode,
    Task,
    convert_legacy_graph,
    fuse_linear_task_spec,
)
from dask.base import collections_to_expr, is_dask_collection
from dask.core import flatten

from ..client.annotate import TASK_OPTIONS, resolve_options
from ..client.future import Future
from ..protocol.messages import TaskSpec
from ..protocol.refs import collected_keys, collecting, resolve_ref
from ..protocol.serialize import MIN_OOB_BYTES, Serialized, dumps_function, serialize

if TYPE_CHECKING:
    from ..client.client import Client

__all__ = ["DaskScheduler", "compute", "get", "persist", "shoal_key", "submit_graph"]

Key = Any  # a dask key: str, bytes, int, float, or a tuple of those


def shoal_key(key: Key) -> str:
    """The shoal key that names dask key ``key`` (deterministic across processes)."""
    return key if isinstance(key, str) else repr(key)


# ------------------------------------------------------------- running a node


def run_dask_node(node: GraphNode, values: dict[Key, Any], inherit: tuple[Key, ...] = (),
                  forward: bool = False) -> Any:  # fmt: skip
    """A shoal task's function: run one dask node; ``values`` maps each dask key the node
    depends on to its value (each arrived on this worker as a shoal dependency).

    Warnings (see "Warnings" in the module docstring): the warnings that the inputs named in
    ``inherit`` carry become this task's own, as if it had raised them; with ``forward`` (an
    intermediate task) the value leaves wrapped with all of them when there are any."""
    records = _task_warnings()
    if any(isinstance(v, _Warned) for v in values.values()):
        unwrapped: dict[Key, Any] = {}
        for dep, value in values.items():
            if isinstance(value, _Warned):
                if dep in inherit and records is not None:
                    records.extend(value.records)
                value = value.value
            unwrapped[dep] = value
        values = unwrapped
    result = node(values)
    if forward and records:
        return _Warned(result, list(records))
    return result


def _task_warnings() -> list[tuple[Any, ...]] | None:
    """The warnings the running task has raised so far (a list it appends to), or None
    outside a worker's task. (The worker captures them per thread, see worker/execution.)"""
    from ..worker import execution

    records: list[tuple[Any, ...]] | None = getattr(execution._capture, "records", None)
    return records


class _Warned:
    """An intermediate task's value with the warnings it raised and inherited, on their way
    to the one dependent that reports them (see the module docstring). Only the tasks of
    this module see one: they unwrap their inputs."""

    __slots__ = ("records", "value")

    def __init__(self, value: Any, records: list[tuple[Any, ...]]) -> None:
        self.value = value
        #: (category, message, filename, lineno), as the worker captures them
        self.records = records

    @property
    def nbytes(self) -> int:
        """The value's size, for the worker's memory accounting."""
        from ..worker.execution import sizeof

        return sizeof(self.value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Warned, (self.value, self.records))


_FUNCTION: bytes | None = None


def _function() -> bytes:
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = dumps_function(run_dask_node)
    return _FUNCTION


class _Ref:
    """Pickles as a reference to shoal key ``key``: the worker puts the key's value here,
    and pickling it while a task's arguments are packed records the key as a dependency."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        keys = collected_keys()
        if keys is not None:
            keys.append(self.key)
        return (resolve_ref, (self.key,))


def _pack(obj: Any) -> Serialized:
    """`serialize`, faster for what the standard pickler carries as cloudpickle would.

    dask's task nodes refer to functions by module and name, which the C pickler writes
    about three times as fast. Anything it cannot pickle (lambdas, local functions), or
    would pickle by reference to ``__main__`` (which workers do not have), or any use of
    ``cloudpickle.register_pickle_by_value``, goes through cloudpickle as usual."""
    import cloudpickle

    if not getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", True):
        buffers: list[pickle.PickleBuffer] = []

        def keep_large(buf: pickle.PickleBuffer) -> bool:
            if buf.raw().nbytes < MIN_OOB_BYTES:
                return True
            buffers.append(buf)
            return False

        try:
            header = pickle.dumps(obj, protocol=5, buffer_callback=keep_large)
        except Exception:  # noqa: BLE001 - cloudpickle below says what went wrong, if anything
            pass
        else:
            if b"__main__" not in header:
                return Serialized([header, *(b.raw() for b in buffers)])
    return serialize(obj, "dask task")


def _spec(key: str, function: bytes, args: tuple[Any, ...],
          options: dict[str, Any]) -> TaskSpec:  # fmt: skip
    """A task's spec, as `Client.submit` makes it (options resolved already)."""
    with collecting() as deps:
        packed = _pack((args, {}))
    workers = options.get("workers")
    resources = options.get("resources")
    return TaskSpec(
        key, function, packed, tuple(dict.fromkeys(deps)),
        priority=int(options.get("priority") or 0),
        retries=int(options.get("retries") or 0),
        resources={k: float(v) for k, v in resources.items()} if resources else None,
        workers=[workers] if isinstance(workers, str) else list(workers) if workers else None,
        allow_other_workers=bool(options.get("allow_other_workers", False)),
        retry_delay=float(options.get("retry_delay", 0.1)),
    )  # fmt: skip


# ------------------------------------------------------------- graphs -> specs


def materialize(dsk: Any) -> tuple[dict[Key, GraphNode], dict[str, dict[Key, Any]]]:
    """A dask graph as ``{key: GraphNode}`` plus its per-key annotations, from an expression,
    a HighLevelGraph or a (legacy or task-spec) dict."""
    annotations: dict[str, dict[Key, Any]] = {}
    if not isinstance(dsk, Mapping) and hasattr(dsk, "__dask_graph__"):
        get_annotations = getattr(dsk, "__dask_annotations__", None)
        if get_annotations is not None:
            annotations = dict(get_annotations())
        dsk = dsk.__dask_graph__()
    if not isinstance(dsk, dict):
        dsk = dict(dsk)  # a HighLevelGraph, or another mapping
    graph: dict[Key, GraphNode] = convert_legacy_graph(dsk)
    for key, node in graph.items():
        if node.key != key:
            graph[key] = _keyed(key, node)
    return graph, annotations


def _keyed(key: Key, node: GraphNode) -> GraphNode:
    """``node`` under graph key ``key``.

    A graph may store a node under another key than the node's own: dask.dataframe's
    ``from_delayed`` maps ``('fromdelayed-…', i)`` to ``Alias(('delayed-container-…', i))``.
    dask's schedulers go by the graph's keys, but `Task.fuse` (and so
    `fuse_linear_task_spec`) goes by the nodes' own: it found two nodes with one key in
    such a chain, no output, and failed ("pop from an empty set"). So the node takes its
    graph key here, before anything reads it."""
    if isinstance(node, Alias):
        return Alias(key, node.target)
    keyed = node.substitute({}, key=key)
    if keyed.key != key:  # e.g. a container node (`List`...), which keeps no key of its own
        keyed = Task(key, _identity, node)
    return keyed


def _identity(value: Any) -> Any:
    return value


def _cull(dsk: Mapping[Key, GraphNode], keys: list[Key]) -> dict[Key, GraphNode]:
    """The part of ``dsk`` the ``keys`` need (keys outside ``dsk`` are left out)."""
    out: dict[Key, GraphNode] = {}
    work = list(keys)
    while work:
        k = work.pop()
        if k in out or k not in dsk:
            continue
        node = out[k] = dsk[k]
        work.extend(node.dependencies)
    return out


class _Names:
    """Shoal keys for the dask keys of one graph: aliases and futures resolved."""

    def __init__(self, dsk: Mapping[Key, GraphNode]) -> None:
        self.dsk = dsk
        self.cache: dict[Key, str] = {}

    def __call__(self, key: Key) -> str:
        name = self.cache.get(key)
        if name is not None:
            return name
        seen = [key]
        node = self.dsk.get(key)
        while isinstance(node, Alias) and node.target not in seen:
            seen.append(node.target)
            node = self.dsk.get(node.target)
        last = seen[-1]
        if isinstance(node, DataNode) and isinstance(node.value, Future):
            name = node.value.key
        else:
            name = shoal_key(last)
        for k in seen:
            self.cache[k] = name
        return name


def _is_task(node: GraphNode) -> bool:
    """Whether a node runs as a shoal task (aliases and held futures just name a key)."""
    return not isinstance(node, Alias) and not (
        isinstance(node, DataNode) and isinstance(node.value, Future))  # fmt: skip


def submit_graph(client: Client, dsk: Any, keys: list[Key],
                 **options: Any) -> dict[Key, Future]:  # fmt: skip
    """Submit the part of graph ``dsk`` that ``keys`` need, in one batch; a future per key.

    ``options`` (``priority``, ``retries``, ``retry_delay``, ``resources``, ``workers``,
    ``allow_other_workers``) apply to every task; per-key ``dask.annotate`` values win."""
    from dask.order import order

    graph, annotations = materialize(dsk)
    culled = _cull(graph, keys)
    _check_disk_shuffle(client, culled)
    per_key = {name: values for name, values in annotations.items() if name in TASK_OPTIONS}
    if len(culled) > 1:
        # A chain of tasks that each feed only the next one runs as one task: every task
        # costs a round trip through the scheduler, and a chain has no parallelism to lose.
        # Annotated tasks keep their own options: neither they nor their inputs are fused.
        annotated = {k for values in per_key.values() for k in values if k in culled}
        protected = set(keys) | annotated
        protected.update(d for k in annotated for d in culled[k].dependencies)
        culled = fuse_linear_task_spec(culled, protected)
    names = _Names(culled)
    base = resolve_options(options)
    try:
        priorities: Mapping[Key, int] = order(culled) if len(culled) > 1 else {}
    except Exception:  # noqa: BLE001 - ordering is an optimisation, never a failure
        priorities = {}
    tasks = [k for k, node in culled.items() if _is_task(node)]
    tasks.sort(key=lambda k: priorities.get(k, 0))
    wanted = list(dict.fromkeys(names(k) for k in keys))
    reported = set(wanted)  # tasks whose warnings reach the client with their own results
    heirs: set[str] = set()  # the intermediate tasks whose heir is chosen already
    function = _function()
    specs: list[TaskSpec] = []
    for k in tasks:
        node = culled[k]
        refs: dict[Key, _Ref] = {}
        inherit: list[Key] = []
        for dep in node.dependencies:
            name = names(dep)
            refs[dep] = _Ref(name)
            if name not in reported and name not in heirs:
                heirs.add(name)  # this task is the one to report on that input's warnings
                inherit.append(dep)
        task_options = base
        if per_key:
            extra = {name: values[k] for name, values in per_key.items() if k in values}
            if extra:
                task_options = {**base, **_checked(extra)}
        name = names(k)
        args = (node, refs, tuple(inherit), name not in reported)
        specs.append(_spec(name, function, args, task_options))
    futures = dict(zip(wanted, client._submit_specs(specs, wanted)))
    made = {spec.key for spec in specs}
    held = [futures[name] for name in wanted if name not in made]
    if held:  # keys this graph only names (held futures): an unknown one errs, never hangs
        client.want(held)
    return {k: futures[names(k)] for k in keys}


def _checked(extra: dict[str, Any]) -> dict[str, Any]:
    """Annotation values as task options (a numeric priority may be a float in dask)."""
    if "priority" in extra:
        extra["priority"] = int(extra["priority"])
    if "workers" in extra and isinstance(extra["workers"], (set, frozenset, tuple)):
        extra["workers"] = list(extra["workers"])
    return resolve_options(extra)


# ------------------------------------------------------------- shuffles

SHUFFLE_METHOD = "dataframe.shuffle.method"


def _cluster_shuffles() -> AbstractContextManager[Any]:
    """Within this block dask builds shuffles that move data as task results ("tasks"),
    unless the user chose a method."""
    if dask.config.get(SHUFFLE_METHOD, None):
        return nullcontext()
    setting: AbstractContextManager[Any] = dask.config.set({SHUFFLE_METHOD: "tasks"})
    return setting


def _check_disk_shuffle(client: Client, graph: Mapping[Key, GraphNode]) -> None:
    """Refuse a disk shuffle (files in a local temporary directory) on workers of several
    hosts: they would not see each other's files."""
    if not any(type(getattr(node, "func", None)).__name__ == "maybe_buffered_partd"
               for node in graph.values()):  # fmt: skip
        return
    hosts = {_host(address) for address in client.nthreads()}
    if len(hosts) > 1:
        raise RuntimeError(
            "this dask graph shuffles data through a local temporary directory (dask's 'disk'"
            f" shuffle), but the workers are on {len(hosts)} hosts. Compute it with"
            " client.compute(x) or inside `with client.as_dask_scheduler():`, or set"
            f" dask.config.set({{{SHUFFLE_METHOD!r}: 'tasks'}}) before building it")


def _host(address: str) -> str:
    return address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


# ------------------------------------------------------------- the client's API


def get(client: Client, dsk: Any, keys: Any, **options: Any) -> Any:
    """Run graph ``dsk`` and return the values of ``keys`` (a key, or nested lists of keys,
    answered in the same shape). dask's scheduler interface: ``scheduler=client.get``.
    With an asynchronous client, a coroutine to await.

    dask passes every keyword of ``dask.compute(..., scheduler=client.get, **kwargs)`` on to
    here; like dask's own schedulers, this takes the ones it knows (the task options
    ``priority``, ``retries``, ``retry_delay``, ``resources``, ``workers``,
    ``allow_other_workers``) and ignores the others (``num_workers``, ``pool``...)."""
    flat = list(flatten(keys)) if isinstance(keys, list) else [keys]
    futures = submit_graph(client, dsk, flat, **_known_options(options))
    ordered = [futures[k] for k in flat]
    if client.asynchronous:
        async def gather() -> Any:
            values = await client.gather(ordered)
            return _repack(keys, dict(zip(flat, map(_unwrapped, values))))

        return gather()
    values = [_unwrapped(v) for v in client.gather(ordered)]
    del ordered, futures  # release the results on the cluster before returning them
    return _repack(keys, dict(zip(flat, values)))


def _unwrapped(value: Any) -> Any:
    """A requested key's value (wrapped only if another graph computed it as an
    intermediate at the same time; see "Warnings" in the module docstring)."""
    return value.value if isinstance(value, _Warned) else value


def _known_options(options: dict[str, Any]) -> dict[str, Any]:
    """The task options among keywords dask passed on (it passes every keyword it got)."""
    return {name: value for name, value in options.items() if name in TASK_OPTIONS}


def _repack(keys: Any, values: dict[Key, Any]) -> Any:
    if isinstance(keys, list):
        return [_repack(k, values) for k in keys]
    return values[keys]


def compute(client: Client, collections: Any, *, sync: bool = False,
            optimize_graph: bool = True, traverse: bool = True, **options: Any) -> Any:  # fmt: skip
    """Start computing dask collections; a `Future` for each (its result is the computed
    value), or the values themselves with ``sync=True``. A single collection gives a single
    future; other arguments in a list are passed through as they are."""
    from dask._expr import FinalizeCompute

    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    if traverse:
        items = [dask.delayed(a) if isinstance(a, (list, set, tuple, dict, Iterator))
                 and not is_dask_collection(a) and _contains_collection(a) else a
                 for a in items]  # fmt: skip
    variables = [a for a in items if is_dask_collection(a)]
    by_position: list[Any] = []
    if variables:
        with _cluster_shuffles():
            expr = FinalizeCompute(collections_to_expr(variables, optimize_graph)).optimize()
        names = list(flatten(expr.__dask_keys__()))
        futures = submit_graph(client, expr, names, **options)
        by_position = [futures[name] for name in names]
    out: list[Any] = []
    position = iter(by_position)
    for a in items:
        out.append(next(position) if is_dask_collection(a) else a)
    result: Any = client.gather(out) if sync else out
    return result[0] if singleton else result


def _contains_collection(obj: Any) -> bool:
    if is_dask_collection(obj):
        return True
    if isinstance(obj, dict):
        return any(_contains_collection(v) for v in obj.values())
    if isinstance(obj, (list, set, tuple)):
        return any(_contains_collection(v) for v in obj)
    return False


def persist(client: Client, collections: Any, *, optimize_graph: bool = True,
            **options: Any) -> Any:  # fmt: skip
    """Start computing dask collections and return equivalent collections backed by the
    results held on the workers (each chunk a shoal future), to build further work on.

    ``dask.persist(..., scheduler=client)`` calls this with every keyword it got: as `get`,
    it takes the task options and ignores the others."""
    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    if not all(is_dask_collection(c) for c in items):
        raise TypeError("persist expects dask collections")
    with _cluster_shuffles():
        expr = collections_to_expr(items, optimize_graph).optimize()
    keys = expr.__dask_keys__()
    futures = submit_graph(client, expr, list(flatten(keys)), **_known_options(options))
    result = []
    for collection, ks in zip(items, keys):
        rebuild, args = collection.__dask_postpersist__()
        result.append(rebuild({k: futures[k] for k in flatten(ks)}, *args))
    return result[0] if singleton else result


# ------------------------------------------------------------- the default scheduler


class DaskScheduler:
    """Makes a client dask's default scheduler (``dask.config`` ``scheduler``, and the
    "tasks" shuffle method unless one is set) from its creation until `restore` (or the end
    of a ``with`` block). Returned by ``client.as_dask_scheduler()``.

    It holds the client weakly and only while the client is open: once the client is closed,
    the first computation that reaches it restores the previous setting and runs there (dask's
    own default if there was none), so a closed client never breaks later dask code.
    """

    def __init__(self, client: Client) -> None:
        if client.asynchronous:
            raise RuntimeError("an asynchronous client cannot be dask's default scheduler"
                               " (dask.compute blocks): use `await client.compute(x)`")  # fmt: skip
        self._client = weakref.ref(client)
        self._previous = dask.config.get("scheduler", None)
        settings: dict[str, Any] = {"scheduler": self}
        if not dask.config.get(SHUFFLE_METHOD, None):
            settings[SHUFFLE_METHOD] = "tasks"  # see the module docstring
        self._setting: Any = dask.config.set(settings)
        self._active = True

    @property
    def client(self) -> Client | None:
        client = self._client()
        return client if client is not None and client.status == "running" else None

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        client = self.client
        if client is not None:
            return client.get(dsk, keys, **kwargs)
        self.restore()
        from dask.base import get_scheduler

        schedule = get_scheduler(scheduler=self._previous) if self._previous else None
        if schedule is None:
            from dask.threaded import get as threaded_get

            schedule = threaded_get
        return schedule(dsk, keys, **kwargs)

    def persist(self, collections: Any, optimize_graph: bool = True, **kwargs: Any) -> Any:
        """Called by ``dask.persist`` (it looks for a ``persist`` on the scheduler)."""
        client = self.client
        if client is not None:
            return client.persist(collections, optimize_graph=optimize_graph, **kwargs)
        self.restore()
        singleton = not isinstance(collections, (list, tuple, set, frozenset))
        items = [collections] if singleton else list(collections)
        persisted = dask.persist(*items, optimize_graph=optimize_graph, **kwargs)
        return persisted[0] if singleton else list(persisted)

    def restore(self) -> None:
        """Put dask's previous default scheduler back (once; later calls do nothing)."""
        if self._active:
            self._active = False
            self._setting.__exit__(None, None, None)

    def __enter__(self) -> Client:
        client = self.client
        if client is None:
            raise RuntimeError("the client is closed")
        return client

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        client = self._client()
        state = "active" if self._active else "restored"
        return f"<DaskScheduler {client!r} {state}>"
