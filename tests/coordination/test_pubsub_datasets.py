"""Publish/subscribe fan-out, and named datasets that outlive their publisher."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import pytest

import shoal
from shoal.coordination.service import CoordinationExtension, DatasetExtension
from shoal.testing import wait_until


def inc(x: int) -> int:
    return x + 1


# ------------------------------------------------------------------ pub/sub


def test_messages_fan_out_to_every_subscriber_in_order(
    client: shoal.Client, connect: Callable[[], shoal.Client]
) -> None:
    # given two subscribers on different clients, and a late one
    first = shoal.Sub("news")
    second = shoal.Sub("news", client=connect())
    publisher = shoal.Pub("news", client=connect())
    # when three messages are published
    for i in range(3):
        publisher.put({"n": i})
    # then each subscriber gets all three, in order; one who subscribes later gets none
    assert [first.get(timeout=5) for _ in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    late = shoal.Sub("news")
    assert [msg for _, msg in zip(range(3), second)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    with pytest.raises(TimeoutError, match="news"):
        late.get(timeout=0.1)
    shoal.Pub("other-topic").put("not for us")
    publisher.put("after")
    assert late.get(timeout=5) == "after" and first.get(timeout=5) == "after"


def test_sub_get_times_out_and_close_unsubscribes(
    client: shoal.Client, coordination: CoordinationExtension
) -> None:
    sub = shoal.Sub("t")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        sub.get(timeout=0.2)
    # waited its timeout (asyncio may fire a timer a little early: seen 0.19975 s), no hang
    assert 0.15 <= time.monotonic() - start < 0.2 + 10
    assert "t" in coordination.state.topics
    sub.close()
    wait_until(lambda: "t" not in coordination.state.topics, message="unsubscribed")


def _publish(n: int) -> None:
    pub = shoal.Pub("from-tasks")
    for i in range(n):
        pub.put(i)


def test_tasks_publish(client: shoal.Client) -> None:
    sub = shoal.Sub("from-tasks")
    client.submit(_publish, 3).result(timeout=10)
    assert [sub.get(timeout=5) for _ in range(3)] == [0, 1, 2]


# ------------------------------------------------------------------ datasets


def test_datasets_outlive_the_client_that_published_them(
    client: shoal.Client, connect: Callable[[], shoal.Client], datasets: DatasetExtension
) -> None:
    # given a client that publishes a future and a plain object, then closes
    publisher = connect()
    future = publisher.submit(inc, 1, key="published-future")
    publisher.publish_dataset(answer=future, table={"a": [1, 2, 3]})
    del future
    gc.collect()
    publisher.close()
    state = client.cluster.scheduler.state
    wait_until(lambda: state.tasks["published-future"].who_wants.keys() == {"dataset:answer"},
               message="only the dataset holds the key")  # fmt: skip
    # when another client reads them, then they are still there
    assert client.list_datasets() == ["answer", "table"]
    got = client.get_dataset("answer")
    assert isinstance(got, shoal.Future) and got.result(timeout=10) == 2
    assert client.get_dataset("table") == {"a": [1, 2, 3]}  # what was published, not a future
    # a published future works as a task's argument too
    assert client.submit(inc, got).result(timeout=10) == 3
    # when it is unpublished and nobody holds it, then the key goes
    del got
    gc.collect()
    client.unpublish_dataset("answer")
    wait_until(lambda: "published-future" not in state.tasks, message="the key is released")
    assert client.list_datasets() == ["table"]


def test_futures_inside_a_published_object_outlive_the_publisher(
    client: shoal.Client, connect: Callable[[], shoal.Client], datasets: DatasetExtension
) -> None:
    # given a client that publishes a list of futures, then lets them go and closes
    publisher = connect()
    futures = [publisher.submit(inc, i, key=f"inner-{i}") for i in range(3)]
    publisher.publish_dataset(parts=futures)
    del futures
    gc.collect()
    publisher.close()
    state = client.cluster.scheduler.state
    wait_until(lambda: all(state.tasks[f"inner-{i}"].who_wants.keys() == {"dataset:parts"}
                           for i in range(3)), message="only the dataset holds the keys")  # fmt: skip
    # when another client reads the dataset, then the futures inside still have their values
    parts = client.get_dataset("parts")
    assert [f.result(timeout=10) for f in parts] == [1, 2, 3]
    # when it is unpublished and nobody holds them, then the keys go
    del parts
    gc.collect()
    client.unpublish_dataset("parts")
    wait_until(lambda: not any(f"inner-{i}" in state.tasks for i in range(3)),
               message="the inner keys are released")  # fmt: skip


def test_missing_and_taken_dataset_names(client: shoal.Client) -> None:
    with pytest.raises(KeyError, match="'nope'"):
        client.get_dataset("nope")
    assert client.get_dataset("nope", default=None) is None
    with pytest.raises(KeyError, match="'nope'"):
        client.unpublish_dataset("nope")
    client.publish_dataset(x=1)
    with pytest.raises(KeyError, match="'x' already published"):
        client.publish_dataset(x=2)
    assert client.get_dataset("x") == 1
    client.publish_dataset(x=2, override=True)
    assert client.get_dataset("x") == 2
    with pytest.raises(TypeError):
        client.publish_dataset()


def test_tasks_read_datasets(client: shoal.Client) -> None:
    client.publish_dataset(config={"factor": 3})
    future = client.submit(lambda: shoal.default_client().get_dataset("config")["factor"])
    assert future.result(timeout=10) == 3
