"""A seeded generator of hostile connections for the protocol fuzz test.

Each `Case` is one connection: optionally a Hello with the right token (then the fuzz
frames are read as messages), then frames that are malformed, truncated, oversized (a
prefix claiming gigabytes), random MessagePack, mutated encodings of real messages, or real
messages with random field values sent in the wrong state (a worker's report from a
client, a registration twice, anything before the Hello). The same seed gives the same
cases, so a failure is replayed with its seed.

Messages with random fields are built from the wire spec itself (`msgspec.inspect` over
every `Msg` subclass), so new message types are fuzzed without touching this file. Left out
for authenticated peers are only the cluster-wide controls that stop everyone's work by
design (restart, retire, close-worker): an authenticated client may do that, and it would
say nothing about robustness.
"""

from __future__ import annotations

import functools
import math
import pickle
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import msgspec.inspect as mi

from shoal.comm.handshake import check_hello
from shoal.protocol.codec import Codec, ProtocolError, decode_handshake
from shoal.protocol.framing import (
    HANDSHAKE_MAX_FRAME_BYTES,
    MAX_PARTS,
    FrameReader,
    max_frame_bytes,
)
from shoal.protocol.messages import (
    PROTOCOL_VERSION,
    CloseWorker,
    Hello,
    Msg,
    RestartRequest,
    RegisterWorker,
    RestartWorker,
    RetireWorkersRequest,
)
from shoal.protocol.serialize import Serialized

from fuzz_peers import frame, hello_frame

#: Messages an authenticated fuzz peer never sends: by design they stop the cluster's work.
DISRUPTIVE: tuple[type[Msg], ...] = (RestartRequest, RetireWorkersRequest, CloseWorker,
                                     RestartWorker)  # fmt: skip

#: A part size authenticated peers claim and never send: the server allocates (and, below
#: 32 MiB, touches) a buffer of it when the prefix arrives, and holds it while they stay.
AUTHENTICATED_CLAIM_BYTES = 20 * 2**20

#: Harmless callables for task functions and ``run`` payloads: whatever arguments the fuzzer
#: gives them, they return or raise at once.
HARMLESS_FUNCTIONS: list[object] = [len, repr, abs, sum, bool, type]


def _all_messages() -> list[type[Msg]]:
    found: list[type[Msg]] = []
    stack = list(Msg.__subclasses__())
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


ALL_MESSAGES = _all_messages()


@functools.lru_cache(maxsize=None)
def _struct_info(cls: type[Msg]) -> mi.StructType:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info


@dataclass
class Case:
    """One connection's worth of fuzz."""

    kind: str  #: what the generator made (for the statistics)
    authenticate: bool  #: send a Hello with the token first, and wait for the Welcome
    role: str = "client"
    frames: list[bytes] = field(default_factory=list)
    #: the server must drop the connection by itself (see `FrameFuzzer.breaks_protocol`)
    must_close: bool = False


class FrameFuzzer:
    """Makes `Case` objects for a port (``"scheduler"`` or ``"worker"``) from ``seed``."""

    def __init__(self, seed: int, token: str, port: str, addresses: list[str]) -> None:
        self.rng = random.Random(seed)
        self.token = token
        self.port = port
        #: addresses fuzzed messages name: real ones (the worker's, the scheduler's) and not
        self.addresses = [*addresses, "tcp://127.0.0.1:1", "", "inproc://nowhere/1",
                          "tcp://[::1]:9", "not an address"]  # fmt: skip
        #: a few keys, so that fuzzed messages refer to each other's keys
        self.keys = [f"fuzz-{i}" for i in range(6)] + ["", "x" * 300]
        self.names = [self.rng.randbytes(6).hex() for _ in range(4)]
        self.codec = Codec()
        self._types = [t for t in ALL_MESSAGES if t not in DISRUPTIVE]

    # -------------------------------------------------------------------- cases

    def case(self) -> Case:
        rng = self.rng
        makers: list[tuple[float, Callable[[], Case]]] = [
            (3, self.unauthenticated),
            (1, self.bad_hellos),
            (6, self.authenticated),
        ]  # fmt: skip
        case = rng.choices([m for _, m in makers], [w for w, _ in makers])[0]()
        case.must_close = self.breaks_protocol(case)
        return case

    def breaks_protocol(self, case: Case) -> bool:
        """Whether the server must drop this connection by itself: what it sends, parsed and
        decoded here the way the server does, has a frame that is invalid (or, before the
        handshake, is anything but an acceptable Hello). A frame left incomplete is not:
        the server rightly waits for the rest (until its handshake timeout, or our EOF)."""
        data = b"".join(case.frames)
        if not case.authenticate:
            reader = FrameReader(HANDSHAKE_MAX_FRAME_BYTES)
            try:
                frames = reader.feed(data) if data else []
            except ProtocolError:
                return True
            if not frames:
                return False
            try:
                hello = decode_handshake(frames[0])
            except ProtocolError:
                return True
            roles = ["client", "worker"] if self.port == "scheduler" else [
                "client", "worker", "peer"]  # fmt: skip
            assert isinstance(hello, Hello)
            return check_hello(hello, token=self.token, roles=roles) is not None
        reader = FrameReader(max_frame_bytes())
        try:
            frames = reader.feed(data) if data else []
        except ProtocolError:
            return True
        codec = Codec()
        for parts in frames:
            try:
                codec.decode(parts)
            except ProtocolError:
                return True
        return False

    def unauthenticated(self) -> Case:
        """Anything but a valid Hello as the first frame: the server must drop it."""
        rng = self.rng
        kind, data = rng.choice([
            lambda: ("random bytes", rng.randbytes(rng.randint(1, 2048))),
            lambda: ("oversized prefix", self.oversized_prefix()),
            lambda: ("random msgpack", frame(self.random_msgpack())),
            lambda: ("message before hello", self.message_frames(1, rng.choice(ALL_MESSAGES))),
            lambda: ("mutated hello", self.mutate(hello_frame(self.token))),
            lambda: ("lying prefix", self.lying_prefix(self.random_msgpack())),
            lambda: ("hello plus more in one frame", frame(*map(bytes, self.codec.encode(
                [Hello(PROTOCOL_VERSION, "client", "f", self.token, 0), self.random_message()])))),
        ])()  # fmt: skip
        tail = [rng.randbytes(rng.randint(1, 64))] if rng.random() < 0.3 else []
        return Case(f"unauthenticated: {kind}", False, frames=[data, *tail])

    def bad_hellos(self) -> Case:
        """A well-formed Hello the server must refuse, then messages it must never read."""
        rng = self.rng
        role = "client"
        token: str | None = self.token
        version = PROTOCOL_VERSION
        what = rng.choice(["token", "no token", "role", "version"])
        if what == "token":
            token = rng.choice(["", self.token[:-1], self.token + "x", rng.randbytes(8).hex()])
        elif what == "no token":
            token = None
        elif what == "role":
            role = rng.choice(["nanny", "scheduler", "", "admin"])
        else:
            version = rng.choice([0, -1, PROTOCOL_VERSION + 1, 2**63 - 1])
        frames = [hello_frame(token, role=role, version=version)]
        frames += [self.message_frames(rng.randint(1, 3)) for _ in range(rng.randint(0, 3))]
        return Case(f"refused hello: {what}", False, frames=frames)

    def authenticated(self) -> Case:
        """The right Hello, then valid messages (random fields, any type) and maybe one bad
        frame; a bad frame must get the connection dropped."""
        rng = self.rng
        roles = ["client", "worker"] if self.port == "scheduler" else ["client", "worker", "peer"]
        role = rng.choice(roles)
        frames: list[bytes] = []
        if role == "worker" and self.port == "scheduler" and rng.random() < 0.7:
            # Mostly a registration first (anything else is refused there), as a worker would.
            frames.append(self.message_frames(1, self.random_message(RegisterWorker)))
        for _ in range(rng.randint(1, 8)):
            frames.append(self.message_frames(rng.randint(1, 4)))
        kind = "valid messages"
        if rng.random() < 0.5:
            kind, bad = rng.choice([
                lambda: ("random msgpack", frame(self.random_msgpack())),
                lambda: ("mutated message", self.mutate(self.message_frames(1))),
                lambda: ("oversized prefix", self.oversized_prefix(authenticated=True)),
                lambda: ("second hello", hello_frame(self.token)),
                lambda: ("bad out-of-band reference", self.bad_oob_frame()),
                lambda: ("truncated frame", self.message_frames(2)[:-1]),
            ])()  # fmt: skip
            frames.append(bad)
        return Case(f"authenticated {role}: {kind}", True, role, frames)

    # -------------------------------------------------------------------- frames

    def oversized_prefix(self, authenticated: bool = False) -> bytes:
        """A prefix whose part count or lengths claim far more than anyone should allocate."""
        rng = self.rng
        nparts = rng.choice([1, 1, 2, 3, MAX_PARTS, MAX_PARTS + 1, 2**32 - 1])
        big = [2**30, 8 * 2**30, 2**40, 2**63, 2**64 - 1]
        if authenticated:  # sizes an authenticated peer may send, but then never does
            big += [AUTHENTICATED_CLAIM_BYTES, 40 * 2**20]
        if nparts > 3:
            return struct.pack("<I", nparts) + rng.randbytes(rng.randint(0, 64))
        lengths = [rng.choice(big) for _ in range(nparts)]
        return struct.pack(f"<I{nparts}Q", nparts, *lengths) + rng.randbytes(rng.randint(0, 256))

    def lying_prefix(self, body: bytes) -> bytes:
        """A frame whose lengths do not match what follows."""
        claimed = max(0, len(body) + self.rng.choice([-5, -1, 1, 7, 1000]))
        return struct.pack("<IQ", 1, claimed) + body

    def mutate(self, data: bytes) -> bytes:
        """Flip, drop, insert or truncate a few bytes; the prefix is fair game too."""
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            pos = rng.randrange(len(out)) if out else 0
            if op == 0 and out:
                out[pos] ^= 1 << rng.randrange(8)
            elif op == 1 and out:
                del out[pos]
            elif op == 2:
                out[pos:pos] = rng.randbytes(rng.randint(1, 8))
            else:
                out = out[: max(1, pos)]
        return bytes(out)

    def bad_oob_frame(self) -> bytes:
        """A serialized value pointing at out-of-band parts that do not exist."""
        index = self.rng.choice([0, 2, 3, -1, 2**31])
        inner = msgspec.msgpack.encode([index])
        body = msgspec.msgpack.encode([["publish", "t", msgspec.msgpack.Ext(1, inner)]])
        return frame(body)

    def message_frames(self, n: int, typ: type[Msg] | Msg | None = None) -> bytes:
        """One frame holding ``n`` messages (of type ``typ``, or random types)."""
        if isinstance(typ, Msg):
            msgs = [typ]
        else:
            msgs = [self.random_message(typ) for _ in range(n)]
        return frame(*(bytes(memoryview(p)) for p in self.codec.encode(msgs)))

    def random_msgpack(self) -> bytes:
        return msgspec.msgpack.encode(self.random_value(depth=0, allow_ext=True))

    # -------------------------------------------------------------------- messages

    def random_message(self, typ: type[Msg] | None = None) -> Msg:
        cls = typ or self.rng.choice(self._types)
        info = _struct_info(cls)
        return cls(*(self.value_of(f.type, f.name) for f in info.fields))  # type: ignore[call-arg]

    def value_of(self, t: mi.Type, name: str = "", depth: int = 0) -> Any:
        rng = self.rng
        if isinstance(t, mi.UnionType):
            return self.value_of(rng.choice(t.types), name, depth)
        if isinstance(t, mi.NoneType):
            return None
        if isinstance(t, mi.BoolType):
            return rng.random() < 0.5
        if isinstance(t, mi.IntType):
            return rng.choice([0, 1, -1, rng.randint(0, 100), rng.randint(-2**63, 2**63 - 1),
                               2**63 - 1, -2**63, 2**31])  # fmt: skip
        if isinstance(t, mi.FloatType):
            return rng.choice([0.0, -1.0, 0.5, 1e308, -1e308, math.inf, -math.inf, math.nan,
                               rng.uniform(-1e6, 1e6)])  # fmt: skip
        if isinstance(t, mi.StrType):
            return self.random_str(name)
        if isinstance(t, mi.BytesType):
            return self.harmless_pickle() if name == "function" else rng.randbytes(
                rng.randint(0, 64))
        if isinstance(t, mi.LiteralType):
            return rng.choice(t.values)
        if isinstance(t, mi.CustomType):
            assert t.cls is Serialized
            return Serialized([self.harmless_pickle()])
        if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            n = rng.choice([0, 1, 2, 3, 5]) if depth < 2 else 0
            return [self.value_of(t.item_type, name, depth + 1) for _ in range(n)]
        if isinstance(t, mi.TupleType):
            return tuple(self.value_of(item, name, depth + 1) for item in t.item_types)
        if isinstance(t, mi.DictType):
            n = rng.choice([0, 1, 2, 3]) if depth < 2 else 0
            return {self.value_of(t.key_type, name, depth + 1):
                    self.value_of(t.value_type, name, depth + 1) for _ in range(n)}  # fmt: skip
        if isinstance(t, mi.StructType):
            return t.cls(*(self.value_of(f.type, f.name, depth + 1) for f in t.fields))
        if isinstance(t, mi.AnyType):
            return self.random_value(depth + 1, allow_ext=False)
        raise AssertionError(f"no generator for {t!r} (field {name!r}): add one")

    def random_str(self, name: str) -> str:
        rng = self.rng
        if name in ("address", "holder") or "worker" in name:
            return rng.choice(self.addresses)
        if name in ("key", "keys", "dependencies", "wanted", "scattered") or "key" in name:
            return rng.choice(self.keys)
        # A few names only: state that authenticated peers may legitimately create (variables,
        # queues, datasets) stays bounded, so that memory growth means a leak.
        return rng.choice(["", "x", "fuzz", "é", "\x00", "a" * 1000, *self.names])

    def harmless_pickle(self) -> bytes:
        """A pickle of a harmless callable or value, or a truncated one (which fails to load):
        an authenticated peer may run any code, so random pickles would only test Python."""
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:
            data = pickle.dumps(rng.choice(HARMLESS_FUNCTIONS))
        elif choice == 1:
            data = pickle.dumps(((rng.randint(-5, 5),), {}))
        elif choice == 2:
            data = pickle.dumps(self.random_value(0, allow_ext=False))
        else:
            data = pickle.dumps([1, 2, 3])[: rng.randint(0, 10)]
        return data

    def random_value(self, depth: int, allow_ext: bool) -> Any:
        """Any MessagePack value; nested a little."""
        rng = self.rng
        roll = rng.randrange(10 if depth < 3 else 7)
        if roll == 0:
            return None
        if roll == 1:
            return rng.randint(-2**63, 2**64 - 1)
        if roll == 2:
            return rng.choice([0.5, math.nan, math.inf, -0.0])
        if roll == 3:
            return rng.choice(["", "hello", "op", "submit", "reply", rng.randbytes(4).hex()])
        if roll == 4:
            return rng.randbytes(rng.randint(0, 32))
        if roll == 5:
            return rng.random() < 0.5
        if roll == 6:
            if allow_ext:
                return msgspec.msgpack.Ext(rng.choice([1, 1, 2, -1]), rng.randbytes(8))
            return rng.randint(0, 9)
        if roll in (7, 8):
            tag = rng.choice([c.__struct_config__.tag for c in ALL_MESSAGES])
            items = [self.random_value(depth + 1, allow_ext) for _ in range(rng.randint(0, 5))]
            return [tag, *items] if rng.random() < 0.5 else items
        return {rng.choice(["k", "op", "", 0, -1, 2**40]):
                self.random_value(depth + 1, allow_ext)
                for _ in range(rng.randint(0, 3))}  # fmt: skip



class HttpFuzzer:
    """Hostile HTTP requests for the dashboards, seeded: odd methods and paths (traversal,
    huge, bad query values), tokens right, wrong and absurd, bad lengths, random bodies, and
    now and then no HTTP at all. Every request says ``Connection: close`` and carries no more
    body than its Content-Length, so the server never rightly waits for more."""

    PATHS = [
        "/", "/health", "/metrics", "/api", "/api/info", "/api/workers", "/api/graph",
        "/api/jobs", "/api/session", "/login", "/logout", "/api/story/", "/api/story/%00%ff",
        "/api/tasks?offset=-1&limit=99999999999999999999", "/api/tasks?state=%ff&group=%00",
        "/api/task-stream?since=nan&limit=-1", "/api/logs?n=-5", "/api/logs?n=1e309",
        "/api/snapshot?since=-1", "/api/events?interval=0", "/api/events?interval=-1",
        "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "//", "*",
        "/" + "a" * 9000, "/api/info?" + "x=1&" * 2000,
    ]  # fmt: skip
    METHODS = ["GET"] * 6 + ["POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE",
                             "GE T", "get", "BREW"]  # fmt: skip

    def __init__(self, seed: int, token: str) -> None:
        self.rng = random.Random(seed)
        self.token = token

    def request(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.1:
            return rng.randbytes(rng.randint(1, 300))  # not HTTP at all
        method, path = rng.choice(self.METHODS), rng.choice(self.PATHS)
        if method == "POST" and path == "/login" and rng.random() < 0.8:
            method = "GET"  # a wrong login waits its turn (half a second): not too many
        headers = ["Connection: close"]
        if rng.random() < 0.9:
            headers.append("Host: 127.0.0.1")
        # Wrong credentials are rare: each waits its turn for half a second (the login's
        # throttle), which would make the run slow, not harder.
        auth = rng.randrange(2, 6) if rng.random() < 0.05 else rng.randrange(2)
        if auth == 1:
            headers.append(f"Authorization: Bearer {self.token}")
        elif auth == 2:
            headers.append(f"Authorization: Bearer {rng.randbytes(8).hex()}")
        elif auth == 3:
            headers.append("Authorization: Bearer " + "x" * rng.choice([0, 1, 7000]))
        elif auth == 4:
            headers.append(f"Cookie: shoal_session={rng.randbytes(16).hex()}; x=\x01")
        elif auth == 5:
            headers.append("Authorization: Basic %%%")
        body = rng.choice([b"", rng.randbytes(rng.randint(1, 512)),
                           f"token={rng.choice([self.token, 'wrong', ''])}&next=/".encode(),
                           b"\x80\x05\x95"])  # fmt: skip
        length = rng.choice(["right"] * 8 + ["short", "negative", "junk"])
        if length == "right":
            headers.append(f"Content-Length: {len(body)}")
        elif length == "short":  # the rest reads as a second, garbled request
            headers.append(f"Content-Length: {max(0, len(body) - 3)}")
        elif length == "negative":
            headers.append("Content-Length: -5")
        else:
            headers.append("Content-Length: 12abc")
        if rng.random() < 0.3:
            headers.append(rng.choice(["Content-Type: application/x-www-form-urlencoded",
                                       "Content-Type: application/python-pickle",
                                       "Expect: 100-continue", "X-Forwarded-For: 10.0.0.1",
                                       "Accept-Encoding: " + "gzip, " * 500]))  # fmt: skip
        rng.shuffle(headers)
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
        return head.encode("latin-1") + body
