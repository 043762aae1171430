"""The public API is what shoal/__init__.py re-exports; this pins it."""

import shoal

PUBLIC = {
    "CancelledError", "Client", "Future", "FutureLostError", "KilledWorkerError", "LocalCluster",
    "RemoteTraceback", "Scheduler", "SchedulerGoneError", "SerializationError", "Worker",
    "as_completed", "default_client", "wait", "annotate", "fire_and_forget",
    # coordination
    "Event", "Lock", "Pub", "Queue", "Semaphore", "Sub", "Variable",
}  # fmt: skip


def test_public_names_are_exported() -> None:
    exported = {name for name in vars(shoal) if not name.startswith("_")}
    missing = PUBLIC - exported
    assert not missing, f"not exported: {sorted(missing)}"


def test_every_public_name_is_pinned() -> None:
    modules = {"protocol", "comm", "core", "cluster", "utils", "client", "future", "scheduler",
               "worker", "annotate", "exceptions", "execution", "rpc", "testing", "cli", "demo",
               "coordination"}  # fmt: skip
    exported = {n for n in vars(shoal) if not n.startswith("_")} - modules
    assert exported <= PUBLIC, f"exported but not pinned here: {sorted(exported - PUBLIC)}"
