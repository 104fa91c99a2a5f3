"""Self-balancing connection pool for gevent: the Callosum (Boxcar) protocol.

Servers number their connections with slots (lowest free first) and send the
slot as the first line; clients keep at most ``max_slots`` connections, lend
the lowest slot first and trade their highest slot for a lower one offered by
the rover. Busy servers can only offer high slots, so load spreads by itself.
"""

from __future__ import annotations

import logging

from ._client import CallosumClient
from ._rover import Rover
from ._server import CallosumServer
from ._slots import ServerSlots
from .errors import CallosumError, PoolClosed, PoolTimeout, ProtocolError

__all__ = [
    "CallosumClient",
    "CallosumError",
    "CallosumServer",
    "PoolClosed",
    "PoolTimeout",
    "ProtocolError",
    "Rover",
    "ServerSlots",
]
__version__ = "0.1.0"

logging.getLogger("callosum_gevent").addHandler(logging.NullHandler())
