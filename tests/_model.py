"""The plain reference model both Hypothesis state machines hold the client to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from _peers import PeerServer

IDLE, LEASED, RETIRED, CLOSED = "idle", "leased", "retired", "closed"


@dataclass
class Conn:
    slot: int
    seq: int
    sock: Any
    peer: Any
    status: str = CLOSED
    peer_gone: bool = False


class PoolModel:
    """What the client should hold: every connection ever offered, and its status."""

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self.conns: list[Conn] = []
        self.seq = 0

    def with_status(self, *statuses: str) -> list[Conn]:
        return [c for c in self.conns if c.status in statuses]

    def offer(self, peers: PeerServer, slot: int, *, closed: bool = False) -> tuple[Conn, bool]:
        """Connect, and predict whether the client keeps the connection at ``slot``.

        A kept connection is marked idle; the highest one it displaces is
        closed if idle, retired if lent. Ties go to arrival order.
        """
        sock, peer = peers.connect()
        self.seq += 1
        conn = Conn(slot, self.seq, sock, peer)
        self.conns.append(conn)
        holders = self.with_status(IDLE, LEASED)
        kept = not closed and len(holders) < self.max_slots
        if not closed and not kept:
            worst = max(holders, key=lambda c: (c.slot, c.seq))
            kept = slot < worst.slot
            if kept:
                worst.status = CLOSED if worst.status == IDLE else RETIRED
        if kept:
            conn.status = IDLE
        return conn, kept

    def lowest_idle(self) -> Conn | None:
        idle = self.with_status(IDLE)
        return min(idle, key=lambda c: (c.slot, c.seq)) if idle else None
