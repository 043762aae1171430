"""The scheduler's journal: a restart loses nothing (issue #16).

The scheduler's state changes only through events (`shoal.core.scheduler_events`), so its
journal is the event stream: `JournalWriter` appends each `SchedulerState.handle` call as a
checksummed record (`records`), fsynced in batches; `replay` rebuilds a state by handling the
records again; compaction rewrites the journal as a snapshot of the live state expressed as
events (`snapshot_events`). `ServerJournal` is the scheduler's side: flushing on a timer,
compacting when the file outgrows the live state. Specs, results and exceptions stay opaque
bytes: nothing here unpickles user data.
"""

from .file import JournalWriter as JournalWriter
from .file import scan as scan
from .records import FORMAT_VERSION as FORMAT_VERSION
from .records import JournalError as JournalError
from .records import JournalVersionError as JournalVersionError
from .replay import ReplayStats as ReplayStats
from .replay import describe as describe
from .replay import replay as replay
from .replay import snapshot_events as snapshot_events
