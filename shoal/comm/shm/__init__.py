"""Same-host shared memory for data transfers (see docs/shared-memory.md).

`segments`: sealed memfds, `host_id`; `broker`: the unix socket that hands their fds over
(pull and push); `values`: a value's buffers in a segment, as a `SharedRef` on the wire.
"""

from . import segments as segments
from .broker import Broker as Broker
from .broker import PullError as PullError
from .broker import pull as pull
from .broker import push as push
from . import values as values
from .segments import host_id as host_id
from .values import SHM_MIN_BYTES as SHM_MIN_BYTES
from .values import SharedValue as SharedValue
from .values import adopt as adopt
from .values import buffer_bytes as buffer_bytes
from .values import can_hold as can_hold
from .values import share as share
