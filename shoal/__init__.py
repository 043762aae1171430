"""shoal: distributed computing for Python.

Layers, bottom to top (arrows point down only):
  protocol/  typed messages, framing, serialization
  comm/      transports (tcp://, inproc://), handshake, batched writes
  core/      pure state machines: SchedulerState, WorkerState (no I/O)
  scheduler.py, worker.py, client.py   thin servers binding comm <-> core
  cluster/   LocalCluster
  diagnostics/  task stream, log ring, progress bars; dashboard/  web page, JSON API, /metrics
  cli.py     the `shoal` command

The public API is re-exported here explicitly and pinned by tests/test_exports.py.
"""

from .actor import Actor as Actor
from .actor import ActorFuture as ActorFuture
from .client import Client as Client
from .client import default_client as default_client
from .cluster.local import LocalCluster as LocalCluster
from .coordination.primitives import Event as Event
from .coordination.primitives import Lock as Lock
from .coordination.primitives import Pub as Pub
from .coordination.primitives import Queue as Queue
from .coordination.primitives import Semaphore as Semaphore
from .coordination.primitives import Sub as Sub
from .coordination.primitives import Variable as Variable
from .diagnostics.progress import progress as progress
from .exceptions import ActorLostError as ActorLostError
from .exceptions import CancelledError as CancelledError
from .exceptions import FutureLostError as FutureLostError
from .exceptions import KilledWorkerError as KilledWorkerError
from .exceptions import RemoteTraceback as RemoteTraceback
from .exceptions import SchedulerGoneError as SchedulerGoneError
from .future import Future as Future
from .annotate import annotate as annotate
from .future import as_completed as as_completed
from .future import fire_and_forget as fire_and_forget
from .future import wait as wait
from .protocol.serialize import SerializationError as SerializationError
from .remote_function import remote as remote
from .scheduler import Scheduler as Scheduler
from .worker import Worker as Worker
from .worker_client import get_client as get_client
from .worker_client import rejoin as rejoin
from .worker_client import secede as secede

__version__ = "0.1.0"
