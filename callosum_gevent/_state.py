"""The pool's bookkeeping: two heaps, slot accounting and the waiter queue.

Nothing here touches a socket or a greenlet. Every method runs to completion
without yielding, and the I/O layer (``_client.py``) acts on what it decides:
this module says which connection to lend, keep, retire or hand to a waiter;
the caller closes sockets and wakes greenlets afterwards.

A connection moves through these states::

    admit -> LEASED <-> IDLE          lend / restore
             LEASED  -> HANDED         given back while a waiter queues: in transit
             HANDED  -> LEASED         the waiter takes it
             LEASED  -> RETIRED        a better slot took its place while lent
             any     -> CLOSED         remove (evicted, discarded, found dead); an
                                       IDLE or HANDED one also when retired

A HANDED connection belongs to nobody: it refuses returns and discards, so a
stale second return cannot reach the waiter's socket. ``release`` sets
HANDED; the client takes it back to LEASED itself when the
waiter wakes (the hand-over is its hot path).
``Entry.holder`` names the lease that holds a LEASED or RETIRED connection
(None for the raw API, and once given back), so a ``with`` block can tell its
own lease from a later one of the same socket.

Idle connections are lent lowest rank first. With ``rank="latency"`` (the
default) a connection's rank is (slot + 1) x its server's rank multiplier:
the server's decaying average lease time (the mean of the measured servers'
while it has none), doubled per recent early death. Heap keys are integers,
``rank << 40 | arrival``, so they compare in one step and ties never reach the
entry. A server's multiplier changes only when its average leaves a +-25%
band, and only then are its idle connections re-filed (a few heap pushes),
so a lease costs no heap work beyond today's. With ``rank="slot"`` every
multiplier is 1: the seed's lowest-slot rule.

Both heaps delete lazily: a connection that leaves a heap other than through
its top stays in the list as a stale key until it surfaces or the heap is
compacted, which happens once stale keys outnumber live ones. That keeps every
operation O(log n) amortised with at most n stale keys, never unbounded growth.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from heapq import heapify, heappop, heappush
from typing import Any, Final, Generic, TypeVar

from ._servers import BAND, Server

# Ordered: everything from RETIRED on holds no slot, everything below CLOSED is owned.
IDLE: Final = 0
HANDED: Final = 1
LEASED: Final = 2
RETIRED: Final = 3
CLOSED: Final = 4

_COMPACT_MIN: Final = 16

#: The rank rules a pool can lend by.
RANKS: Final = ("latency", "slot")
# Idle-heap keys are rank << _SEQ_BITS | arrival: 2**40 admissions per pool.
_SEQ_BITS: Final = 40
_SEQ_MASK: Final = (1 << _SEQ_BITS) - 1
# The idle key of a connection no longer idle in the heap: matches no heap pair.
_NO_KEY: Final[tuple[int, Any]] = (-1, None)
# At max_slots, a connection offered at the same slot as the worst one held
# replaces it if the held one's server is this much slower (both measured).
SWAP_RATIO: Final = 1.25
_INF: Final = float("inf")
# The average lease time assumed while no server is measured: any positive
# value ranks them all alike, and lets early-death penalties count.
_NOMINAL: Final = 0.001

E = TypeVar("E", bound="Entry")
W = TypeVar("W")


class Entry:
    """One connection as the bookkeeping sees it."""

    __slots__ = ("_high", "_low", "holder", "item", "server", "slot", "state")

    # The idle-heap pair (key, self); a pair in the heap is live only while it
    # is the entry's _low, so re-filing or closing an entry needs no heap search.
    _low: tuple[int, Entry]
    _high: tuple[int, int, Entry]
    server: Server

    def __init__(self, slot: int, item: object, server: Server | None = None) -> None:
        self.slot = slot
        self.item = item
        self.state = LEASED
        self.holder: object = None
        # Without one, the state files it under the server id None at admission.
        if server is not None:
            self.server = server

    def __repr__(self) -> str:
        state = ("idle", "handed", "leased", "retired", "closed")[self.state]
        return f"<Entry slot={self.slot} {state}>"


class PoolState(Generic[E, W]):
    """Decide which connections a client keeps, lends and gives up.

    ``slot_count`` counts connections holding a slot (idle or leased),
    ``retired_count`` those lent out that gave their slot up. ``waiters`` is
    the FIFO queue of those waiting.
    """

    __slots__ = (
        "_high",
        "_idle",
        "_seq",
        "_stale_high",
        "_stale_idle",
        "max_slots",
        "ranked",
        "retired_count",
        "servers",
        "slot_count",
        "waiters",
    )

    def __init__(self, max_slots: int, rank: str = "latency") -> None:
        if rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}, not {rank!r}")
        self.max_slots = max_slots
        self.ranked = rank == "latency"
        self.slot_count = 0
        self.retired_count = 0
        # Min heap of idle connections by (rank, arrival) as one int: lend the lowest.
        # Keys hold the entry as Any: a typing.cast here would cost a call per lend.
        self._idle: list[tuple[int, Any]] = []
        # Max heap of every slot holder by (-slot, -arrival): retire the highest.
        self._high: list[tuple[int, int, Any]] = []
        self._stale_idle = 0
        self._stale_high = 0
        self._seq = 0
        self.waiters: OrderedDict[W, None] = OrderedDict()
        # Every server a connection was ever offered from, by its id.
        self.servers: dict[Hashable, Server] = {}

    def server(self, server_id: Hashable) -> Server:
        """Return the bookkeeping of ``server_id``, creating it on first use."""
        server = self.servers.get(server_id)
        if server is None:
            server = self.servers[server_id] = Server(server_id)
            self.rekey(server)
        return server

    # -- ranks -------------------------------------------------------------

    def rekey(self, server: Server) -> None:
        """Key ``server`` by its average and penalty; re-file its idle connections.

        Call it when ``server.lease()`` says the average left its band. Its
        connections keep their arrival order; only their rank changes.
        """
        if not self.ranked:
            server.band_lo, server.band_hi = -_INF, _INF  # key 1 for ever
            return
        first = server.measured and server.band_lo > server.band_hi
        if server.measured:
            base = server.avg
            server.band_lo, server.band_hi = base / BAND, base * BAND
        else:
            # Unmeasured: the mean of the measured, so it is tried as an average one.
            known = [s.avg for s in self.servers.values() if s.measured]
            base = sum(known) / len(known) if known else _NOMINAL
        # Microseconds: a positive int, so (slot + 1) x key keeps slot order
        # exact; never below 1 us, so that a penalty always counts.
        key = round(max(base, 1e-6) * server.factor * 1e6)
        if key != server.key:
            server.key = key
            # Lent ones too, so that they are restored under the new key.
            for entry in server.entries:
                seq = entry._low[0] & _SEQ_MASK
                pair = (((entry.slot + 1) * key << _SEQ_BITS) | seq, entry)
                entry._low = pair
                if entry.state == IDLE:
                    heappush(self._idle, pair)
                    self._note_stale_idle()
        if first:
            # The mean of the measured moved: so do the keys of the unmeasured.
            for other in list(self.servers.values()):
                if not other.measured:
                    self.rekey(other)

    def penalise(self, server: Server, now: float) -> None:
        """Double ``server``'s rank for a connection that died early, at ``now``."""
        server.penalise(now)
        self.rekey(server)

    def tick(self, now: float) -> None:
        """Let penalties decay until ``now`` and re-key the unmeasured servers."""
        if not self.ranked:
            return
        for server in list(self.servers.values()):
            if server.penalty > 0.0:
                server.decay(now)
                self.rekey(server)
            elif not server.measured:
                self.rekey(server)

    def _displaces(self, offered: Server, held: Server) -> bool:
        # At equal slots: take a connection to a server measured clearly faster,
        # or to one never measured (not penalised) instead of a measured one,
        # so that a client with one slot gets to compare two servers at all.
        if not self.ranked or offered is held or not held.measured or offered.penalty > 0.0:
            return False
        if not offered.measured:
            # Never, once one of its connections died young: untried but with
            # an early death is a sinkhole's mark, and its decayed penalty
            # would let it take a one-slot client's healthy slot every 30 s.
            return offered.early_deaths == 0
        return held.avg * held.factor > SWAP_RATIO * offered.avg * offered.factor

    def _forget_if_blank(self, server: Server) -> None:
        # A server known only from turned-down offers tells nothing: forget it,
        # or a big or changing fleet grows the table, and every tick's re-keying
        # of untried servers, without bound. It starts afresh if offered again.
        if server.entries or server.measured or server.penalty:
            return
        if server.errors or server.evictions or server.retired:
            return
        if self.servers.get(server.id) is server:
            del self.servers[server.id]

    # -- connections -------------------------------------------------------

    def admit(self, entry: E) -> tuple[bool, E | None]:
        """Offer a new connection; return (kept, the one it displaced).

        A kept entry starts LEASED to the caller, who then restores it or hands
        it to a waiter. A displaced IDLE or HANDED entry is now CLOSED and must
        be closed by the caller; a displaced LEASED one is now RETIRED.
        """
        displaced = None
        if getattr(entry, "server", None) is None:
            entry.server = self.server(None)
        if self.slot_count >= self.max_slots:
            high = self._high
            while high[0][2].state >= RETIRED:
                heappop(high)
                self._stale_high -= 1
            worst: E = high[0][2]
            if entry.slot >= worst.slot and (
                entry.slot > worst.slot or not self._displaces(entry.server, worst.server)
            ):
                self._forget_if_blank(entry.server)
                return False, None
            heappop(high)
            self.slot_count -= 1
            worst.server.retired += 1
            if worst.state == LEASED:
                worst.state = RETIRED
                self.retired_count += 1
            else:
                # Idle, or in transit to a waiter who has not taken it yet:
                # nobody holds it, so it closes now.
                was_idle = worst.state == IDLE
                worst.state = CLOSED
                worst._low = _NO_KEY
                worst.server.entries.discard(worst)
                if was_idle:
                    self._note_stale_idle()
            displaced = worst
        self._seq = seq = self._seq + 1
        item: Entry = entry
        entry._low = (((entry.slot + 1) * entry.server.key << _SEQ_BITS) | seq, item)
        entry._high = high_key = (-entry.slot, -seq, item)
        entry.state = LEASED
        self.slot_count += 1
        entry.server.entries.add(entry)
        heappush(self._high, high_key)
        return True, displaced

    def lend(self) -> E | None:
        """Take the idle connection with the lowest rank, or None."""
        idle = self._idle
        while idle:
            pair = heappop(idle)
            entry: E = pair[1]
            if entry._low is pair:
                entry.state = LEASED
                return entry
            self._stale_idle -= 1
        return None

    def restore(self, entry: E) -> None:
        """Make a LEASED or HANDED connection idle again."""
        entry.state = IDLE
        heappush(self._idle, entry._low)

    def release(self, entry: E, seconds: float | None = None) -> W | None:
        """Hand a LEASED connection to the longest waiter, or make it idle.

        Return that waiter, the connection now HANDED to it, or None if
        nobody waits: the connection is then IDLE. With ``seconds``, first
        record a lease of that length that ended normally (re-keying its
        server if its average left the band): one call for the return's hot path.
        """
        if seconds is not None:
            server = entry.server
            if server.lease(seconds):
                self.rekey(server)
        waiters = self.waiters
        if waiters:
            entry.state = HANDED
            return waiters.popitem(last=False)[0]
        entry.state = IDLE
        heappush(self._idle, entry._low)
        return None

    def remove(self, entry: E) -> None:
        """Forget a connection that is closing; free its slot if it held one."""
        state = entry.state
        if state == CLOSED:
            return
        entry.state = CLOSED
        entry.server.entries.discard(entry)
        if state == IDLE:
            entry._low = _NO_KEY
            self._note_stale_idle()
        if state == RETIRED:
            self.retired_count -= 1
        else:
            self.slot_count -= 1
            self._note_stale_high()

    def retire(self, entry: E) -> bool:
        """Give up a slot holder on purpose; return whether it is now CLOSED.

        An IDLE or HANDED entry is CLOSED and must be closed by the caller; a
        LEASED one is RETIRED, closed when handed back. Anything else is left
        alone.
        """
        state = entry.state
        if state < LEASED:  # IDLE or HANDED
            entry.server.retired += 1
            self.remove(entry)
            return True
        if state == LEASED:
            entry.server.retired += 1
            entry.state = RETIRED
            self.slot_count -= 1
            self.retired_count += 1
            self._note_stale_high()
        return False

    def _note_stale_high(self) -> None:
        self._stale_high += 1
        if self._stale_high > _COMPACT_MIN and self._stale_high * 2 > len(self._high):
            self._high = [key for key in self._high if key[2].state < RETIRED]
            heapify(self._high)
            self._stale_high = 0

    def _note_stale_idle(self) -> None:
        self._stale_idle += 1
        if self._stale_idle > _COMPACT_MIN and self._stale_idle * 2 > len(self._idle):
            self._idle = [pair for pair in self._idle if pair[1]._low is pair]
            heapify(self._idle)
            self._stale_idle = 0

    @property
    def idle_count(self) -> int:
        """Count the idle connections."""
        return len(self._idle) - self._stale_idle

    @property
    def leased_count(self) -> int:
        """Count the connections lent out, retired ones included."""
        return self.slot_count - self.idle_count + self.retired_count

    def idle_entries(self) -> list[E]:
        """List the idle connections, lowest rank first (O(n log n))."""
        return [pair[1] for pair in sorted(self._idle) if pair[1]._low is pair]

    def server_stats(self) -> dict[Hashable, dict[str, int | float | None]]:
        """Break connections, leases, latency and failures down by server."""
        report: dict[Hashable, dict[str, int | float | None]] = {}
        for server_id, server in self.servers.items():
            states = [entry.state for entry in server.entries]
            idle = states.count(IDLE)
            leased = states.count(LEASED) + states.count(HANDED)
            report[server_id] = {
                "connections": idle + leased,
                "idle": idle,
                "leased": leased + states.count(RETIRED),
                "latency_ms": server.avg * 1000.0 if server.measured else None,
                "leases_total": server.leases,
                "errors_total": server.errors,
                "evictions_total": server.evictions,
                "early_deaths_total": server.early_deaths,
                "retired_total": server.retired,
            }
        return report

    def heap_sizes(self) -> tuple[int, int]:
        """Return the lengths of the idle and slot heaps, stale keys included."""
        return len(self._idle), len(self._high)

    # -- waiters -----------------------------------------------------------

    def enqueue(self, waiter: W, *, first: bool = False) -> None:
        """Queue a waiter at the back, or at the front when it lost its turn."""
        self.waiters[waiter] = None
        if first:
            self.waiters.move_to_end(waiter, last=False)

    def dequeue(self) -> W | None:
        """Pop the longest waiter, or None."""
        if self.waiters:
            return self.waiters.popitem(last=False)[0]
        return None

    def cancel(self, waiter: W) -> None:
        """Drop a waiter that gave up; a no-op if it was already served."""
        self.waiters.pop(waiter, None)
