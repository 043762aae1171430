"""Signed jobs (``JobQueue(secret=...)``, shoal.jobs.signing): nothing from the store is
unpickled unless its HMAC matches.

The attacker here has write access to the store and nothing else: it writes with
sqlite3 / redis-py straight into the SQLite file or Redis keys (or into the memory broker's
dicts), or enqueues through a `JobQueue` without the secret. Its payloads are pickles that
create a file when unpickled; every test asserts that file never appears (and
`test_the_attack_pickle_works` proves the pickle does create it when unpickled).

In-process workers run on every backend (memory, SQLite, Redis); the last tests run real
``shoal jobs worker`` processes on SQLite and Redis, with the secret from the environment.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import pytest
from click.testing import CliRunner
from msgspec import structs

from shoal.cli import main
from shoal.jobs import BadSignature, JobFailed, JobQueue
from shoal.jobs import worker as worker_module
from shoal.jobs.message import decode, encode
from shoal.jobs.signing import ENV_VAR, MAC_SIZE, MAGIC, Signer, args_context, is_signed
from shoal.testing import wait_until

HERE = Path(__file__).resolve().parent
SECRET = "test-secret-0123456789-abcdefghij"
OTHER_SECRET = "another-secret-9876543210-zyxwvu"


@pytest.fixture(autouse=True)
def _no_secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests say which app has a secret; one in the environment would give it to all."""
    monkeypatch.delenv(ENV_VAR, raising=False)


# ------------------------------------------------------------------ the attacker's tools


class TouchOnUnpickle:
    """Unpickling this creates ``path``: what an attacker stores to run code on a worker."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def attack_arguments(path: Path) -> bytes:
    """An unsigned ``(args, kwargs)`` pickle that creates ``path`` when loaded."""
    return pickle.dumps(((TouchOnUnpickle(path),), {}), protocol=5)


def flipped(blob: bytes) -> bytes:
    """``blob`` with one bit of its pickle (past any signature header) changed."""
    data = bytearray(blob)
    data[-3] ^= 0x01
    return bytes(data)


class Store:
    """Raw access to a broker's storage, as anyone with write access to it has: the SQLite
    file through sqlite3, Redis keys through redis-py, a memory broker through its dicts."""

    def __init__(self, app: JobQueue) -> None:
        self.url = app.url
        self.broker: Any = app.broker

    @contextmanager
    def _sqlite(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.url[len("sqlite:///"):], timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def _redis(self) -> tuple[Any, str]:
        import redis

        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        ns = "{" + query.pop("prefix", "shoal.jobs") + "}"
        return redis.Redis.from_url(urlunsplit(parts._replace(query=""))), ns

    def message(self, job_id: str) -> bytes:
        if self.url.startswith("sqlite"):
            with self._sqlite() as db:
                return bytes(db.execute("SELECT message FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
        if self.url.startswith("redis"):
            r, ns = self._redis()
            with r:
                return bytes(r.get(f"{ns}:msg:{job_id}"))
        return bytes(self.broker._jobs[job_id].message)

    def set_message(self, job_id: str, data: bytes) -> None:
        if self.url.startswith("sqlite"):
            with self._sqlite() as db:
                db.execute("UPDATE jobs SET message = ? WHERE id = ?", (data, job_id))
        elif self.url.startswith("redis"):
            r, ns = self._redis()
            with r:
                r.set(f"{ns}:msg:{job_id}", data)
        else:
            self.broker._jobs[job_id].message = data

    def set_payload(self, job_id: str, payload: bytes) -> None:
        """Keep the job's envelope, replace the arguments inside it."""
        self.set_message(job_id, encode(structs.replace(decode(self.message(job_id)), payload=payload)))

    def payload(self, job_id: str) -> bytes:
        return decode(self.message(job_id)).payload

    def result(self, job_id: str) -> bytes:
        if self.url.startswith("sqlite"):
            with self._sqlite() as db:
                return bytes(db.execute("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
        if self.url.startswith("redis"):
            r, ns = self._redis()
            with r:
                return bytes(r.hget(f"{ns}:job:{job_id}", "result"))
        return bytes(self.broker._jobs[job_id].record.result)

    def set_result(self, job_id: str, data: bytes) -> None:
        if self.url.startswith("sqlite"):
            with self._sqlite() as db:
                db.execute("UPDATE jobs SET result = ? WHERE id = ?", (data, job_id))
        elif self.url.startswith("redis"):
            r, ns = self._redis()
            with r:
                r.hset(f"{ns}:job:{job_id}", "result", data)
        else:
            self.broker._jobs[job_id].record.result = data


def test_the_attack_pickle_works(tmp_path: Path) -> None:
    """The control: the payload the other tests store does create its file when unpickled,
    so its absence there means it was never unpickled."""
    marker = tmp_path / "pwned"
    pickle.loads(attack_arguments(marker))
    assert marker.exists()


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def signed(app: JobQueue) -> JobQueue:
    """A JobQueue with the secret on the same store as ``app`` (which has none: it is the
    attacker's or an unconfigured producer's view)."""
    return JobQueue(broker=app.broker, lease=2.0, secret=SECRET)


def dead_reason(app: JobQueue, job_id: str) -> str:
    """Wait until the job has failed; it must be in the dead-letter list: its reason."""
    wait_until(lambda: app.get(job_id).status == "failed", timeout=20,
               message=lambda: f"job {job_id} failed (it is {app.get(job_id).status})")
    record = app.get(job_id).record
    assert record.dead and record.attempts == 1
    assert job_id in [r.id for r in app.broker.dead()]
    return record.last_error or ""


# ------------------------------------------------------------------ pure signing


def test_signer_binds_blobs_to_their_place_and_rotates() -> None:
    signer = Signer([SECRET])
    ctx = args_context("job-1", "m.f", (), True)
    blob = signer.sign(ctx, b"pickle")
    assert blob.startswith(MAGIC) and len(blob) == len(MAGIC) + MAC_SIZE + len(b"pickle")
    assert signer.verify(ctx, blob, "x") == b"pickle"
    for other in (args_context("job-2", "m.f", (), True), args_context("job-1", "m.g", (), True),
                  args_context("job-1", "m.f", ("p",), True), args_context("job-1", "m.f", (), False)):
        with pytest.raises(BadSignature, match="matches none"):
            signer.verify(other, blob, "x")
    with pytest.raises(BadSignature, match="matches none"):
        signer.verify(ctx, flipped(blob), "x")
    with pytest.raises(BadSignature, match="matches none"):
        signer.verify(ctx, blob[:len(MAGIC) + 5], "x")
    with pytest.raises(BadSignature, match="no signature"):
        signer.verify(ctx, b"pickle", "x")
    # rotation: the first secret signs, every one verifies
    rotated = Signer([OTHER_SECRET, SECRET])
    assert rotated.verify(ctx, blob, "x") == b"pickle"
    with pytest.raises(BadSignature):
        signer.verify(ctx, rotated.sign(ctx, b"pickle"), "x")
    assert SECRET not in repr(signer)


def test_secret_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes, not 5"):
        JobQueue("memory://", secret="short")
    with pytest.raises(ValueError, match="at least one secret"):
        JobQueue("memory://", secret=[])
    with pytest.raises(TypeError, match="str or bytes, not int"):
        JobQueue("memory://", secret=[SECRET, 42])  # type: ignore[list-item]
    assert JobQueue("memory://", secret=SECRET.encode()).signer is not None
    assert JobQueue("memory://").signer is None


def test_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, f" {OTHER_SECRET} , {SECRET} ")
    app = JobQueue("memory://")
    assert app.signer is not None
    ctx = args_context("j", "n", (), True)
    assert app.signer.verify(ctx, Signer([SECRET]).sign(ctx, b"v"), "x") == b"v"
    assert Signer([OTHER_SECRET]).verify(ctx, app.signer.sign(ctx, b"v"), "x") == b"v"
    monkeypatch.setenv(ENV_VAR, "tiny")
    with pytest.raises(ValueError, match=f"\\${ENV_VAR}: a jobs secret must be at least"):
        JobQueue("memory://")


# ------------------------------------------------------------------ in-process workers, every backend


def test_every_way_of_enqueueing_is_signed_and_runs(signed: JobQueue, tmp_path: Path) -> None:
    store = Store(signed)
    tries: list[int] = []

    @signed.job(retries=2, backoff=0.01)
    def add(a: int, b: int = 0) -> int:
        tries.append(a)
        if a == 7 and tries.count(7) == 1:
            raise ConnectionError("first try of 7 fails")
        return a + b

    @signed.periodic(every=0.2, name="beat")
    def beat() -> str:
        return "beat"

    one = add.delay(1, b=1)
    later = add.enqueue(args=(2,), delay=0.3)
    retried = add.delay(7)
    many = add.enqueue_many([(3,), (4,)])
    with signed.batch(size=10):
        in_batch = add.delay(5)
    child = add.enqueue(args=(100,), after=[one])
    for h in (one, later, retried, *many, in_batch, child):
        assert is_signed(store.payload(h.id)), h
    with signed.worker(concurrency=2):
        assert [h.result(timeout=20) for h in (one, later, retried, *many, in_batch, child)] \
            == [2, 2, 7, 3, 4, 5, 102]
        wait_until(lambda: [r for r in signed.broker.list("succeeded", limit=1000)
                            if r.name == "beat"], timeout=20, message="a periodic job ran")
    assert retried.attempts == 2
    periodic = [r for r in signed.broker.list("succeeded", limit=1000) if r.name == "beat"]
    assert all(is_signed(store.payload(r.id)) and is_signed(store.result(r.id)) for r in periodic)
    assert signed.get(periodic[0].id).result(0) == "beat"
    assert is_signed(store.result(one.id))


def test_tampered_arguments_are_dead_lettered_never_run(signed: JobQueue, tmp_path: Path) -> None:
    store = Store(signed)
    ran: list[str] = []

    @signed.job(retries=3)
    def touch(path: str) -> str:
        ran.append(path)
        Path(path).touch()
        return path

    good = touch.delay(str(tmp_path / "good"))
    victim = touch.delay(str(tmp_path / "flipped"))
    store.set_payload(victim.id, flipped(store.payload(victim.id)))
    replaced = touch.delay(str(tmp_path / "replaced"))  # a real pickle, unsigned, in its place
    store.set_payload(replaced.id, attack_arguments(tmp_path / "pwned"))
    moved = touch.delay(str(tmp_path / "moved"))  # good's signed arguments, copied here
    store.set_payload(moved.id, store.payload(good.id))
    with signed.worker(pool="threads"):
        assert good.result(timeout=20) == str(tmp_path / "good")
        reasons = {h.id: dead_reason(signed, h.id) for h in (victim, replaced, moved)}
    assert reasons[victim.id].startswith(
        f"BadSignature: wrong signature on the arguments of job {victim.id} ")
    assert "matches none of this JobQueue's 1 secret(s)" in reasons[victim.id]
    assert reasons[replaced.id].startswith("BadSignature: no signature on the arguments")
    assert reasons[moved.id].startswith("BadSignature: wrong signature on the arguments")
    assert ran == [str(tmp_path / "good")]
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(JobFailed, match="BadSignature"):
        signed.get(replaced.id).result(0)


def test_unsigned_producer_and_wrong_secret_are_dead_lettered(app: JobQueue, signed: JobQueue,
                                                             tmp_path: Path) -> None:
    """The attacker enqueues through shoal itself, without the secret or with another."""
    @signed.job(name="victim.touch")
    def touch(path: object) -> None:
        if isinstance(path, str):
            Path(path).touch()

    unsigned_touch = app.job(name="victim.touch")(lambda path: None)
    attack = unsigned_touch.delay(TouchOnUnpickle(tmp_path / "pwned"))
    wrong = JobQueue(broker=app.broker, secret=OTHER_SECRET)
    wrong_touch = wrong.job(name="victim.touch")(lambda path: None)
    guessed = wrong_touch.delay(TouchOnUnpickle(tmp_path / "pwned2"))
    with signed.worker(pool="processes"):  # the child process gets nothing unverified either
        assert "no signature" in dead_reason(signed, attack.id)
        assert "matches none" in dead_reason(signed, guessed.id)
        touch.delay(str(tmp_path / "fine")).result(timeout=20)
    assert (tmp_path / "fine").exists()
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


def test_tampered_results_raise_bad_signature(signed: JobQueue, tmp_path: Path) -> None:
    store = Store(signed)

    @signed.job(retries=0)
    def value(x: int) -> int:
        return x

    @signed.job(retries=0)
    def fails() -> None:
        raise ValueError("its own error")

    a, b, c, bad = value.delay(1), value.delay(2), value.delay(3), fails.delay()
    with signed.worker():
        assert [h.result(timeout=20) for h in (a, b, c)] == [1, 2, 3]
        with pytest.raises(ValueError, match="its own error"):
            bad.result(timeout=20)
    store.set_result(a.id, flipped(store.result(a.id)))
    store.set_result(b.id, pickle.dumps(TouchOnUnpickle(tmp_path / "pwned")))
    store.set_result(c.id, store.result(bad.id))  # a signed blob, but another job's
    store.set_result(bad.id, flipped(store.result(bad.id)))
    with pytest.raises(BadSignature, match=f"wrong signature on the result of job {a.id} "):
        a.result(0)
    with pytest.raises(BadSignature, match=f"no signature on the result of job {b.id} "):
        signed.get(b.id).result(0)
    with pytest.raises(BadSignature, match="matches none"):
        c.result(0)
    with pytest.raises(BadSignature,
                       match="wrong signature on the exception of failed job .*ValueError: its own error"):
        bad.result(0)
    assert not (tmp_path / "pwned").exists()


def test_tampered_parent_result_dead_letters_the_child(signed: JobQueue, tmp_path: Path) -> None:
    store = Store(signed)

    @signed.job(queue="parents")
    def parent() -> int:
        return 1

    @signed.job(queue="children")
    def child(x: int) -> int:
        return x + 1

    p = parent.delay()
    c = child.enqueue(after=[p])
    with signed.worker(queues=["parents"]):
        p.result(timeout=20)
    store.set_result(p.id, pickle.dumps(TouchOnUnpickle(tmp_path / "pwned")))
    with signed.worker(queues=["children"]):
        reason = dead_reason(signed, c.id)
    assert reason.startswith(f"BadSignature: no signature on the result of parent job {p.id}")
    assert not (tmp_path / "pwned").exists()


def test_key_rotation(app: JobQueue) -> None:
    """Producers still on the old secret, workers with [new, old]: jobs run; results signed
    with the new one are read by producers that have both."""
    old = JobQueue(broker=app.broker, secret=SECRET)
    rotating_worker = JobQueue(broker=app.broker, secret=[OTHER_SECRET, SECRET])
    both = JobQueue(broker=app.broker, secret=[SECRET, OTHER_SECRET])
    for q in (old, rotating_worker, both):
        q.job(name="rot.double")(lambda x: 2 * x)
    handle = old.jobs["rot.double"].delay(21)
    with rotating_worker.worker():
        assert both.get(handle.id).result(timeout=20) == 42
    with pytest.raises(BadSignature):
        old.get(handle.id).result(0)  # the result is signed with the new secret only


def test_without_a_secret_it_runs_and_warns_once(app: JobQueue, signed: JobQueue,
                                                 caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "_warned_unsigned", False)
    add = app.job(name="plain.add")(lambda a, b: a + b)
    signed.job(name="plain.add")(lambda a, b: a + b)
    plain = add.delay(1, 2)
    from_signed = signed.jobs["plain.add"].delay(3, 4)  # an unsigned worker reads it too
    with caplog.at_level(logging.WARNING, logger="shoal.jobs.worker"):
        with app.worker():
            assert plain.result(timeout=20) == 3
            assert app.get(from_signed.id).result(timeout=20) == 7
        with app.worker():
            pass
    warnings = [r.getMessage() for r in caplog.records if "payloads are unsigned" in r.getMessage()]
    assert len(warnings) == 1
    assert "anyone who can write to the broker" in warnings[0] and ENV_VAR in warnings[0]
    with pytest.raises(BadSignature, match="no signature"):
        from_signed.result(0)  # its worker had no secret: the result is not signed


# ------------------------------------------------------------------ real worker processes


@pytest.fixture(params=["sqlite", "redis"])
def shared_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobQueue]:
    """A JobQueue without a secret on a fresh SQLite file or Redis prefix: a store that
    worker processes can share (not memory://)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = f"{request.getfixturevalue('redis_url')}?prefix=test-{uuid.uuid4().hex[:12]}"
    queue = JobQueue(url)
    yield queue
    if request.param == "redis":
        queue.broker.flush()  # type: ignore[attr-defined]
    queue.close()


@contextmanager
def job_worker(url: str, secret: str | None, stderr: Path) -> Iterator[subprocess.Popen[str]]:
    """``shoal jobs worker jobs_testapp:app`` with ``$SHOAL_JOBS_SECRET``, ready when yielded."""
    env = dict(os.environ, SHOAL_JOBS_TEST_URL=url, SHOAL_JOBS_TEST_LEASE="2",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop(ENV_VAR, None)
    if secret is not None:
        env[ENV_VAR] = secret
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from shoal.cli import main; main()", "jobs", "worker",
             "jobs_testapp:app", "--log-level", "warning", "--concurrency", "2"],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "ready" in line, f"worker did not start: {line!r} {stderr.read_text()}"
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def test_worker_process_dead_letters_every_attack(shared_app: JobQueue, tmp_path: Path) -> None:
    """A ``shoal jobs worker`` with the secret in its environment runs the signed job and
    dead-letters the rest, which the CLI shows with their reasons; nothing is unpickled."""
    app = shared_app
    producer = JobQueue(broker=app.broker, secret=SECRET)
    add = producer.job(name="jobs_testapp.add")(lambda a, b: a + b)
    attacker_add = app.job(name="jobs_testapp.add")(lambda a, b: a + b)
    store = Store(app)
    pwned = [tmp_path / f"pwned-{i}" for i in range(4)]

    good = add.delay(20, 22)
    flipped_job = add.delay(1, 1)
    store.set_payload(flipped_job.id, flipped(store.payload(flipped_job.id)))
    written = add.delay(2, 2)  # its envelope then rewritten with an unsigned pickle
    store.set_payload(written.id, attack_arguments(pwned[0]))
    unsigned = attacker_add.delay(TouchOnUnpickle(pwned[1]), 0)
    wrong_key = JobQueue(broker=app.broker, secret=OTHER_SECRET).job(
        name="jobs_testapp.add")(lambda a, b: a + b).delay(TouchOnUnpickle(pwned[2]), 0)
    attacks = {flipped_job.id: "wrong signature", written.id: "no signature",
               unsigned.id: "no signature", wrong_key.id: "wrong signature"}

    with job_worker(app.url, SECRET, tmp_path / "worker.err") as proc:
        assert good.result(timeout=30) == 42
        for job_id, why in attacks.items():
            reason = dead_reason(app, job_id)
            assert reason.startswith(f"BadSignature: {why} on the arguments of job {job_id} ")
        # the worker keeps serving after them
        assert add.delay(1, 2).result(timeout=30) == 3
        assert proc.poll() is None
    assert not any(p.exists() for p in pwned)
    assert "payloads are unsigned" not in (tmp_path / "worker.err").read_text()

    runner = CliRunner()
    dead = runner.invoke(main, ["jobs", "dead", app.url], catch_exceptions=False)
    assert dead.exit_code == 0
    lines = [line for line in dead.output.splitlines() if "BadSignature" in line]
    assert len(lines) == 4
    for job_id, why in attacks.items():  # the listing names the problem before it cuts
        assert any(line.startswith(job_id) and f"BadSignature: {why} on" in line for line in lines)
    status = runner.invoke(main, ["jobs", "status", app.url], catch_exceptions=False)
    assert "dead-letter list: 4 jobs" in status.output
    assert "BadSignature: 4" in status.output


def test_worker_process_without_secret_warns(shared_app: JobQueue, tmp_path: Path) -> None:
    app = shared_app
    add = app.job(name="jobs_testapp.add")(lambda a, b: a + b)
    with job_worker(app.url, None, tmp_path / "worker.err"):
        assert add.delay(1, 2).result(timeout=30) == 3
    err = (tmp_path / "worker.err").read_text()
    assert err.count("payloads are unsigned") == 1 and "anyone who can write" in err



def test_worker_process_with_the_wrong_secret_dead_letters(shared_app: JobQueue, tmp_path: Path) -> None:
    producer = JobQueue(broker=shared_app.broker, secret=SECRET)
    add = producer.job(name="jobs_testapp.add")(lambda a, b: a + b)
    handle = add.delay(1, 2)
    with job_worker(shared_app.url, OTHER_SECRET, tmp_path / "worker.err"):
        reason = dead_reason(shared_app, handle.id)
    assert reason.startswith(f"BadSignature: wrong signature on the arguments of job {handle.id}")
    assert "matches none of this JobQueue's 1 secret(s)" in reason
