"""The worker side: the worker server (`server`), task execution, memory and spilling, the
actors it hosts, the thread context of its tasks and the client they share.

This package imports none of its modules eagerly, so the client side can use `context`
without loading the worker server.
"""
