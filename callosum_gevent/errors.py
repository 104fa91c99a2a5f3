"""Exceptions raised by callosum_gevent."""

from __future__ import annotations

__all__ = ["CallosumError", "PoolClosed", "PoolTimeout", "ProtocolError"]


class CallosumError(Exception):
    """Base class of every error callosum_gevent raises on its own account."""


class PoolTimeout(CallosumError, TimeoutError):
    """No connection became free before the timeout ran out."""


class PoolClosed(CallosumError):
    """The client is closed, or was closed while waiting."""


class ProtocolError(CallosumError):
    """A peer sent bytes that break the Callosum protocol."""
