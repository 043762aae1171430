"""The client side: the user's `Client`, futures, actor handles, remote functions, annotate.

Nothing here imports the worker server: tasks' thread context (`shoal.worker.context`) is
the one piece of the worker side a client needs, to give a task's thread slot back while it
waits.
"""

from .client import Client as Client
from .client import default_client as default_client

__all__ = ["Client", "default_client"]
