"""Cluster-wide coordination (locks, semaphores, events, queues, variables, pub/sub) and
named datasets, usable from clients and from tasks.

- `state`: the primitives' state as plain objects, requests in and effects out (no I/O).
- `service`: the scheduler `Extension`s that bind that state to client connections and timers.
- `primitives`: the client-side classes (`Lock`, `Semaphore`, `Event`, `Queue`, `Variable`,
  `Pub`, `Sub`); `datasets`: `Client.publish_dataset` and friends; `requests`: the plumbing.

This package imports nothing eagerly: `shoal.client` imports `datasets` while it is itself
being imported, and `primitives` imports `shoal.client`.
"""
