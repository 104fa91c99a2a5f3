"""Fuzz the slot-line reader with atheris (libFuzzer); run by tests/test_fuzz.py.

Each input is cut into segments sent over a real loopback connection, the
sender then closes or resets; the reader must return exactly the slot the
model expects and leave the rest unread, or raise ProtocolError or OSError.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).parent))

with atheris.instrument_imports():
    from callosum_gevent._slotline import read_slot_line

from _lineservers import make_listener, reset, tcp_pair
from test_slotline import expected, feed, read_rest

from callosum_gevent import ProtocolError

LISTENER: Any = make_listener()


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_slot = fdp.PickValueInList([2**31 - 1, 1000, 0])
    cuts = sorted(fdp.ConsumeIntInRange(0, 40) for _ in range(fdp.ConsumeIntInRange(0, 3)))
    abrupt = fdp.ConsumeBool()
    line = fdp.ConsumeBytes(fdp.remaining_bytes())
    bounds = sorted({0, len(line), *(c for c in cuts if c < len(line))})
    segments = [line[a:b] for a, b in itertools.pairwise(bounds)]
    want = expected(line, max_slot)
    with tcp_pair(LISTENER) as (client, server):
        sender = feed(server, segments, gap=0, close=not abrupt)
        sender.join()
        if abrupt:
            reset(server)
        try:
            got = read_slot_line(client, 2.0, max_slot)
        except ProtocolError:
            got = None
        except OSError:
            assert abrupt, "a socket error without a reset"
            return
        rest = b"" if abrupt else read_rest(client)
    if abrupt and got is None:
        return  # the reset may overtake a good line
    assert got == (want[0] if want else None), (line, max_slot, got)
    if want and not abrupt:
        assert len(line) - len(rest) == want[1], (line, rest)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
