"""Protocol fuzzing of every shoal TCP port (issue #12): no crash, bounded memory, and a
well-behaved client keeps computing throughout.

A scheduler and a worker run as real processes with a token. A seeded generator
(tests/security/fuzz_frames.py) makes hostile connections: malformed, truncated and
oversized frames (prefixes claiming gigabytes), random MessagePack, mutated messages, and
real messages with random fields in the wrong state (a worker's report from a client, a
registration twice, anything before the Hello), from peers without and with the token.
Between connections a real client submits a task and waits for its result; the servers'
RSS is sampled (psutil) and must stay within a budget; at the end both servers must still
be alive, exit cleanly on SIGTERM, and have logged no error other than the protocol
violations they are expected to log.

Also: 200 half-open unauthenticated peers per port (memory, and dropped at the handshake
timeout), hostile HTTP requests to both dashboards (never a 5xx), and regressions for the
bugs this fuzzer found.

- The normal run fuzzes a few thousand frames per port and 100 requests per dashboard.
- ``pytest -m stress tests/security/test_fuzz_protocol.py -s`` sends 100,000 frames to each
  port (4 connections at a time) and 5,000 requests to each dashboard;
  ``SHOAL_FUZZ_FRAMES=N`` and ``SHOAL_FUZZ_SEED=S`` change the count and the seed (the seed
  is printed, so a failing run can be replayed). Figures are printed with ``-s``.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import shoal
from shoal.protocol.messages import (
    Msg,
    QueueGet,
    RunOnWorkers,
    ScatterTargets,
    VariableGet,
    VariableSet,
)
from shoal.protocol.serialize import Serialized
from shoal.testing import ShoalProcess, no_leaks, spawn_scheduler, spawn_worker

from fuzz_frames import AUTHENTICATED_CLAIM_BYTES, Case, FrameFuzzer, HttpFuzzer
from fuzz_peers import (
    connect_raw,
    hello_frame,
    message_frame,
    port_of,
    read_status_line,
    read_until,
    read_until_closed,
    rss_of,
    send_all,
)

TOKEN = "fuzz-" + uuid.uuid4().hex
DEFAULT_SEED = 20261202
#: Frames per port in the normal run, and in the stress run unless SHOAL_FUZZ_FRAMES says.
QUICK_FRAMES = 2_500
STRESS_FRAMES = 100_000
#: Fuzz connections open at a time in the stress run (2 in the quick one).
STRESS_STREAMS = 4
#: A real task runs (and the servers' RSS is sampled) after this many fuzz connections.
CHECK_EVERY = 50
#: How much a server's RSS may grow over a run, besides what the open fuzz connections may
#: hold at once: each at most the buffer for an authenticated peer's claimed frame part
#: (`AUTHENTICATED_CLAIM_BYTES`), which goes when the connection does.
RSS_BUDGET = 100 * 2**20

#: Errors the servers may log: an authenticated peer that sent a message its role may not
#: (its connection is closed), or a coordination request that is invalid (answered with the
#: error, the connection kept).
EXPECTED_ERRORS = [
    re.compile(r"^ValueError: a (client|worker) may not send \w+$"),
    re.compile(r"^ValueError: a queue or variable item needs a value or a key$"),
    re.compile(r"^ValueError: request id -?\d+ is already waiting \(ids must be unique\)$"),
    # aiohttp logs each malformed HTTP request (answered 400) with its traceback
    re.compile(r"^aiohttp\.http_exceptions\.\w+: 400"),
]


def fuzz_seed() -> int:
    return int(os.environ.get("SHOAL_FUZZ_SEED") or DEFAULT_SEED)


@dataclass
class Servers:
    scheduler: ShoalProcess
    worker: ShoalProcess  #: ``--no-nanny``: the worker's own process
    client: shoal.Client
    dashboards: dict[str, str]  #: "scheduler" / "worker" -> the URL of its HTTP server
    tasks_run: int = 0

    def address(self, port: str) -> str:
        return self.scheduler.address if port == "scheduler" else self.worker.address

    def compute(self) -> None:
        """A real task, start to finish, on the fuzzed cluster."""
        self.tasks_run += 1
        n = self.tasks_run
        assert self.client.submit(sum, [n, 1], pure=False).result(timeout=30) == n + 1

    def alive(self) -> None:
        for proc in (self.scheduler, self.worker):
            assert proc.proc.poll() is None, f"{proc.what} died:\n{proc.output()}"


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    quiet = ["--dashboard-address", ":0", "--log-level", "error"]  # violations are warnings
    with no_leaks(20), spawn_scheduler(port=0, token=TOKEN, extra_args=quiet) as scheduler, \
            spawn_worker(scheduler.address, token=TOKEN, name="fuzzed",
                         extra_args=["--no-nanny", *quiet]) as worker, \
            shoal.Client(scheduler.address, token=TOKEN, timeout=10,
                         set_as_default=False) as client:  # fmt: skip
        client.wait_for_workers(1, timeout=20)
        dashboards = {
            "scheduler": scheduler.wait_for_line(r"shoal dashboard at (\S+)", 10).group(1),
            "worker": client.scheduler_info()["workers"][worker.address]["dashboard"],
        }
        yield Servers(scheduler, worker, client, dashboards)
        unexpected = unexpected_errors(scheduler) + unexpected_errors(worker)
        assert not unexpected, "the servers logged errors besides protocol violations:\n" + (
            "\n".join(unexpected))


def unexpected_errors(proc: ShoalProcess) -> list[str]:
    """Each kind of unexpected error ``proc`` logged (the last line of its traceback), how
    often, and the first traceback of that kind."""
    lines = list(proc.stderr)
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for i, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last)"):
            continue
        j = i + 1
        while j < len(lines) and (lines[j].startswith(" ") or not lines[j]):
            j += 1
        last = lines[j] if j < len(lines) else "(traceback cut short)"
        if any(p.match(last) for p in EXPECTED_ERRORS):
            continue
        counts[last] += 1
        examples.setdefault(last, "\n  ".join(lines[max(0, i - 1):j + 1]))
    return [f"{proc.what}, {n} times: {last}\n  {examples[last]}" for last, n in counts.items()]


@dataclass
class FuzzRun:
    port: str
    seed: int
    frames: int = 0
    connections: int = 0
    bytes_sent: int = 0
    dropped_as_required: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    rss_start: dict[str, int] = field(default_factory=dict)
    rss_max: dict[str, int] = field(default_factory=dict)
    #: RSS when half the frames were sent: growth after it would be a leak, not warm-up
    rss_half: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        mib = 2**20
        rss = ", ".join(f"{name} RSS {self.rss_start[name] / mib:.0f} -> half-way"
                        f" {self.rss_half.get(name, 0) / mib:.0f} -> max"
                        f" {self.rss_max[name] / mib:.0f} MiB" for name in self.rss_start)  # fmt: skip
        return (f"fuzz {self.port} port (seed {self.seed}): {self.frames} frames in"
                f" {self.connections} connections, {self.bytes_sent / mib:.1f} MiB, in"
                f" {self.seconds:.1f}s = {self.frames / self.seconds:.0f} frames/s,"
                f" {self.connections / self.seconds:.0f} connections/s,"
                f" {self.dropped_as_required} dropped for a bad frame; {rss}")


def play(case: Case, address: str, run: FuzzRun) -> None:
    """One fuzz connection. Fails if an authenticated Hello is refused, if the server keeps
    a connection it must drop, or if it does not close once we have sent everything.

    We end by closing our side for writing: the server reads everything before that EOF,
    handles it, then closes; so the next case starts only once this one was handled."""
    with connect_raw(address) as sock:
        run.connections += 1
        if case.authenticate:
            assert send_all(sock, hello_frame(TOKEN, role=case.role))
            read_until(sock, b"welcome")
            run.frames += 1
        for data in case.frames:
            if not send_all(sock, data):
                break  # dropped already: the rest would not be read anyway
            run.frames += 1
            run.bytes_sent += len(data)
        if case.must_close:
            closed, _ = read_until_closed(sock)
            assert closed, f"{run.port} kept a connection open after {case.kind}: {case.frames!r}"
            run.dropped_as_required += 1
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # closed by the server already
            return
        closed, _ = read_until_closed(sock)
        assert closed, f"{run.port} kept a connection open after its peer's EOF ({case.kind})"


def fuzz(servers: Servers, port: str, seed: int, frames: int, streams: int) -> FuzzRun:
    """Send ``frames`` fuzz frames to ``port`` over ``streams`` concurrent connections at a
    time (each stream its own seeded generator: the cases are replayable, their interleaving
    is not), while this thread has a real task computed after every `CHECK_EVERY` fuzz
    connections and samples the servers' RSS."""
    address = servers.address(port)
    runs = [FuzzRun(port, seed) for _ in range(streams)]
    processes = {"scheduler": servers.scheduler.pid, "worker": servers.worker.pid}
    progress = threading.Condition()
    failures: list[BaseException] = []
    stop = threading.Event()

    def stream(i: int) -> None:
        fuzzer = FrameFuzzer(seed * 1000 + i, TOKEN, port,
                             [servers.worker.address, servers.scheduler.address])  # fmt: skip
        run = runs[i]
        try:
            while not stop.is_set() and sum(r.frames for r in runs) < frames:
                case = fuzzer.case()
                run.kinds[case.kind] += 1
                play(case, address, run)
                with progress:
                    progress.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)
            stop.set()
        finally:
            with progress:
                progress.notify_all()

    servers.compute()
    total = FuzzRun(port, seed)
    total.rss_start = {name: rss_of(pid) for name, pid in processes.items()}
    total.rss_max = dict(total.rss_start)

    def sample() -> None:
        for name, pid in processes.items():
            total.rss_max[name] = max(total.rss_max[name], rss_of(pid))

    threads = [threading.Thread(target=stream, args=(i,), name=f"shoal-fuzz-{port}-{i}")
               for i in range(streams)]  # fmt: skip
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        checked = 0
        while any(t.is_alive() for t in threads):
            with progress:
                progress.wait_for(lambda: stop.is_set() or not any(t.is_alive() for t in threads)
                                  or sum(r.connections for r in runs) >= checked + CHECK_EVERY,
                                  timeout=60)  # fmt: skip
            checked = sum(r.connections for r in runs)
            if stop.is_set():
                break
            servers.alive()
            servers.compute()
            sample()
            if not total.rss_half and sum(r.frames for r in runs) >= frames // 2:
                total.rss_half = {name: rss_of(pid) for name, pid in processes.items()}
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    if failures:
        raise failures[0]
    total.seconds = time.perf_counter() - start
    for run in runs:
        total.frames += run.frames
        total.connections += run.connections
        total.bytes_sent += run.bytes_sent
        total.dropped_as_required += run.dropped_as_required
        total.kinds.update(run.kinds)
    servers.alive()
    servers.compute()
    sample()
    print(f"\n{total.summary()} ({streams} streams)")
    budget = RSS_BUDGET + streams * AUTHENTICATED_CLAIM_BYTES
    for name in processes:
        grown = total.rss_max[name] - total.rss_start[name]
        assert grown < budget, (f"{name} RSS grew by {grown / 2**20:.0f} MiB, over"
                                f" {budget / 2**20:.0f}: {total.summary()}")  # fmt: skip
    return total


@pytest.mark.parametrize("port", ["scheduler", "worker"])
def test_fuzzed_frames_crash_nothing_and_a_client_keeps_computing(servers: Servers,
                                                                  port: str) -> None:  # fmt: skip
    run = fuzz(servers, port, fuzz_seed(), QUICK_FRAMES, streams=2)
    # every kind of hostile connection was tried, from peers with and without the token
    assert {k.split(":")[0] for k in run.kinds} >= {"unauthenticated", "refused hello",
                                                    "authenticated client",
                                                    "authenticated worker"}  # fmt: skip
    assert run.dropped_as_required > 0


#: Messages from an authenticated client that once stopped or hurt the scheduler (found by
#: this fuzzer): the server must answer them (or not) and go on serving.
REGRESSIONS: dict[str, list[Msg]] = {
    # the scheduler built a list of 2**40 targets: memory without bound, no one served
    "a scatter of 2**40 values": [ScatterTargets(1, 2**40)],
    # call_later(nan) raised, the waiter stayed waiting
    "a wait with a NaN timeout": [VariableGet(2, "fuzz-variable", math.nan)],
    # the reply went to a closed connection: an exception in a task no one awaited
    "client.run, then leaving at once": [RunOnWorkers(3, Serialized([pickle.dumps(len)]))],
    # a second wait under one request id: the variable's answer then failed with KeyError,
    # leaving every other waiter of that variable unanswered
    "two waits with one request id": [
        VariableGet(4, "fuzz-variable-2"), QueueGet(4, "fuzz-queue", 0, 0.0),
        VariableSet(5, "fuzz-variable-2", Serialized([pickle.dumps(1)]))],
}


@pytest.mark.parametrize("msgs", REGRESSIONS.values(), ids=REGRESSIONS.keys())
def test_messages_that_once_hurt_the_scheduler(servers: Servers, msgs: list[Msg]) -> None:
    # given an authenticated client that sends the message and leaves at once
    with connect_raw(servers.scheduler.address) as sock:
        assert send_all(sock, hello_frame(TOKEN))
        read_until(sock, b"welcome")
        assert send_all(sock, message_frame(*msgs))
        sock.shutdown(socket.SHUT_WR)  # the server reads all of it, then closes
        assert read_until_closed(sock)[0]
    # then the scheduler still answers a new peer promptly
    with connect_raw(servers.scheduler.address) as sock:
        assert send_all(sock, hello_frame(TOKEN))
        read_until(sock, b"welcome", timeout=5)
    # and a real client keeps computing (the servers' logs are checked when they stop)
    servers.compute()
    servers.alive()


def test_a_task_retried_more_than_1024_times_fails_with_its_own_error(servers: Servers) -> None:
    """Found by the fuzzer (a task with huge ``retries`` and no delay): the retry backoff
    ``delay * 2 ** (attempts - 1)`` overflowed at attempt 1025 and broke the scheduler's
    handling of that task's failure."""
    # given a task that always fails, with more retries than the backoff's exponent can take
    future = servers.client.submit(len, 5, retries=1100, retry_delay=0.0, pure=False)
    # then it fails with its own error once the retries are spent
    with pytest.raises(TypeError, match="has no len"):
        future.result(timeout=60)
    # and the scheduler goes on
    servers.compute()
    servers.alive()


#: Silent peers per port in the half-open test.
HALF_OPEN_PEERS = 200
#: What those may cost the servers in all (each holds a 64 KiB read buffer, and its task).
HALF_OPEN_BUDGET = 64 * 2**20


def test_half_open_peers_cost_little_and_are_dropped_at_the_handshake_timeout(
        servers: Servers) -> None:  # fmt: skip
    processes = {"scheduler": servers.scheduler.pid, "worker": servers.worker.pid}
    before = {name: rss_of(pid) for name, pid in processes.items()}
    socks: list[socket.socket] = []
    try:
        # given peers that each send part of a Hello and then stay silent
        for port in ("scheduler", "worker"):
            for i in range(HALF_OPEN_PEERS):
                sock = connect_raw(servers.address(port))
                socks.append(sock)
                sock.sendall(hello_frame(TOKEN)[: 1 + i % 20])
        # then the servers keep serving, and the silent peers cost them little
        servers.compute()
        grown = {name: rss_of(pid) - before[name] for name, pid in processes.items()}
        print(f"\n{HALF_OPEN_PEERS} half-open peers per port: RSS grew by " + ", ".join(
            f"{name} {n / 2**20:.1f} MiB" for name, n in grown.items()))
        for name, n in grown.items():
            assert n < HALF_OPEN_BUDGET, f"{name} RSS grew by {n / 2**20:.0f} MiB"
        # and each is dropped once the handshake timeout (10 s) has passed
        deadline = time.monotonic() + 30
        for sock in socks:
            closed, _ = read_until_closed(sock, timeout=max(0.1, deadline - time.monotonic()))
            assert closed, "a silent, unauthenticated peer was kept past the handshake timeout"
    finally:
        for sock in socks:
            sock.close()
    servers.compute()


#: Requests per HTTP server in the quick run of the HTTP fuzz, and under stress.
HTTP_REQUESTS = 100
STRESS_HTTP_REQUESTS = 5000


@pytest.mark.parametrize("server", ["scheduler", "worker"])
def test_fuzzed_http_requests_get_no_server_error(servers: Servers, server: str) -> None:
    """The dashboards (HTTP, behind the token's login) are ports too: malformed and hostile
    requests, with and without the token, get an answer below 500 or a closed connection,
    never a hang, and the cluster keeps computing."""
    http_fuzz(servers, server, fuzz_seed(), HTTP_REQUESTS)


@pytest.mark.stress
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("server", ["scheduler", "worker"])
def test_5000_fuzzed_http_requests_per_dashboard(servers: Servers, server: str) -> None:
    http_fuzz(servers, server, fuzz_seed() + 1, STRESS_HTTP_REQUESTS)


def http_fuzz(servers: Servers, server: str, seed: int, requests: int) -> None:
    url = servers.dashboards[server]
    fuzzer = HttpFuzzer(seed, TOKEN)
    statuses: Counter[str] = Counter()
    start = time.perf_counter()
    for i in range(requests):
        request = fuzzer.request()
        with connect_raw(f"tcp://127.0.0.1:{port_of(url)}") as sock:
            send_all(sock, request)
            status = read_status_line(sock)
        statuses[status[:3] if status else "closed"] += 1
        assert not status.startswith("5"), f"{server} dashboard: {status!r} for {request!r}"
        if i % CHECK_EVERY == 0:
            servers.alive()
            servers.compute()
    print(f"\n{server} dashboard: {requests} fuzzed requests (seed {seed}) in"
          f" {time.perf_counter() - start:.1f}s: {dict(statuses)}")
    assert any(s.startswith("4") for s in statuses), statuses
    servers.compute()


@pytest.mark.stress
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("port", ["scheduler", "worker"])
def test_100k_fuzzed_frames_per_port(servers: Servers, port: str) -> None:
    frames = int(os.environ.get("SHOAL_FUZZ_FRAMES") or STRESS_FRAMES)
    fuzz(servers, port, fuzz_seed() + 1, frames, streams=STRESS_STREAMS)
