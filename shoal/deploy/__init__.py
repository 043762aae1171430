"""Deploying shoal onto clusters people already run.

- `SSHCluster`: the scheduler on the first host, workers on the others, over ``ssh``;
- `SlurmCluster`: each worker a Slurm batch job, the scheduler in this process;
- `Adaptive` / ``cluster.adapt(...)``: as many workers as the queued work needs;
- Kubernetes: manifests in ``deploy/kubernetes`` (docs/deploy.md).

Every cluster is a `Cluster` (``shoal.deploy.base``): a context manager that
`shoal.Client(cluster)` connects to, with `scale`, `adapt`, `close`, ``dashboard_link``,
`get_logs` and a repr that says what runs where.
"""

from .adaptive import Adaptive as Adaptive
from .base import Cluster as Cluster
from .base import ClusterError as ClusterError
from .base import LaunchError as LaunchError
from .slurm import SlurmCluster as SlurmCluster
from .ssh import SSHCluster as SSHCluster
