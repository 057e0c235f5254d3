"""What payload type rewriting adds per packet on the relay's hot path (D9), with timeit.

The handler a bridge installs is called once per received packet. Without a map it is the
peer socket's `send` itself; with one, `media.bridge._rewriting` sits in front of it. To see
only what the rewrite adds, `send` here is a C-level sink (`deque(maxlen=0).append`), so the
figures exclude the system calls (~10 us per packet, D14) both paths pay anyway.

    python scripts/bench_ptmap.py            # a few seconds, one core
"""

from __future__ import annotations

import collections
import timeit
from collections.abc import Callable

from media.bridge import _rewriting
from media.ptmap import heads

NUMBER = 1_000_000
REPEAT = 5


def packet(pt: int, size: int, marker: bool = False) -> bytes:
    return bytes((0x80, pt | (0x80 if marker else 0))) + bytes(size - 2)


def per_packet(handler: Callable[[bytes], None], data: bytes) -> float:
    """Best of `REPEAT` runs, in nanoseconds per call."""
    runs = timeit.repeat(lambda: handler(data), number=NUMBER, repeat=REPEAT)
    return min(runs) / NUMBER * 1e9


def main() -> None:
    sink = collections.deque(maxlen=0).append
    rewrite = _rewriting(sink, heads({101: 96, 111: 97}))
    cases = [
        ("PCMU, 172 bytes (not in the map)", packet(0, 172)),
        ("telephone-event, 16 bytes (mapped)", packet(101, 16, marker=True)),
        ("opus, 120 bytes (mapped)", packet(111, 120)),
        ("opus, 1000 bytes (mapped)", packet(111, 1000)),
    ]
    base = per_packet(sink, cases[0][1])
    print(f"no map (the bare send): {base:6.1f} ns per packet")
    for name, data in cases:
        cost = per_packet(rewrite, data)
        print(f"map, {name:36s} {cost:6.1f} ns  (+{cost - base:5.1f} ns)")


if __name__ == "__main__":
    main()
