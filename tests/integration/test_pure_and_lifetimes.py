"""Pure calls run once; results live while some client holds a future; released keys
are freed on the workers."""

from __future__ import annotations

import shoal
from shoal.testing import Tally, wait_until


def test_the_same_pure_call_submitted_twice_runs_once(client: shoal.Client,
                                                      tally: Tally) -> None:  # fmt: skip
    # when the same pure call is submitted twice
    first = client.submit(tally.record, "x")
    second = client.submit(tally.record, "x")
    # then both futures share one key and the function ran once
    assert first.key == second.key
    assert client.gather([first, second]) == ["x", "x"]
    assert tally.count("x") == 1


def test_a_pure_call_submitted_after_finishing_is_not_rerun(client: shoal.Client,
                                                             tally: Tally) -> None:  # fmt: skip
    first = client.submit(tally.record, "y")
    assert first.result(timeout=10) == "y"
    again = client.submit(tally.record, "y")
    assert again.result(timeout=10) == "y"
    assert tally.count("y") == 1


def test_pure_false_runs_each_submission(client: shoal.Client, tally: Tally) -> None:
    # when the same call is submitted twice with pure=False
    first = client.submit(tally.record, "z", pure=False)
    second = client.submit(tally.record, "z", pure=False)
    # then the keys differ and it ran twice
    assert first.key != second.key
    assert client.gather([first, second]) == ["z", "z"]
    assert tally.count("z") == 2


def test_different_arguments_get_different_keys(client: shoal.Client, tally: Tally) -> None:
    futures = client.map(tally.record, ["a", "b", "a"])
    assert futures[0].key == futures[2].key != futures[1].key
    assert client.gather(futures) == ["a", "b", "a"]
    assert sorted(tally.lines()) == ["a", "b"]


def test_a_result_survives_while_another_client_holds_it(client: shoal.Client,
                                                         tally: Tally) -> None:  # fmt: skip
    # given a second client on the same scheduler, and client A's finished pure call
    with shoal.Client(client.scheduler_address, set_as_default=False) as other:
        a = client.submit(tally.record, "shared")
        assert a.result(timeout=10) == "shared"
        # when client B submits the same call and client A lets go of its future
        b = other.submit(tally.record, "shared")
        assert b.key == a.key
        other.who_has()  # a round trip: the scheduler has B's submit before A's release
        a.release()
        client.who_has()  # and has handled A's release
        # then B still gets the result, from the one run
        assert b.result(timeout=10) == "shared"
        assert other.who_has([b])[b.key]
        assert tally.count("shared") == 1


def test_released_keys_are_freed_on_workers(client: shoal.Client) -> None:
    # given finished results held by the client
    futures = client.map(lambda x: x * 2, range(4))
    assert client.gather(futures) == [0, 2, 4, 6]
    keys = {f.key for f in futures}
    assert keys <= set(client.who_has())
    # when every future is released
    for f in futures:
        f.release()
    # then the scheduler forgets the keys and the workers drop the data
    wait_until(lambda: not keys & set(client.who_has()), timeout=10,
               message="released keys gone from who_has")  # fmt: skip
    workers = client.cluster.workers
    wait_until(lambda: not any(keys & set(w.data) for w in workers), timeout=10,
               message="released keys gone from the workers' data")  # fmt: skip


def test_dropping_the_last_future_releases_its_key(client: shoal.Client) -> None:
    future = client.submit(lambda: "temporary")
    assert future.result(timeout=10) == "temporary"
    key = future.key
    del future  # garbage collection releases the key like release() does
    wait_until(lambda: key not in client.who_has(), timeout=10, message="key released on del")
