"""Transports: connections that carry batches of typed messages, behind one interface.

``connect(address, hello)`` and ``listen(address, handler, name=...)`` pick the transport
by the address's scheme (``tcp://``, ``inproc://``) and run the handshake; `BatchedSend`
groups the small messages of one event-loop tick into one write.
"""

from .addressing import format_address as format_address
from .addressing import normalize_address as normalize_address
from .addressing import parse_address as parse_address
from .batched import BatchedSend as BatchedSend
from .core import Backend as Backend
from .core import Comm as Comm
from .core import CommClosedError as CommClosedError
from .core import HandshakeRejected as HandshakeRejected
from .core import Listener as Listener
from .core import ShoalConnectionError as ShoalConnectionError
from .registry import connect as connect
from .registry import listen as listen
from .registry import register_backend as register_backend
