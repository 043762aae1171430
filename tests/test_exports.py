"""The public API is what shoal/__init__.py re-exports; this pins it."""

import types

import shoal

PUBLIC = {
    "CancelledError", "Client", "Future", "FutureLostError", "KilledWorkerError", "LocalCluster",
    "RemoteTraceback", "Scheduler", "SchedulerGoneError", "SerializationError", "Worker",
    "Security",
    "as_completed", "default_client", "wait", "annotate", "fire_and_forget",
    # tasks that launch tasks, remote functions, actors
    "get_client", "secede", "rejoin", "remote", "Actor", "ActorFuture", "ActorLostError",
    # coordination
    "Event", "Lock", "Pub", "Queue", "Semaphore", "Sub", "Variable",
    # observability
    "progress",
}  # fmt: skip


def test_public_names_are_exported() -> None:
    exported = {name for name in vars(shoal) if not name.startswith("_")}
    missing = PUBLIC - exported
    assert not missing, f"not exported: {sorted(missing)}"


def test_every_public_name_is_pinned() -> None:
    # Submodules appear as attributes once imported; they are not API re-exports.
    exported = {n for n, v in vars(shoal).items()
                if not n.startswith("_") and not isinstance(v, types.ModuleType)}  # fmt: skip
    assert exported <= PUBLIC, f"exported but not pinned here: {sorted(exported - PUBLIC)}"
