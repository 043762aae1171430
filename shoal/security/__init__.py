"""Security: TLS credentials (`Security`), certificates (`certs`), and the rules servers
start under (`policy`: non-loopback binds, generated tokens, frame limits per role).

A leaf module: it imports nothing from the rest of shoal, so comm/ and every server can
use it. ``cryptography`` is needed only to make certificates (``shoal[tls]``).
"""

from .credentials import ROLES as ROLES
from .credentials import Security as Security
from .credentials import SecurityError as SecurityError
from .credentials import peer_roles as peer_roles
