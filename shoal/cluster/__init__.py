"""Ways to start a cluster: `LocalCluster` runs one beside the client."""

from .local import LocalCluster as LocalCluster
