"""Fixtures shared by the client's test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _peers import PeerServer


@pytest.fixture
def peers() -> Iterator[PeerServer]:
    """Serve slot-line peers on loopback for one test, stopped after it."""
    server = PeerServer()
    yield server
    server.stop()
