"""``sqlite:///path/to/jobs.db``: the embedded broker, for one machine and many processes.

One table of jobs (indexed by what reservation looks for), one of parent -> child edges,
one of schedule slots. WAL mode, so readers never block; every change is one
``BEGIN IMMEDIATE`` transaction, so two workers can never reserve the same job, and a
process killed at any moment leaves the database as it was before or after a whole call.
``synchronous=NORMAL``: safe against a crashed process; a power cut may lose the last
transactions (use ``?synchronous=FULL`` in the URL to pay for that too).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs

from ..broker import Broker, Clock
from ..errors import BrokerUnavailable
from ..message import FINISHED, Delivery, Filter, JobMessage, JobRecord, Records, encode
from ..policy.keys import key_holds
from ..policy.limits import CONCURRENCY_RECHECK, MAX_HELD_BACK, next_start

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    queue TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    eta REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    token INTEGER NOT NULL DEFAULT 0,
    lease REAL,
    worker TEXT,
    pending INTEGER NOT NULL DEFAULT 0,
    failed_by TEXT,
    created REAL NOT NULL,
    finished REAL,
    last_error TEXT,
    traceback TEXT,
    result BLOB,
    dead INTEGER NOT NULL DEFAULT 0,
    key TEXT UNIQUE,
    parents TEXT NOT NULL DEFAULT '',
    message BLOB NOT NULL,
    result_ttl REAL,
    key_until TEXT,
    key_expires REAL,
    limit_key TEXT,
    rate REAL,
    max_concurrency INTEGER,
    started REAL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(queue, priority DESC, eta) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs(lease) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS jobs_dead ON jobs(finished) WHERE dead = 1;
DROP INDEX IF EXISTS jobs_status;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(status, queue, eta);
CREATE TABLE IF NOT EXISTS edges (
    parent TEXT NOT NULL,
    child TEXT NOT NULL,
    PRIMARY KEY (parent, child)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, last REAL NOT NULL);
CREATE TABLE IF NOT EXISTS limits (key TEXT PRIMARY KEY, tat REAL NOT NULL) WITHOUT ROWID;
"""

# Columns added since the first schema (an older database gets them at open), and the
# indexes over them.
_ADDED = (("result_ttl", "REAL"), ("key_until", "TEXT"), ("key_expires", "REAL"),
          ("limit_key", "TEXT"), ("rate", "REAL"), ("max_concurrency", "INTEGER"),
          ("started", "REAL"))
_ADDED_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs(finished + result_ttl)
    WHERE result_ttl IS NOT NULL AND finished IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_limited ON jobs(limit_key)
    WHERE status = 'running' AND limit_key IS NOT NULL;
"""
_EXPIRED = "result_ttl IS NOT NULL AND finished IS NOT NULL AND finished + result_ttl <= ?"

# Jobs per (queue, status), kept by triggers in the transaction that changes a job, so that
# `counts` (``shoal jobs status``) reads a few rows however deep the queue is. Created with
# the rows an older database already holds.
_COUNTS = (
    "CREATE TABLE counts (queue TEXT NOT NULL, status TEXT NOT NULL, n INTEGER NOT NULL, "
    "PRIMARY KEY (queue, status)) WITHOUT ROWID",
    "INSERT INTO counts (queue, status, n) SELECT queue, status, COUNT(*) FROM jobs "
    "GROUP BY queue, status",
    "CREATE TRIGGER jobs_counted AFTER INSERT ON jobs BEGIN "
    "INSERT INTO counts (queue, status, n) VALUES (new.queue, new.status, 1) "
    "ON CONFLICT (queue, status) DO UPDATE SET n = n + 1; END",
    "CREATE TRIGGER jobs_recounted AFTER UPDATE OF status ON jobs "
    "WHEN old.status <> new.status BEGIN "
    "UPDATE counts SET n = n - 1 WHERE queue = old.queue AND status = old.status; "
    "INSERT INTO counts (queue, status, n) VALUES (new.queue, new.status, 1) "
    "ON CONFLICT (queue, status) DO UPDATE SET n = n + 1; END",
    "CREATE TRIGGER jobs_uncounted AFTER DELETE ON jobs BEGIN "
    "UPDATE counts SET n = n - 1 WHERE queue = old.queue AND status = old.status; END",
)

_INSERT = ("INSERT INTO jobs (id, name, queue, status, priority, eta, max_attempts, pending, "
           "failed_by, created, finished, last_error, key, parents, message, result_ttl, "
           "key_until, key_expires, limit_key, rate, max_concurrency) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

_COLUMNS = ("id, name, queue, status, priority, attempts, max_attempts, eta, created, finished, "
            "last_error, traceback, result, dead, parents, key, worker, result_ttl, started")


def _extra(m: JobMessage) -> tuple[Any, ...]:
    """The values of the columns `_ADDED` for message ``m``."""
    return (m.result_ttl, None if m.key_until == "forever" else m.key_until, m.key_expires,
            m.limit_key, m.rate, m.max_concurrency)


def _path_of(url: str) -> tuple[str, dict[str, str]]:
    rest = url[len("sqlite://"):]
    path, _, query = rest.partition("?")
    if not path.startswith("/") or path in ("/", "/:memory:"):
        raise ValueError(f"{url!r}: use sqlite:///relative.db or sqlite:////absolute/path.db")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    return path[1:], options


class SQLiteBroker(Broker):
    def __init__(self, url: str, clock: Clock = time.time, timeout: float = 30.0) -> None:
        super().__init__(clock)
        self.url = url
        self.path, options = _path_of(url)
        self.synchronous = options.get("synchronous", "NORMAL").upper()
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        try:
            self._conn().executescript(_SCHEMA)
            with self._transaction() as db:
                have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
                for column, kind in _ADDED:
                    if column not in have:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            self._conn().executescript(_ADDED_INDEXES)
            with self._transaction() as db:
                if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                              "AND name = 'counts'").fetchone() is None:
                    for statement in _COUNTS:
                        db.execute(statement)
        except sqlite3.OperationalError as exc:
            raise BrokerUnavailable(f"{url}: {exc}") from exc

    # ---------------------------------------------------------------- plumbing

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or self._pid != os.getpid():
            if self._pid != os.getpid():  # forked: the parent's connections are not ours
                self._pid, self._all = os.getpid(), []
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise BrokerUnavailable(f"{self.url}: {exc}") from exc
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            conn.execute("ROLLBACK")
            raise BrokerUnavailable(f"{self.url}: {exc}") from exc

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._conn())
        except sqlite3.OperationalError as exc:
            raise BrokerUnavailable(f"{self.url}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _record(row: Sequence[Any], now: float) -> JobRecord:
        (id_, name, queue, status, priority, attempts, max_attempts, eta, created, finished,
         last_error, traceback, result, dead, parents, key, worker, result_ttl, started) = row
        if status == "queued" and eta > now:
            status = "scheduled"
        return JobRecord(id=id_, name=name, queue=queue, status=status, priority=priority,
                         attempts=attempts, max_attempts=max_attempts, eta=eta, created=created,
                         finished=finished, last_error=last_error, traceback=traceback,
                         result=result, dead=bool(dead),
                         parents=tuple(p for p in parents.split(",") if p), key=key,
                         worker=worker, result_ttl=result_ttl, started=started)

    @staticmethod
    def _finish_children(db: sqlite3.Connection, job_id: str, status: str, reason: str,
                         now: float) -> None:
        stack = [(job_id, reason)]
        while stack:
            parent, why = stack.pop()
            children = [r[0] for r in db.execute(
                "SELECT j.id FROM edges e JOIN jobs j ON j.id = e.child "
                "WHERE e.parent = ? AND j.status = 'waiting'", (parent,))]
            for child in children:
                db.execute("UPDATE jobs SET status = ?, finished = ?, last_error = ?, failed_by = ? "
                           "WHERE id = ?", (status, now, why, parent, child))
                stack.append((child, why))

    def _fail_dead(self, db: sqlite3.Connection, job_id: str, name: str, error: str,
                   traceback: str | None, exception: bytes | None, now: float) -> None:
        db.execute("UPDATE jobs SET status = 'failed', dead = 1, finished = ?, worker = NULL, "
                   "lease = NULL, last_error = ?, traceback = ?, result = ?, token = token + 1 "
                   "WHERE id = ?", (now, error, traceback, exception, job_id))
        self._finish_children(db, job_id, "failed",
                              f"ParentFailed: parent job {job_id} ({name}) failed: {error}", now)

    def _reclaim(self, db: sqlite3.Connection, now: float) -> None:
        # INDEXED BY: with many jobs running, the planner would rather scan jobs_state.
        lapsed = db.execute("SELECT id, name, attempts, max_attempts, worker FROM jobs "
                            "INDEXED BY jobs_leases WHERE status = 'running' AND lease <= ?",
                            (now,)).fetchall()
        for job_id, name, attempts, max_attempts, worker in lapsed:
            error = f"WorkerLost: worker {worker} stopped renewing its lease (attempt {attempts})"
            if attempts >= max_attempts:
                self._fail_dead(db, job_id, name, error, None, None, now)
            else:
                db.execute("UPDATE jobs SET status = 'queued', eta = ?, worker = NULL, lease = NULL, "
                           "last_error = ?, token = token + 1 WHERE id = ?", (now, error, job_id))

    # ---------------------------------------------------------------- producing

    def enqueue(self, message: JobMessage) -> tuple[str, bool]:
        with self._transaction() as db:
            now = self.clock()
            self._sweep(db, now)
            return self._enqueue(db, message, now)

    def enqueue_many(self, messages: Sequence[JobMessage]) -> list[tuple[str, bool]]:
        """One transaction (an unknown parent rolls it all back). Runs of messages with
        no key and no parents go in with one ``executemany``."""
        out: list[tuple[str, bool]] = []
        if not messages:
            return out
        with self._transaction() as db:
            now = self.clock()
            self._sweep(db, now)
            plain: list[tuple[Any, ...]] = []
            for m in messages:
                if m.key is None and not m.parents:
                    plain.append((m.id, m.name, m.queue, "queued", m.priority, max(m.eta, 0.0),
                                  m.max_attempts, 0, None, now, None, None, None, "", encode(m),
                                  *_extra(m)))
                    out.append((m.id, True))
                    continue
                if plain:  # in order: a later message may name these as parents
                    db.executemany(_INSERT, plain)
                    plain = []
                out.append(self._enqueue(db, m, now))
            if plain:
                db.executemany(_INSERT, plain)
        return out

    def _enqueue(self, db: sqlite3.Connection, message: JobMessage, now: float) -> tuple[str, bool]:
        if message.key is not None:
            row = db.execute("SELECT id, status, eta, finished, result_ttl, key_until, key_expires "
                             "FROM jobs WHERE key = ?", (message.key,)).fetchone()
            if row is not None:
                old, status, eta, finished, ttl, until, expires = row
                if status == "queued" and eta > now:
                    status = "scheduled"
                if key_holds(status, finished, ttl, until or "forever", expires, now):
                    return str(old), False
                # Its key no longer holds: the new job takes it over.
                db.execute("UPDATE jobs SET key = NULL WHERE id = ?", (old,))
        status, pending, finished, error, failed_by = "queued", 0, None, None, None
        for pid in message.parents:
            row = db.execute("SELECT status, name, last_error FROM jobs WHERE id = ?",
                             (pid,)).fetchone()
            if row is None:
                raise KeyError(f"unknown parent job {pid!r}")
            p_status, p_name, p_error = row
            if p_status != "succeeded":
                pending += 1
            if p_status in ("failed", "cancelled") and failed_by is None:
                failed_by, finished, status = pid, now, p_status
                error = (f"ParentFailed: parent job {pid} ({p_name}) failed: {p_error}"
                         if p_status == "failed"
                         else f"ParentCancelled: parent job {pid} ({p_name}) was cancelled")
        if failed_by is None and pending:
            status = "waiting"
        db.execute(_INSERT, (message.id, message.name, message.queue, status, message.priority,
                             max(message.eta, 0.0), message.max_attempts, pending, failed_by, now,
                             finished, error, message.key, ",".join(message.parents),
                             encode(message), *_extra(message)))
        db.executemany("INSERT OR IGNORE INTO edges (parent, child) VALUES (?, ?)",
                       [(pid, message.id) for pid in message.parents])
        return message.id, True

    # ---------------------------------------------------------------- consuming

    def reserve(self, queues: Sequence[str], worker: str, lease: float, limit: int) -> list[Delivery]:
        if limit <= 0 or not queues:
            return []
        now = self.clock()
        marks = ",".join("?" * len(queues))

        def anything(db: sqlite3.Connection) -> bool:
            # A cheap read first: an idle worker polling never takes the write lock.
            row = db.execute(
                f"SELECT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_ready WHERE status = 'queued' "
                f"AND queue IN ({marks}) AND eta <= ?) OR EXISTS (SELECT 1 FROM jobs INDEXED BY "
                "jobs_leases WHERE status = 'running' AND lease <= ?) OR EXISTS (SELECT 1 FROM jobs "
                f"INDEXED BY jobs_expiry WHERE {_EXPIRED})", (*queues, now, now, now)).fetchone()
            return bool(row[0])

        if not self._read(anything):
            return []
        out: list[Delivery] = []
        with self._transaction() as db:
            now = self.clock()
            self._sweep(db, now)
            self._reclaim(db, now)
            held_back = 0
            while len(out) < limit and held_back < MAX_HELD_BACK:
                want = limit - len(out)
                candidates: list[tuple[Any, ...]] = []
                for q in queues:
                    candidates += db.execute(
                        # The ready index gives them in order: the first `want` due ones are
                        # read, however deep the queue (the planner alone would sort them all).
                        "SELECT -priority, eta, rowid, id, limit_key, rate, max_concurrency "
                        "FROM jobs INDEXED BY jobs_ready "
                        "WHERE status = 'queued' AND queue = ? AND eta <= ? "
                        "ORDER BY priority DESC, eta, rowid LIMIT ?",
                        (q, now, want)).fetchall()
                candidates.sort()
                before = held_back
                for *_, job_id, limit_key, rate, max_concurrency in candidates[:want]:
                    if limit_key is not None:
                        wait = self._limited(db, limit_key, rate, max_concurrency, now)
                        if wait is not None:  # over its limit: it waits, others go ahead
                            db.execute("UPDATE jobs SET eta = ? WHERE id = ?", (wait, job_id))
                            held_back += 1
                            continue
                    token, attempts, data = db.execute(
                        "UPDATE jobs SET status = 'running', worker = ?, lease = ?, started = ?, "
                        "attempts = attempts + 1, token = token + 1 WHERE id = ? "
                        "RETURNING token, attempts, message",
                        (worker, now + lease, now, job_id)).fetchone()
                    out.append(Delivery(job_id, token, attempts, data))
                if held_back == before:  # nothing passed by: no more to look at
                    break
        return out

    @staticmethod
    def _limited(db: sqlite3.Connection, limit_key: str, rate: float | None,
                 max_concurrency: int | None, now: float) -> float | None:
        """None if a job under ``limit_key`` may start now (its start is counted), else
        when to look at it again (see `policy.limits`)."""
        if max_concurrency is not None:
            (running,) = db.execute("SELECT COUNT(*) FROM jobs INDEXED BY jobs_limited WHERE "
                                    "status = 'running' AND limit_key = ?", (limit_key,)).fetchone()
            if running >= max_concurrency:
                return now + CONCURRENCY_RECHECK
        if rate is not None:
            row = db.execute("SELECT tat FROM limits WHERE key = ?", (limit_key,)).fetchone()
            ok, when = next_start(None if row is None else row[0], now, rate)
            if not ok:
                return when
            db.execute("INSERT INTO limits (key, tat) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                       "SET tat = excluded.tat", (limit_key, when))
        return None

    @staticmethod
    def _sweep(db: sqlite3.Connection, now: float) -> None:
        """Delete up to 100 finished jobs whose ``result_ttl`` has passed (reserve and ack
        call this: expiry needs no process of its own)."""
        ids = [r[0] for r in db.execute(f"SELECT id FROM jobs INDEXED BY jobs_expiry WHERE "
                                        f"{_EXPIRED} LIMIT 100", (now,))]
        if ids:
            marks = ",".join("?" * len(ids))
            db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
            db.execute(f"DELETE FROM edges WHERE child IN ({marks})", ids)

    def renew(self, worker: str, held: dict[str, int], lease: float) -> set[str]:
        lost: set[str] = set()
        with self._transaction() as db:
            until = self.clock() + lease
            for job_id, token in held.items():
                cur = db.execute("UPDATE jobs SET lease = ? WHERE id = ? AND token = ? "
                                 "AND status = 'running'", (until, job_id, token))
                if cur.rowcount == 0:
                    lost.add(job_id)
        return lost

    def ack(self, job_id: str, token: int, result: bytes) -> bool:
        with self._transaction() as db:
            now = self.clock()
            self._sweep(db, now)
            cur = db.execute(
                "UPDATE jobs SET status = 'succeeded', result = ?, finished = ?, worker = NULL, "
                "lease = NULL, token = token + 1 WHERE id = ? AND status NOT IN "
                "('succeeded', 'failed', 'cancelled')", (result, now, job_id))
            if cur.rowcount == 0:
                return False
            # "+status": look the children up by id, not by scanning every waiting job.
            children = "SELECT child FROM edges WHERE parent = ?"
            db.execute(f"UPDATE jobs SET pending = pending - 1 WHERE +status = 'waiting' "
                       f"AND id IN ({children})", (job_id,))
            db.execute(f"UPDATE jobs SET status = 'queued', eta = MAX(eta, ?) WHERE "
                       f"+status = 'waiting' AND pending <= 0 AND id IN ({children})", (now, job_id))
            return True

    def fail(self, job_id: str, token: int, error: str, traceback: str | None,
             exception: bytes | None, retry_at: float | None) -> bool:
        with self._transaction() as db:
            now = self.clock()
            row = db.execute("SELECT name FROM jobs WHERE id = ? AND token = ? AND status = 'running'",
                             (job_id, token)).fetchone()
            if row is None:
                return False
            if retry_at is None:
                self._fail_dead(db, job_id, row[0], error, traceback, exception, now)
            else:
                db.execute("UPDATE jobs SET status = 'queued', eta = ?, worker = NULL, lease = NULL, "
                           "last_error = ?, traceback = ?, token = token + 1 WHERE id = ?",
                           (retry_at, error, traceback, job_id))
            return True

    def release(self, job_id: str, token: int) -> bool:
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'queued', eta = ?, worker = NULL, lease = NULL, "
                "attempts = MAX(0, attempts - 1), token = token + 1 "
                "WHERE id = ? AND token = ? AND status = 'running'", (self.clock(), job_id, token))
            return cur.rowcount == 1

    # ---------------------------------------------------------------- managing

    def get(self, job_id: str) -> JobRecord | None:
        now = self.clock()
        row = self._read(lambda db: db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?",
                                               (job_id,)).fetchone())
        return None if row is None else self._record(row, now)

    def cancel(self, job_id: str) -> bool:
        with self._transaction() as db:
            now = self.clock()
            row = db.execute("SELECT name, status, worker, attempts FROM jobs WHERE id = ? "
                             "AND status IN ('waiting', 'queued', 'running')", (job_id,)).fetchone()
            if row is None:
                return False
            error = (f"Cancelled: while running on worker {row[2]} (attempt {row[3]})"
                     if row[1] == "running" else None)
            db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, worker = NULL, "
                       "lease = NULL, last_error = COALESCE(?, last_error), token = token + 1 "
                       "WHERE id = ?", (now, error, job_id))
            self._finish_children(db, job_id, "cancelled", f"ParentCancelled: parent job {job_id} "
                                  f"({row[0]}) was cancelled", now)
            return True

    def cancelled(self, job_ids: Sequence[str]) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        rows = self._read(lambda db: db.execute(
            f"SELECT id FROM jobs WHERE id IN ({marks}) AND status = 'cancelled'", ids).fetchall())
        return {r[0] for r in rows}

    def retry(self, job_id: str) -> bool:
        with self._transaction() as db:
            now = self.clock()
            cur = db.execute("UPDATE jobs SET status = 'queued', dead = 0, attempts = 0, eta = ?, "
                             "finished = NULL, result = NULL, token = token + 1 "
                             "WHERE id = ? AND dead = 1", (now, job_id))
            if cur.rowcount == 0:
                return False
            stack = [job_id]
            while stack:
                parent = stack.pop()
                for (child, parents) in db.execute(
                        "SELECT id, parents FROM jobs WHERE failed_by = ? AND dead = 0 "
                        "AND status IN ('failed', 'cancelled')", (parent,)).fetchall():
                    ids = [p for p in parents.split(",") if p]
                    marks = ",".join("?" * len(ids))
                    statuses = [r[0] for r in db.execute(
                        f"SELECT status FROM jobs WHERE id IN ({marks})", ids)]
                    if len(statuses) < len(ids) or any(s in ("failed", "cancelled") for s in statuses):
                        continue
                    pending = sum(1 for s in statuses if s != "succeeded")
                    db.execute("UPDATE jobs SET status = 'waiting', failed_by = NULL, finished = NULL, "
                               "last_error = NULL, pending = ? WHERE id = ?", (pending, child))
                    stack.append(child)
            return True

    def list(self, status: Filter | None = None, queue: str | None = None,
             limit: int = 100) -> Records:
        now = self.clock()
        where: list[str] = [f"NOT ({_EXPIRED})"]
        params: list[Any] = [now]
        if status == "dead":
            where.append("dead = 1")
        elif status == "scheduled":
            where.append("status = 'queued' AND eta > ?")
            params.append(now)
        elif status == "queued":
            where.append("status = 'queued' AND eta <= ?")
            params.append(now)
        elif status is not None:
            where.append("status = ?")
            params.append(status)
        if queue is not None:
            where.append("queue = ?")
            params.append(queue)
        sql = (f"SELECT {_COLUMNS} FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''} "
               "ORDER BY COALESCE(finished, 0) DESC, priority DESC, eta, rowid LIMIT ?")
        rows = self._read(lambda db: db.execute(sql, (*params, limit)).fetchall())
        return [self._record(r, now) for r in rows]

    def dead(self, limit: int = 100) -> Records:
        return self.list("dead", limit=limit)

    def dead_count(self) -> int:
        """Counted in the partial index ``jobs_dead`` (dead-lettered jobs only)."""
        row = self._read(lambda db: db.execute(
            "SELECT COUNT(*) FROM jobs INDEXED BY jobs_dead WHERE dead = 1").fetchone())
        return int(row[0])

    def counts(self) -> dict[str, dict[str, int]]:
        """From the counters the triggers keep; only ``scheduled`` (queued, eta still to
        come) is counted, per queue, in a range of the ``jobs_state`` index."""
        now = self.clock()

        def read(db: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            db.execute("BEGIN")  # one snapshot for both reads
            try:
                for queue, status, n in db.execute("SELECT queue, status, n FROM counts WHERE n > 0"):
                    out.setdefault(queue, {})[status] = n
                for queue, per in out.items():
                    if per.get("queued"):
                        (later,) = db.execute(
                            "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND queue = ? "
                            "AND eta > ?", (queue, now)).fetchone()
                        if later:
                            per["scheduled"] = later
                            per["queued"] -= later
                            if not per["queued"]:
                                del per["queued"]
            finally:
                db.execute("COMMIT")
            return out

        return self._read(read)

    def purge(self, queue: str | None = None, finished_before: float | None = None,
              pending: bool = False) -> int:
        statuses = list(FINISHED) + (["waiting", "queued"] if pending else [])
        where = [f"status IN ({','.join('?' * len(statuses))})"]
        params: list[Any] = list(statuses)
        if queue is not None:
            where.append("queue = ?")
            params.append(queue)
        if finished_before is not None:
            where.append("(finished IS NULL OR finished < ?)")
            params.append(finished_before)
        with self._transaction() as db:
            ids = [r[0] for r in db.execute(f"SELECT id FROM jobs WHERE {' AND '.join(where)}", params)]
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", chunk)
                db.execute(f"DELETE FROM edges WHERE child IN ({marks})", chunk)
            return len(ids)

    # ---------------------------------------------------------------- schedules

    def schedule_last(self, name: str) -> float | None:
        row = self._read(lambda db: db.execute("SELECT last FROM schedules WHERE name = ?",
                                               (name,)).fetchone())
        return None if row is None else float(row[0])

    def schedule_advance(self, name: str, slot: float) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO schedules (name, last) VALUES (?, ?) ON CONFLICT(name) "
                       "DO UPDATE SET last = MAX(last, excluded.last)", (name, slot))
