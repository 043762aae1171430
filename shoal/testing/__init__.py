"""Public helpers for testing shoal and code built on it.

`shoal.testing.core`: builders and filters for driving the pure state machines in
`shoal.core` without sockets.

`shoal.testing.cluster`: real clusters for integration tests. `gen_cluster` yields a client
on a fresh local cluster and fails on leaked threads, processes and ports; `spawn_scheduler`
and `spawn_worker` run the ``shoal`` commands as subprocesses; `wait_until` polls with a
deadline; `Gate` and `Tally` are tasks that block until opened and that count their runs.

`shoal.testing.many_workers`: `ManyWorkers` joins hundreds of real, lightweight workers to
a scheduler, many per process on one event loop (a thousand on one machine).
"""

from .cluster import ClusterTimeoutError as ClusterTimeoutError
from .cluster import Gate as Gate
from .cluster import ShoalProcess as ShoalProcess
from .cluster import Tally as Tally
from .cluster import gen_cluster as gen_cluster
from .cluster import no_leaks as no_leaks
from .cluster import spawn_scheduler as spawn_scheduler
from .cluster import spawn_worker as spawn_worker
from .cluster import wait_until as wait_until
