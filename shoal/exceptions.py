"""Errors shoal raises to users. Task exceptions keep their own type; these name the rest."""

from __future__ import annotations

from concurrent.futures import CancelledError as CancelledError


class ShoalError(Exception):
    """Base of shoal's own errors."""


class FutureLostError(ShoalError):
    """The key cannot be computed or recovered (scattered data lost, scheduler gone...)."""


class KilledWorkerError(ShoalError):
    """The task was on too many workers that died; it may be what kills them."""


class SchedulerGoneError(FutureLostError):
    """The client lost its scheduler; results held only in the cluster are gone."""


class ActorLostError(ShoalError):
    """An actor's worker is gone (or no longer holds it): its state is lost with it."""


class RemoteTraceback(Exception):
    """Carries a task's traceback as it was on the worker (set as ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\nThe task's traceback on the worker:\n{self.tb}"


#: KeyErred.kind -> the exception class a client raises for it
FAILURE_KINDS: dict[str, type[ShoalError]] = {
    "lost": FutureLostError,
    "killed-worker": KilledWorkerError,
    "unknown-dependency": FutureLostError,
    "scheduler-gone": SchedulerGoneError,
}
