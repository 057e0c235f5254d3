"""The SIP UDP endpoint: a listening socket read with `recvmsg` by us, not by asyncio.

Split from transport.py so that it can be compiled with mypyc (D17): every datagram in and out
crosses it, while the rest of transport.py (TCP connections, asyncio protocols, listening)
is set-up and stream plumbing that stays interpreted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from softswitch.logline import EventLog

from .sip.syntax import ParseCache
from .sip.transaction import Address

log = EventLog("softswitch.transport")

#: (message bytes, peer address) -> None
MessageHandler = Callable[[bytes, Address], None]


#: Receive buffer asked for on SIP UDP sockets (the kernel caps it at net.core.rmem_max; 4 MiB
#: on Debian). The default ~208 KiB holds ~350 REGISTERs: a 50 ms pause of the loop (a full GC
#: pass, a burst of phones re-registering after a network outage) at a few thousand messages/s
#: overflows it, the phones retransmit 500 ms later and add load just when there is least room.
UDP_RCVBUF = 4 << 20


def udp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        with contextlib.suppress(OSError):  # a bigger buffer is best effort
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


#: Linux socket options the stdlib does not name (asm-generic values, as on x86-64 and arm64):
#: the kernel's receive time of each datagram (SCM_TIMESTAMPNS, a struct timespec) and the
#: socket's cumulative count of datagrams dropped for a full receive buffer (a uint32).
SO_TIMESTAMPNS = 35
SO_RXQ_OVFL = 40
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(4)
_TIMESTAMPS = sys.platform == "linux" and struct.calcsize("@l") == 8

#: Datagrams read per readiness callback before the loop gets a turn for timers and TCP.
UDP_BATCH = 64

#: Admission control: (datagram, seconds it waited in the kernel's queue, sender) -> keep it?
Admit = Callable[[bytes, float, tuple[str | int, ...]], bool]


class UdpEndpoint:
    """One UDP listening socket, read by us rather than by an asyncio transport.

    asyncio's datagram protocol hands over the bytes and the peer but not *when* the datagram
    arrived; overload control (`softswitch.overload`) needs that, so this reads with
    `recvmsg` and the kernel's receive timestamp. It reads up to `UDP_BATCH` datagrams per
    wake-up, and sends with a plain `sendto`: a datagram the kernel cannot take at once
    (EAGAIN) is dropped and counted, as any UDP loss, and the transaction layer retransmits.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: MessageHandler,
        max_size: int,
        admit: Admit | None = None,
        kernel_drops: Callable[[int], None] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sock = sock
        self._wall = wall  # the clock of the kernel's receive stamps (CLOCK_REALTIME)
        self.handler = handler
        self.max_size = max_size
        self.admit = admit
        self.kernel_drops = kernel_drops
        self.send_drops = 0
        self._kernel_total = 0
        self._timestamps = _TIMESTAMPS and _enable_timestamps(sock)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._loop is not None:
            # Through Any: uvloop's remove_reader returns None where asyncio's (and typeshed)
            # return a bool, and compiled code checks the declared type of what a call returns.
            cast(Any, self._loop).remove_reader(self.sock.fileno())
            self._loop = None
        self.sock.close()

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            self.send_drops += 1
        except OSError as exc:  # unreachable network, a closed socket during shutdown
            log.debug("udp_send_error", peer=f"{addr[0]}:{addr[1]}", error=str(exc))

    def _on_readable(self) -> None:
        recvmsg = self.sock.recvmsg
        size = self.max_size + 1  # one byte more: a datagram that fills it is too large
        ancillary = _ANCILLARY if self._timestamps else 0
        now = 0.0  # the wall clock, read once per wake-up and only if a datagram is stamped
        for _ in range(UDP_BATCH):
            try:
                data, ancdata, _, addr = recvmsg(size, ancillary)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors queued on the socket
                log.debug("udp_error", error=str(exc))
                continue
            age = 0.0
            for level, kind, value in ancdata:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
                    sec, nsec = _TIMESPEC.unpack_from(value)
                    now = now or self._wall()
                    age = now - (sec + nsec * 1e-9)
                elif kind == SO_RXQ_OVFL and len(value) >= 4:
                    self._note_kernel_drops(int.from_bytes(value[:4], sys.byteorder))
            self._deliver(data, addr, age)

    def _deliver(self, data: bytes, addr: tuple[str | int, ...], age: float) -> None:
        if len(data) > self.max_size:
            log.warning("sip_datagram_too_large", size=len(data), peer=f"{addr[0]}:{addr[1]}")
            return
        if self.admit is not None and not self.admit(data, age, addr):
            return
        if not data.strip(b"\r\n\x00 "):
            return  # RFC 5626 keep-alive (CRLF) or padding
        try:
            self.handler(data, _peer(addr))
        except Exception:  # one bad message must not stop the socket being read
            log.exception("sip_handler_failed", peer=f"{addr[0]}:{addr[1]}")

    def _note_kernel_drops(self, total: int) -> None:
        if total != self._kernel_total:
            self._kernel_total = total
            if self.kernel_drops is not None:
                self.kernel_drops(total)


def _enable_timestamps(sock: socket.socket) -> bool:
    """Ask for receive timestamps and the drop counter; False if the kernel refuses."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    with contextlib.suppress(OSError):  # the drop count is a bonus
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    return True


def _parse_peer(addr: tuple[str | int, ...]) -> Address:
    return Address("udp", str(addr[0]), int(addr[1]))


# Peers' Addresses by the socket address recvmsg gives: phones and proxies send from the same
# few addresses all day, and a NamedTuple's __new__ is interpreted (~2,400 instructions a
# datagram). Emptied when full, so a scan from many addresses cannot grow it.
_peer: ParseCache[tuple[str | int, ...], Address] = ParseCache(_parse_peer, 4096)
