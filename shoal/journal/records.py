"""The journal's on-disk format: a header, then length-prefixed, checksummed records.

    header  = b"SHOALJNL" + u32 format version (big-endian)
    record  = u32 payload length + u32 CRC32 of the payload + payload (MessagePack)
    payload = [kind, now, [[event type, event fields], ...], restored]

A record is one call of `SchedulerState.handle(events, now)`, replayed as that same call.
``kind`` is `BATCH` (live events), `SNAPSHOT` (a compacted journal's picture of the state,
replayed with ``restored`` on) or `RESTART` (a scheduler started on this journal here: from
now on it accepts held results, see `SchedulerState.restored`). ``restored`` is the value
``SchedulerState.restored`` has after the record. The scheduler never unpickles user data:
task specs, results and exceptions are stored as the opaque bytes they arrived as.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import msgspec

from ..core import scheduler_events as ev
from ..protocol.serialize import Serialized

MAGIC = b"SHOALJNL"
#: Bumped when a journal written before cannot be replayed by this code.
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sI")
RECORD_HEAD = struct.Struct(">II")
#: No record is larger: a length beyond it is a corrupt length, not a huge record.
MAX_RECORD_BYTES = 1 << 31

BATCH, SNAPSHOT, RESTART = 0, 1, 2

#: Every event type the journal stores, by its short name on disk (names never change).
EVENT_TYPES: dict[str, type[ev.SchedulerEvent]] = {
    "client-connected": ev.ClientConnected,
    "client-disconnected": ev.ClientDisconnected,
    "tasks-submitted": ev.TasksSubmitted,
    "keys-wanted": ev.KeysWanted,
    "keys-released": ev.KeysReleased,
    "keys-cancelled": ev.KeysCancelled,
    "data-scattered": ev.DataScattered,
    "worker-joined": ev.WorkerJoined,
    "worker-left": ev.WorkerLeft,
    "task-finished": ev.TaskFinishedEvent,
    "task-erred": ev.TaskErredEvent,
    "replicas-added": ev.ReplicasAdded,
    "data-missing": ev.DataMissing,
    "task-seceded": ev.TaskSeceded,
    "tick": ev.Tick,
    "fire-and-forget": ev.FireAndForget,
    "retire-workers": ev.RetireWorkers,
    "cluster-restarted": ev.ClusterRestarted,
}
_NAMES = {t: name for name, t in EVENT_TYPES.items()}


class JournalError(Exception):
    """A journal that cannot be used (not a journal, unreadable)."""


class JournalVersionError(JournalError):
    """A journal written by an incompatible version of shoal."""


@dataclass(slots=True)
class Record:
    kind: int
    now: float
    events: list[ev.SchedulerEvent]
    restored: bool


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Serialized):
        return [bytes(f) for f in obj.frames]
    raise TypeError(f"the journal cannot store {type(obj).__name__}")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Serialized and isinstance(obj, list):
        return Serialized(list(obj))
    raise TypeError(f"the journal cannot read a {typ.__name__} from {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_outer = msgspec.msgpack.Decoder(tuple[int, float, list[tuple[str, msgspec.Raw]], bool])
_event_decoders = {name: msgspec.msgpack.Decoder(t, dec_hook=_dec_hook)
                   for name, t in EVENT_TYPES.items()}  # fmt: skip


def header() -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION)


def check_header(data: bytes, path: str) -> None:
    """Refuse what is not a journal of this format version, with a clear error."""
    if len(data) < HEADER.size:
        raise JournalError(f"{path} is not a shoal journal: {len(data)} bytes, shorter than"
                           f" the {HEADER.size}-byte header")  # fmt: skip
    magic, version = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise JournalError(f"{path} is not a shoal journal (it starts with {magic!r})")
    if version != FORMAT_VERSION:
        raise JournalVersionError(
            f"{path} is a shoal journal of format version {version}; this shoal reads version"
            f" {FORMAT_VERSION}. Start it with the shoal that wrote it, or move the journal"
            " away to start empty")  # fmt: skip


def encode_record(kind: int, now: float, events: list[ev.SchedulerEvent],
                  restored: bool) -> bytes:  # fmt: skip
    """One framed record (length, CRC32, payload)."""
    payload = _encoder.encode((kind, now, [(_NAMES[type(e)], e) for e in events], restored))
    return RECORD_HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes | memoryview) -> Record:
    kind, now, raw_events, restored = _outer.decode(payload)
    events = [_event_decoders[name].decode(raw) for name, raw in raw_events]
    return Record(kind, now, events, restored)
