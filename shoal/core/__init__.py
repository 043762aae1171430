"""Pure state machines: no I/O, no asyncio, no clock. Events in, instructions out.

`SchedulerState` decides where tasks run and when data is dropped; `WorkerState` decides
what a worker fetches, runs and keeps. The servers in `shoal.scheduler` and `shoal.worker`
feed them events from the wire and carry out the instructions they return.
"""

from .scheduler_state import SchedulerState as SchedulerState
from .scheduler_state import TaskState as TaskState
from .scheduler_state import WorkerRecord as WorkerRecord
from .worker_state import WorkerState as WorkerState
from .worker_state import WorkerTask as WorkerTask
