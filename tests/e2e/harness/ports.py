"""Free loopback ports for the e2e tests.

Why: the service, SIPp and baresip each need their own ports, UDP and TCP on the *same*
number (the service listens on ``udp:`` and ``tcp:`` with one port; baresip also binds TLS
on its SIP port + 1), and tests must not collide with each other or with whatever else runs
on the machine. The kernel hands out a free UDP port when we bind port 0; we then check that
every other socket we will need on that number binds too, and never hand the same number out
twice in one test session. There is an unavoidable window between the check and the real
bind; the service harness retries its start on "address in use", so this stays cheap.
"""

from __future__ import annotations

import random
import socket
import threading

LOOPBACK = "127.0.0.1"

_lock = threading.Lock()
_handed_out: set[int] = set()


def _can_bind(port: int, kind: int) -> bool:
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind((LOOPBACK, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def port_is_free(port: int, *, udp: bool = True, tcp: bool = True) -> bool:
    """True if ``port`` can be bound on 127.0.0.1 right now (UDP and/or TCP)."""
    if udp and not _can_bind(port, socket.SOCK_DGRAM):
        return False
    return not (tcp and not _can_bind(port, socket.SOCK_STREAM))


def free_port(
    *, span: int = 1, udp: bool = True, tcp: bool = True, below_ephemeral: bool = False
) -> int:
    """A port P such that P .. P+span-1 are free on 127.0.0.1 for UDP and TCP.

    ``span=2`` is what baresip needs (SIP on P, TLS on P+1). ``below_ephemeral`` picks from
    10000-19999 instead of asking the kernel: for a TCP port we connect to while its server
    may not listen yet (baresip's ctrl_tcp), since connecting to a closed port of the
    ephemeral range can pick that same port as the source and connect the socket to itself.
    """
    with _lock:
        for _ in range(500):
            if below_ephemeral:
                base = random.randrange(10000, 20000 - span)
            else:
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    probe.bind((LOOPBACK, 0))
                    base = int(probe.getsockname()[1])
                finally:
                    probe.close()
            wanted = range(base, base + span)
            if base + span - 1 > 65535 or any(p in _handed_out for p in wanted):
                continue
            if all(port_is_free(p, udp=udp, tcp=tcp) for p in wanted):
                _handed_out.update(wanted)
                return base
    raise RuntimeError(f"no free loopback port (span {span}) after 500 attempts")


def free_udp_range(
    size: int = 100, low: int = 20000, high: int = 32000, *, probe_all: bool = False
) -> tuple[int, int]:
    """An inclusive port range for RTP (below the kernel's ephemeral range, 32768+).

    By default only the first and last ports are probed: the registrar tests never set up
    media, the range just has to be plausible and distinct per service instance. Tests that
    do relay media pass ``probe_all=True``: every port of the range must be free for UDP
    right now, because another program on the machine (an RTP benchmark binding thousands
    of ports in 22000-29999, say) would otherwise make the service answer 503 "media ports
    exhausted".
    """
    with _lock:
        for _ in range(200 if not probe_all else 2000):
            start = random.randrange(low, high - size) & ~1  # RTP ports are even
            end = start + size - 1
            if any(p in _handed_out for p in range(start, end + 1)):
                continue
            probed = range(start, end + 1) if probe_all else (start, end)
            if all(port_is_free(p, tcp=False) for p in probed):
                _handed_out.update(range(start, end + 1))
                return start, end
    raise RuntimeError("no free UDP range for media")
