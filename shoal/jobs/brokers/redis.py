"""``redis://host:6379/0``: the broker for many machines.

Every change is one Lua script, so it is atomic on the server: reserve (reclaim lapsed
leases, promote due delayed jobs, lease the best ready ones), renew, ack (and release the
children), fail, release, cancel, retry, purge. The scripts live in ``lua/``, each
prefixed with ``common.lua``.

Keys, all under one hash tag ``{PREFIX}`` (``?prefix=`` in the URL, default
``shoal.jobs``): ``job:ID`` (hash), ``msg:ID`` (the envelope, kept apart so the hash stays
compact), ``ready:QUEUE`` (sorted by priority then arrival),
``delayed`` (by eta), ``leases`` (by lease end), ``waiting``, ``finished``, ``dead`` (by
time), ``expiry`` (finished jobs with a ``result_ttl``, by when they expire: every write
script deletes up to 100 due ones), ``children:ID`` (set), ``keys`` (idempotency key ->
id), ``counts`` (per queue and status), ``schedules``, ``limit:tat`` (per limit key, the
earliest next start), ``limit:running:KEY`` (running jobs of a concurrency-limited key,
pruned when read), and ``wake:QUEUE`` (a short list an idle worker blocks on).

Durability is Redis's: run it with ``appendonly yes``. Leases are judged by the clocks of
the workers (keep them synchronised), so a test can drive them with a fake clock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import redis
from redis.commands.core import Script

from ..broker import ENQUEUE_CHUNK, Broker, Clock, check_parents
from ..errors import BrokerUnavailable
from ..message import Delivery, Filter, JobMessage, JobRecord, Records, encode

T = TypeVar("T")

_SCRIPTS = ("enqueue", "enqueue_many", "reserve", "renew", "ack", "fail", "release", "cancel", "retry",
            "purge", "advance")
_packer = msgspec.msgpack.Encoder()
_TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _lua(name: str) -> str:
    folder = resources.files("shoal.jobs.brokers") / "lua"
    return (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


def _split_prefix(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    prefix = next((v for k, v in query if k == "prefix"), "shoal.jobs")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def _s(value: bytes | None) -> str | None:
    return None if value is None or value == b"" else value.decode()


def _f(value: bytes | None) -> float | None:
    return None if value is None or value == b"" else float(value)


def _extra(m: JobMessage) -> tuple[str, ...]:
    """The optional fields of ``m`` as the scripts take them ('' = unset; common.lua)."""
    def text(value: float | int | str | None) -> str:
        return "" if value is None else repr(value) if isinstance(value, float) else str(value)

    return (text(m.result_ttl), "" if m.key_until == "forever" else m.key_until,
            text(m.key_expires), m.limit_key or "", text(m.rate), text(m.max_concurrency))


class RedisBroker(Broker):
    def __init__(self, url: str, clock: Clock = time.time, socket_timeout: float = 10.0) -> None:
        super().__init__(clock)
        self.url = url
        plain, prefix = _split_prefix(url)
        self.prefix = prefix
        self.ns = "{" + prefix + "}"
        #: typed Any: redis-py's own annotations are unions of sync and async results
        self.redis: Any = redis.Redis.from_url(plain, socket_timeout=socket_timeout,
                                          socket_connect_timeout=5.0, health_check_interval=30)
        self._scripts: dict[str, Script] = {n: self.redis.register_script(_lua(n)) for n in _SCRIPTS}
        #: idle connections for `_run` (list append and pop are atomic: no lock)
        self._conns: list[Any] = []
        self._pid = os.getpid()

    def _run(self, name: str, *args: Any) -> Any:
        """Run script ``name`` on a connection of our own: straight ``EVALSHA`` and read,
        a fifth of the CPU of redis-py's client path (per-call retries, pool bookkeeping,
        metrics), which was most of a job worker's time per job. A dropped connection is
        retried once on a new one, as redis-py would (every script is safe to run again:
        enqueue checks the id, ack/fail/release check the token, a lost reserve's leases
        lapse); a second failure raises `BrokerUnavailable`."""
        script = self._scripts[name]
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours
            self._pid, self._conns = os.getpid(), []
        for attempt in (1, 2):
            try:
                conn = self._conns.pop()
            except IndexError:
                conn = self.redis.connection_pool.make_connection()
            try:
                try:
                    conn.send_command("EVALSHA", script.sha, 1, self.ns, *args)
                    reply = conn.read_response()
                except redis.exceptions.NoScriptError:  # the server restarted, or SCRIPT FLUSH
                    conn.send_command("SCRIPT", "LOAD", script.script)
                    conn.read_response()
                    conn.send_command("EVALSHA", script.sha, 1, self.ns, *args)
                    reply = conn.read_response()
            except redis.exceptions.ResponseError:
                self._conns.append(conn)  # an error reply, read whole: the connection is fine
                raise
            except BaseException as exc:
                conn.disconnect()  # maybe mid-reply: it reconnects on its next use
                self._conns.append(conn)
                if not isinstance(exc, _TRANSIENT):
                    raise
                if attempt == 2:
                    raise BrokerUnavailable(f"{self.url}: {exc}") from exc
                continue
            self._conns.append(conn)
            return reply
        raise AssertionError("unreachable")

    def _do(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"{self.url}: {exc}") from exc

    def _k(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def close(self) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.disconnect()
        self.redis.close()
        self.redis.connection_pool.disconnect()

    # ---------------------------------------------------------------- producing

    def enqueue(self, message: JobMessage) -> tuple[str, bool]:
        try:
            job_id, created = self._run(
                "enqueue", message.id, message.name, message.queue, message.priority,
                repr(max(message.eta, 0.0)), message.max_attempts, message.key or "",
                ",".join(message.parents), encode(message), repr(self.clock()), *_extra(message))
        except redis.exceptions.ResponseError as exc:
            if "unknown parent job" in str(exc):
                raise KeyError(str(exc).split("unknown parent job", 1)[1].strip()) from None
            raise
        return job_id.decode(), bool(created)

    def enqueue_many(self, messages: Sequence[JobMessage]) -> list[tuple[str, bool]]:
        """One script call per `ENQUEUE_CHUNK` messages, each atomic. Parents outside the
        batch are checked first (one pipelined round trip), so that an unknown one stores
        nothing even when the batch spans chunks."""
        if any(m.parents for m in messages):
            def exist(ids: list[str]) -> list[bool]:
                def ask() -> list[int]:
                    pipe = self.redis.pipeline(transaction=False)
                    for job_id in ids:
                        pipe.exists(self._k("job", job_id))
                    return pipe.execute()  # type: ignore[no-any-return]
                return [bool(n) for n in self._do(ask)]
            check_parents(messages, exist)
        out: list[tuple[str, bool]] = []
        for start in range(0, len(messages), ENQUEUE_CHUNK):
            chunk = messages[start:start + ENQUEUE_CHUNK]
            headers = _packer.encode([
                (m.id, m.name, m.queue, str(m.priority), repr(max(m.eta, 0.0)), str(m.max_attempts),
                 m.key or "", ",".join(m.parents), *_extra(m)) for m in chunk])
            args: list[Any] = [repr(self.clock()), headers, *map(encode, chunk)]
            try:
                flat = self._run("enqueue_many", *args)
            except redis.exceptions.ResponseError as exc:
                if "unknown parent job" in str(exc):
                    raise KeyError(str(exc).split("unknown parent job", 1)[1].strip()) from None
                raise
            out += [(flat[i].decode(), bool(flat[i + 1])) for i in range(0, len(flat), 2)]
        return out

    # ---------------------------------------------------------------- consuming

    def reserve(self, queues: Sequence[str], worker: str, lease: float, limit: int) -> list[Delivery]:
        if limit <= 0 or not queues:
            return []
        now = self.clock()
        flat = self._run("reserve", repr(now), repr(lease), worker, limit, *queues)
        return [Delivery(flat[i].decode(), int(flat[i + 1]), int(flat[i + 2]), bytes(flat[i + 3]))
                for i in range(0, len(flat), 4)]

    def renew(self, worker: str, held: dict[str, int], lease: float) -> set[str]:
        args: list[Any] = [repr(self.clock()), repr(lease)]
        for job_id, token in held.items():
            args += [job_id, token]
        return {x.decode() for x in self._run("renew", *args)}

    def ack(self, job_id: str, token: int, result: bytes) -> bool:
        return bool(self._run("ack", job_id, token, result, repr(self.clock())))

    def fail(self, job_id: str, token: int, error: str, traceback: str | None,
             exception: bytes | None, retry_at: float | None) -> bool:
        return bool(self._run("fail", job_id, token, error, traceback or "", exception or b"",
                              "" if retry_at is None else repr(retry_at), repr(self.clock())))

    def release(self, job_id: str, token: int) -> bool:
        return bool(self._run("release", job_id, token, repr(self.clock())))

    def wait_for_work(self, queues: Sequence[str], timeout: float) -> None:
        if timeout < 0.01:
            time.sleep(timeout)
            return
        keys = [self._k("wake", q) for q in queues]
        self._do(lambda: self.redis.blpop(keys, timeout=timeout))

    # ---------------------------------------------------------------- managing

    def _record(self, fields: dict[bytes, bytes], now: float) -> JobRecord:
        g = fields.get
        status = (g(b"status") or b"queued").decode()
        eta = _f(g(b"eta")) or 0.0
        if status == "scheduled" and eta <= now:
            status = "queued"
        return JobRecord(
            id=(g(b"id") or b"").decode(), name=(g(b"name") or b"").decode(),
            queue=(g(b"queue") or b"").decode(), status=status,  # type: ignore[arg-type]
            priority=int(g(b"priority") or 0), attempts=int(g(b"attempts") or 0),
            max_attempts=int(g(b"max_attempts") or 1), eta=eta, created=_f(g(b"created")) or 0.0,
            finished=_f(g(b"finished")), last_error=_s(g(b"last_error")),
            traceback=_s(g(b"traceback")), result=g(b"result") or None,
            dead=g(b"dead") == b"1", parents=tuple(p for p in (_s(g(b"parents")) or "").split(",") if p),
            key=_s(g(b"key")), worker=_s(g(b"worker")), result_ttl=_f(g(b"result_ttl")),
            started=_f(g(b"started")),
        )

    def get(self, job_id: str) -> JobRecord | None:
        fields = self._do(lambda: self.redis.hgetall(self._k("job", job_id)))
        return self._record(fields, self.clock()) if fields else None

    def get_many(self, job_ids: Iterable[str]) -> list[JobRecord | None]:
        ids = list(job_ids)

        def fetch() -> list[dict[bytes, bytes]]:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self._k("job", job_id))
            return pipe.execute()  # type: ignore[no-any-return]

        now = self.clock()
        return [self._record(f, now) if f else None for f in self._do(fetch)]

    def cancel(self, job_id: str) -> bool:
        return bool(self._run("cancel", job_id, repr(self.clock())))

    def cancelled(self, job_ids: Sequence[str]) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()

        def ask() -> list[bytes | None]:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(self._k("job", job_id), "status")
            return pipe.execute()  # type: ignore[no-any-return]

        return {i for i, s in zip(ids, self._do(ask)) if s == b"cancelled"}

    def retry(self, job_id: str) -> bool:
        return bool(self._run("retry", job_id, repr(self.clock())))

    def _queues(self) -> list[str]:
        fields = self._do(lambda: self.redis.hkeys(self._k("counts")))
        return sorted({f.decode().rpartition("|")[0] for f in fields})

    def list(self, status: Filter | None = None, queue: str | None = None,
             limit: int = 100) -> Records:
        r = self.redis
        if status in ("dead", "succeeded", "failed", "cancelled"):
            return self._list_finished(status, queue, limit)
        if status is None:
            ids = self._do(lambda: r.zrevrange(self._k("finished"), 0, -1))
        elif status == "running":
            ids = self._do(lambda: r.zrange(self._k("leases"), 0, -1))
        elif status == "scheduled":
            ids = self._do(lambda: r.zrange(self._k("delayed"), 0, -1))
        elif status == "waiting":
            ids = self._do(lambda: r.zrange(self._k("waiting"), 0, -1))
        else:
            ids = []
            for q in ([queue] if queue else self._queues()):
                ids += self._do(lambda q=q: r.zrange(self._k("ready", q), 0, -1))  # type: ignore[misc]
        if status is None:
            ids = list(ids)
            for extra in ("leases", "delayed", "waiting"):
                ids += self._do(lambda e=extra: r.zrange(self._k(e), 0, -1))  # type: ignore[misc]
            for q in ([queue] if queue else self._queues()):
                ids += self._do(lambda q=q: r.zrange(self._k("ready", q), 0, -1))  # type: ignore[misc]
        out: list[JobRecord] = []
        now = self.clock()
        for start in range(0, len(ids), 500):
            for record in self.get_many(i.decode() for i in ids[start:start + 500]):
                if record is None or (queue is not None and record.queue != queue):
                    continue
                if record.expired(now):
                    continue
                if status not in (None, "dead") and record.status != status:
                    continue
                out.append(record)
                if len(out) >= limit:
                    return out
        return out

    def _list_finished(self, status: Filter, queue: str | None, limit: int) -> Records:
        """Finished jobs in ``status``, newest first, read a page of the index at a time
        (the history can be long; the dashboard asks for the latest often)."""
        index = self._k("dead" if status == "dead" else "finished")
        out: list[JobRecord] = []
        now = self.clock()
        start, page = 0, 500
        while len(out) < limit:
            ids = self._do(lambda: self.redis.zrevrange(index, start, start + page - 1))
            if not ids:
                break
            start += page
            for record in self.get_many(i.decode() for i in ids):
                if record is None or record.expired(now):
                    continue
                if (queue is not None and record.queue != queue) or (
                        status != "dead" and record.status != status):
                    continue
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    def dead(self, limit: int = 100) -> Records:
        return self.list("dead", limit=limit)

    def dead_count(self) -> int:
        return int(self._do(lambda: self.redis.zcard(self._k("dead"))))

    def counts(self) -> dict[str, dict[str, int]]:
        fields = self._do(lambda: self.redis.hgetall(self._k("counts")))
        out: dict[str, dict[str, int]] = {}
        for field, n in fields.items():
            queue, _, status = field.decode().rpartition("|")
            if int(n) > 0 and status != "new":
                out.setdefault(queue, {})[status] = int(n)
        # "scheduled" jobs whose eta has passed are queued (promotion is lazy).
        due = self._do(lambda: self.redis.zrangebyscore(self._k("delayed"), "-inf", self.clock()))
        for record in self.get_many(i.decode() for i in due):
            if record is not None:
                per = out.setdefault(record.queue, {})
                per["scheduled"] = per.get("scheduled", 0) - 1
                per["queued"] = per.get("queued", 0) + 1
                if per["scheduled"] <= 0:
                    del per["scheduled"]
        return out

    def purge(self, queue: str | None = None, finished_before: float | None = None,
              pending: bool = False) -> int:
        return int(self._run("purge", queue or "", "" if finished_before is None else repr(finished_before),
                             "1" if pending else "0"))

    # ---------------------------------------------------------------- schedules

    def schedule_last(self, name: str) -> float | None:
        return _f(self._do(lambda: self.redis.hget(self._k("schedules"), name)))

    def schedule_advance(self, name: str, slot: float) -> None:
        self._run("advance", name, repr(slot))

    # ---------------------------------------------------------------- testing

    def flush(self) -> None:
        """Delete every key of this broker's prefix (tests)."""
        def drop() -> None:
            keys = list(self.redis.scan_iter(match=self.ns + ":*", count=1000))
            for i in range(0, len(keys), 1000):
                self.redis.delete(*keys[i:i + 1000])

        self._do(drop)
