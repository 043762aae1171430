"""Tasks per group and state, kept in step with every transition.

A task's group is its key's prefix (`key_group`). The counts let the dashboard, ``/metrics``
and progress bars read "how many ``inc`` tasks are in memory" in time proportional to the
number of groups, never to the number of tasks (the scheduler may hold 100,000 of them).

Invariant (checked in tests): for every group with a live task,
``states[s] == #{tasks of the group in state s}`` for each state, and ``forgotten`` counts
the tasks of the group forgotten since its first task appeared. A group whose every task
was forgotten is dropped, so a long-lived scheduler keeps only groups it still holds.
"""

from __future__ import annotations

__all__ = ["GroupCounts", "TaskGroups"]


class GroupCounts:
    """One group's tasks: how many are in each state, and how many were forgotten."""

    __slots__ = ("forgotten", "live", "states")

    def __init__(self) -> None:
        #: state -> tasks of this group in it (states reached at least once; may hold 0)
        self.states: dict[str, int] = {}
        #: tasks of this group the scheduler holds now (the sum of ``states``)
        self.live = 0
        #: tasks of this group forgotten since the group appeared
        self.forgotten = 0

    def as_dict(self) -> dict[str, int]:
        """``{state: n}`` for the states held now, plus ``forgotten`` when not zero."""
        out = {s: n for s, n in self.states.items() if n}
        if self.forgotten:
            out["forgotten"] = self.forgotten
        return out


class TaskGroups:
    """``group -> GroupCounts``, updated by `SchedulerState` (mutate only from there)."""

    __slots__ = ("groups", "states")

    def __init__(self) -> None:
        self.groups: dict[str, GroupCounts] = {}
        #: state -> tasks in it, over every group
        self.states: dict[str, int] = {}

    def created(self, group: str, state: str = "released") -> None:
        counts = self.groups.get(group)
        if counts is None:
            counts = self.groups[group] = GroupCounts()
        counts.states[state] = counts.states.get(state, 0) + 1
        counts.live += 1
        self.states[state] = self.states.get(state, 0) + 1

    def moved(self, group: str, start: str, finish: str) -> None:
        counts = self.groups.get(group)
        if counts is None:  # defensive: a task created without `created`
            self.created(group, finish)
            return
        states = counts.states
        states[start] -= 1
        states[finish] = states.get(finish, 0) + 1
        totals = self.states
        totals[start] -= 1
        totals[finish] = totals.get(finish, 0) + 1

    def forgotten(self, group: str, state: str) -> None:
        counts = self.groups.get(group)
        if counts is None:
            return
        counts.states[state] -= 1
        counts.live -= 1
        counts.forgotten += 1
        self.states[state] -= 1
        if counts.live <= 0:
            del self.groups[group]  # everything it made is gone: start afresh next time

    def clear(self) -> None:
        self.groups.clear()
        self.states.clear()

    def by_state(self) -> dict[str, int]:
        """``{state: n}`` over every group, states with no task left out."""
        return {s: n for s, n in self.states.items() if n}
