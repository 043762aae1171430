"""shoal: distributed computing for Python.

Layers, bottom to top (arrows point down only):
  protocol/  typed messages, framing, serialization
  comm/      transports (tcp://, tls://, inproc://), handshake, batched writes
  security/  TLS credentials and certificates with roles, safe-bind rules, frame limits
  core/      pure state machines: SchedulerState, WorkerState (no I/O)
  scheduler.py  thin server binding comm <-> SchedulerState
  worker/    thin server binding comm <-> WorkerState; execution, memory, spill, actors
  client/    the user's side: Client, futures, actor handles, remote functions
  cluster/   LocalCluster
  diagnostics/  task stream, log ring, progress bars; dashboard/  web page, JSON API, /metrics
  cli.py     the `shoal` command

The public API is re-exported here explicitly and pinned by tests/test_exports.py.
"""

from .client.actor import Actor as Actor
from .client.actor import ActorFuture as ActorFuture
from .client.client import Client as Client
from .client.client import default_client as default_client
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
from .client.future import Future as Future
from .client.annotate import annotate as annotate
from .client.future import as_completed as as_completed
from .client.future import fire_and_forget as fire_and_forget
from .client.future import wait as wait
from .protocol.serialize import SerializationError as SerializationError
from .client.remote_function import remote as remote
from .scheduler import Scheduler as Scheduler
from .security.credentials import Security as Security
from .worker.server import Worker as Worker
from .worker.context import get_client as get_client
from .worker.context import rejoin as rejoin
from .worker.context import secede as secede

__version__ = "0.1.0"
