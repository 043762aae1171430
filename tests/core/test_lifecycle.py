"""Retiring workers and restarting the cluster, driven by events (no sockets)."""

from shoal.core.scheduler_events import (
    ClusterRestarted,
    ReplicasAdded,
    RetireWorkers,
    WorkerLeft,
)
from shoal.core.worker_events import AcquireReplicasEvent, GatherDone
from shoal.core.worker_state import WorkerState
from shoal.core.worker_events import GatherDep, ToScheduler
from shoal.protocol.messages import (
    AcquireReplicas,
    AddKeys,
    CloseWorker,
    ComputeTask,
    KeyErred,
    RestartWorker,
)
from shoal.testing.core import (
    make_scheduler,
    make_spec,
    messages,
    sent_to,
    sent_to_client,
    submit,
    task_finished,
)


def test_retiring_worker_hands_its_only_copies_to_a_keeper_then_closes() -> None:
    # given: x lives only on w1
    state = make_scheduler({"w1": 1, "w2": 1})
    state.handle([submit("c1", make_spec("x", workers=["w1"]))], now=0.0)
    state.handle([task_finished("w1", "x", nbytes=100)], now=1.0)

    # when: w1 is retired
    out = state.handle([RetireWorkers("retire", ["w1"])], now=2.0)

    # then: w2 is asked to copy x, and w1 is not closed yet
    [ask] = sent_to(out, "w2", AcquireReplicas)
    assert ask.who_has == {"x": ["w1"]} and ask.nbytes == {"x": 100}
    assert not messages(out, CloseWorker)

    # when: the copy lands
    out = state.handle([ReplicasAdded("copied", "w2", ["x"], [100])], now=3.0)

    # then: w1 is closed; x stays in memory on w2
    assert sent_to(out, "w1", CloseWorker)
    out = state.handle([WorkerLeft("bye", "w1", "retired", graceful=True)], now=4.0)
    assert state.tasks["x"].state == "memory"
    assert [w.address for w in state.tasks["x"].who_has] == ["w2"]
    assert not messages(out, ComputeTask)  # nothing recomputed


def test_retiring_worker_gets_no_new_work() -> None:
    state = make_scheduler({"w1": 1, "w2": 1})
    state.handle([RetireWorkers("retire", ["w1"])], now=0.0)
    out = state.handle([submit("c1", make_spec("y"))], now=1.0)
    assert [ins.address for ins in out if isinstance(getattr(ins, "msg", None), ComputeTask)] == ["w2"]


def test_worker_with_nothing_to_move_is_closed_at_once() -> None:
    state = make_scheduler({"w1": 1, "w2": 1})
    out = state.handle([RetireWorkers("retire", ["w2"])], now=0.0)
    assert sent_to(out, "w2", CloseWorker)


def test_restart_fails_what_clients_wait_for_and_forgets_everything() -> None:
    # given: one key in memory, one running
    state = make_scheduler({"w1": 1})
    state.handle([submit("c1", make_spec("x"), make_spec("y", ["x"]))], now=0.0)
    state.handle([task_finished("w1", "x")], now=1.0)

    # when
    out = state.handle([ClusterRestarted("restart")], now=2.0)

    # then: the client hears both keys are lost, workers are told to restart
    lost = sent_to_client(out, "c1", KeyErred)
    assert sorted(m.key for m in lost) == ["x", "y"]
    assert {m.kind for m in lost} == {"lost"}
    assert sent_to(out, "w1", RestartWorker)
    assert state.tasks == {} and state.queue == []
    ws = state.workers["w1"]
    assert not ws.processing and not ws.has_what and ws.nbytes == 0 and ws.occupancy == 0.0


def test_worker_fetches_and_keeps_acquired_replicas() -> None:
    # given / when: the scheduler asks w2 for a copy of x held by w1
    ws = WorkerState("w2", 1, validate=True)
    out = ws.handle([AcquireReplicasEvent("acquire", {"x": ["w1"]}, {"x": 10})], now=0.0)

    # then: it fetches it, keeps it and tells the scheduler
    [gather] = [i for i in out if isinstance(i, GatherDep)]
    assert gather.peer == "w1" and gather.keys == ["x"]
    out = ws.handle([GatherDone("landed", "w1", {"x": 10})], now=1.0)
    [add] = [i.msg for i in out if isinstance(i, ToScheduler) and isinstance(i.msg, AddKeys)]
    assert add.keys == ["x"]
    assert ws.tasks["x"].state == "memory"
