"""joblib on a shoal cluster: the ``"shoal"`` parallel backend.

    import shoal.integrations.joblib  # registers the backend (joblib has no plugin hook)

    with shoal.Client() as client, joblib.parallel_backend("shoal"):
        joblib.Parallel()(joblib.delayed(f)(x) for x in xs)
        GridSearchCV(model, grid, n_jobs=-1).fit(X, y)    # scikit-learn fans out too

Each batch of calls joblib dispatches is one shoal task (joblib sizes the batches so each
takes 0.2 s to 1 s). ``n_jobs=-1`` (or None) means every thread of the cluster; a positive
``n_jobs`` caps how many batches joblib keeps in flight.

Large arguments are sent once: within one ``Parallel`` call, an argument (positional or
keyword, of any call) of ``scatter_threshold`` bytes or more (1 MB by default: NumPy arrays,
pandas frames...) is scattered to the cluster the first time it is seen, and every task that
gets the same object (by identity) depends on that one scattered copy, which workers fetch
from each other. ``scatter=[X, y]`` broadcasts data to every worker up front instead, for
the backend's lifetime.

The backend uses ``client`` if given, else the current client (inside a shoal task: its
worker's client). Nested ``Parallel`` calls inside tasks run one after the other unless they
ask for ``n_jobs`` explicitly, in which case they fan out over the cluster too (the waiting
task gives its thread back meanwhile, so nesting cannot deadlock the workers).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from joblib import parallel_config, register_parallel_backend
from joblib.parallel import AutoBatchingMixin, ParallelBackendBase

from ..client.annotate import check_options, resolve_options
from ..worker.execution import sizeof
from ..client.future import Future
from ..protocol.serialize import dumps_function
from ..worker.context import current_context, get_client, seceded

if TYPE_CHECKING:
    from ..client.client import Client

__all__ = ["ShoalBackend"]

#: arguments at least this large (bytes) are scattered once per Parallel call
SCATTER_THRESHOLD = 1_000_000


class _Batch:
    """What runs in one task: joblib's calls, under the nested backend joblib chose."""

    __slots__ = ("calls", "backend", "n_jobs")

    def __init__(self, calls: list[tuple[Callable[..., Any], list[Any], dict[str, Any]]],
                 backend: Any, n_jobs: int | None) -> None:  # fmt: skip
        self.calls = calls
        self.backend = backend
        self.n_jobs = n_jobs

    def __call__(self) -> list[Any]:
        config: AbstractContextManager[Any] = (
            parallel_config(backend=self.backend, n_jobs=self.n_jobs)
            if self.backend is not None else nullcontext())  # fmt: skip
        with config:
            return [fn(*args, **kwargs) for fn, args, kwargs in self.calls]


def run_batch(batch: _Batch) -> list[Any]:
    """The function of every joblib task (one pickled function for all of them)."""
    return batch()


_FUNCTION: bytes | None = None


def _function() -> bytes:
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = dumps_function(run_batch)
    return _FUNCTION


class ShoalBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``"shoal"`` backend; see the module docstring.

    ``client``: the client to use (default: the current one, looked up when first needed).
    ``scatter``: objects to broadcast to every worker up front. ``scatter_threshold``: the
    size from which arguments are scattered once per call (None: never). ``pure`` and the
    other ``submit_options`` (``priority``, ``retries``, ``resources``, ``workers``...) apply
    to every task.
    """

    MIN_IDEAL_BATCH_DURATION = 0.2
    MAX_IDEAL_BATCH_DURATION = 1.0
    supports_retrieve_callback = True
    default_n_jobs = -1

    def __init__(self, client: Client | None = None, scatter: list[Any] | None = None,
                 scatter_threshold: int | None = SCATTER_THRESHOLD,
                 wait_for_workers_timeout: float = 10.0, nesting_level: int | None = None,
                 **submit_options: Any) -> None:  # fmt: skip
        super().__init__(nesting_level=nesting_level)
        if client is not None and client.asynchronous:
            raise ValueError("joblib needs a synchronous shoal client")
        self._client = client
        self._pure = bool(submit_options.pop("pure", False))
        check_options(submit_options)
        self._submit_options = submit_options
        if scatter is not None and not isinstance(scatter, (list, tuple)):
            raise TypeError(f"scatter must be a list or tuple, got {type(scatter).__name__}")
        self._scatter = list(scatter or ())
        #: id(obj) -> future for ``scatter`` (filled on first use; the list keeps ids valid)
        self._broadcast: dict[int, Future] | None = None
        self.scatter_threshold = scatter_threshold
        self.wait_for_workers_timeout = wait_for_workers_timeout
        #: id(obj) -> (obj, future) scattered during the current Parallel call
        self._call_data: dict[int, tuple[Any, Future]] = {}
        self._outstanding: set[Future] = set()
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        # Nested backends travel inside tasks: on the worker they use the worker's client.
        return (_nested_backend, (self.scatter_threshold, self._pure, self._submit_options))

    @property
    def client(self) -> Client:
        if self._client is None or self._client.status != "running":
            client = get_client()
            if client.asynchronous:
                raise ValueError("joblib needs a synchronous shoal client")
            self._client = client
        return self._client

    # ---------------------------------------------------------------- joblib's API

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is not None and n_jobs > 0:
            return n_jobs
        total = self._cluster_threads()
        return max(total + 1 + n_jobs, 1) if n_jobs is not None and n_jobs < -1 else total

    def _cluster_threads(self) -> int:
        client = self.client
        total = int(sum(client.nthreads().values()))
        if total == 0 and self.wait_for_workers_timeout:
            try:
                client.wait_for_workers(1, timeout=self.wait_for_workers_timeout)
            except TimeoutError as exc:
                raise TimeoutError(f"the shoal cluster at {client.scheduler_address} has no"
                                   f" workers after {self.wait_for_workers_timeout}s") from exc  # fmt: skip
            total = int(sum(client.nthreads().values()))
        return max(total, 1)

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, prefer: Any = None,
                  require: Any = None, **backend_args: Any) -> int:  # fmt: skip
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def start_call(self) -> None:
        self._call_data = {}

    def stop_call(self) -> None:
        self._call_data = {}  # the scattered arguments of this call are released

    def get_nested_backend(self) -> tuple[ShoalBackend, None]:
        # n_jobs=None: a nested Parallel runs its calls one by one unless it asks for n_jobs.
        nested = ShoalBackend(scatter_threshold=self.scatter_threshold, pure=self._pure,
                              **self._submit_options)  # fmt: skip
        nested.nesting_level = (self.nesting_level or 0) + 1
        return nested, None

    def submit(self, func: Any, callback: Callable[[Any], Any] | None = None) -> Future:
        client = self.client
        items = getattr(func, "items", None)
        if items is not None:
            calls = [(fn, [self._maybe_scatter(a) for a in args],
                      {k: self._maybe_scatter(v) for k, v in kwargs.items()})
                     for fn, args, kwargs in items]  # fmt: skip
            batch = _Batch(calls, getattr(func, "_backend", None), getattr(func, "_n_jobs", None))
            name = _funcname(calls[0][0]) if calls else "empty"
        else:
            batch = _Batch([(func, [], {})], None, None)
            name = _funcname(func)
        options = resolve_options(dict(self._submit_options))
        key = f"joblib-{name}-{uuid.uuid4().hex}"
        spec = client._make_spec(run_batch, _function(), (batch,), {}, key, self._pure, options)
        [future] = client._submit_specs([spec], [spec.key])
        with self._lock:
            self._outstanding.add(future)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out: Future) -> Any:
        """The batch's results (or its exception, raised), fetched in the callback thread;
        the cluster's copy is released once they are here."""
        with self._lock:
            self._outstanding.discard(out)
        try:
            return out.result()
        finally:
            out.release()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        with self._lock:
            outstanding, self._outstanding = list(self._outstanding), set()
        if outstanding and self._client is not None and self._client.status == "running":
            self._client.cancel(outstanding)

    def retrieval_context(self) -> AbstractContextManager[None]:
        # Inside a task (a nested Parallel), give the thread back while joblib waits.
        return seceded() if current_context() is not None else nullcontext()

    # ------------------------------------------------------------ large arguments

    def _maybe_scatter(self, value: Any) -> Any:
        if self._scatter:
            if self._broadcast is None:
                futures = self.client.scatter(self._scatter, broadcast=True, hash=False)
                self._broadcast = {id(x): f for x, f in zip(self._scatter, futures)}
            future = self._broadcast.get(id(value))
            if future is not None:
                return future
        if self.scatter_threshold is None or isinstance(value, (Future, str, int, float)):
            return value
        known = self._call_data.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        if _nbytes(value) < self.scatter_threshold:
            return value
        [future] = self.client.scatter([value], hash=False)
        self._call_data[id(value)] = (value, future)  # holding value keeps its id unique
        return future


def _nested_backend(scatter_threshold: int | None, pure: bool,
                    submit_options: dict[str, Any]) -> ShoalBackend:  # fmt: skip
    return ShoalBackend(scatter_threshold=scatter_threshold, pure=pure, **submit_options)


def _nbytes(obj: Any) -> int:
    """Roughly how many bytes pickling ``obj`` makes (cheap: no pickling)."""
    memory_usage = getattr(obj, "memory_usage", None)
    if callable(memory_usage) and hasattr(obj, "columns"):  # a pandas DataFrame
        try:
            return int(memory_usage(index=True, deep=False).sum())
        except Exception:  # noqa: BLE001 - an estimate only
            pass
    data: Any = getattr(obj, "data", None)
    if hasattr(obj, "indices") and hasattr(data, "nbytes"):  # a scipy.sparse matrix
        return int(data.nbytes) + int(getattr(obj.indices, "nbytes", 0))
    return sizeof(obj)


def _funcname(fn: Any) -> str:
    inner = getattr(fn, "function", None) or getattr(fn, "func", None) or fn  # sklearn, partial
    name = getattr(inner, "__name__", None) or type(inner).__name__
    return "lambda" if name == "<lambda>" else str(name)


register_parallel_backend("shoal", ShoalBackend)
