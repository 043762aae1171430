"""Public helpers for testing shoal and code built on it.

`shoal.testing.core`: builders and filters for driving the pure state machines in
`shoal.core` without sockets.
"""
