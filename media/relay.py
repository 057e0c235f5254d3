"""The media manager: one per service, it owns the port range, the endpoints and the bridges.

The B2BUA asks it for an endpoint per leg and m= line, points each endpoint at the address the
leg's SDP announced, and bridges the two endpoints of a call. Everything here is control path;
the packets never come through this module (see `media.endpoint` and `media.bridge`).

Binding a pair (two socket() + setsockopt + bind) used to sit on the call setup path, before the
first INVITE of a fork could leave. The manager keeps a small pool of bound endpoints instead
(`pool`, 8 by default: the two endpoints of four calls arriving together) and tops it up one
endpoint per loop iteration after each allocation. Pooled endpoints hold their ports like
endpoints in calls (`ports_in_use` counts both, `MediaStats.pooled` the pool), are read and
drop what they get while they wait, are reset when handed out, and are closed, ports returned
to the range, by `close`. When the pool is empty, allocation binds on the spot as before; when
the range is empty too, `PortsExhausted`. Nothing needs starting: the first allocation (inside
the running loop) starts the refilling.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from media.bridge import Bridge, RelayBridge, Tap
from media.endpoint import RTCP_RELATCH_AFTER, RTP_RELATCH_AFTER, RtpEndpoint
from media.errors import PortsExhausted
from media.poller import Poller
from media.ports import PortAllocator
from media.ptmap import PtMaps

_RETRY_ERRNOS = frozenset({errno.EADDRINUSE, errno.EACCES})
"""Bind errors that concern one port (another process holds it): try the next pair."""

_OUT_OF_SOCKETS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""The process or the host is out of descriptors or socket memory: no port would do, and the
call gets 503 like an exhausted range (a flood of TCP connections must not turn into calls that
are never answered)."""

DSCP_EF = 0xB8
"""Expedited Forwarding (RFC 3246) in the TOS byte: what networks expect for voice."""


@dataclass(frozen=True, slots=True, init=False)
class MediaStats:
    """Service-wide counters; packet counts include endpoints already released."""

    endpoints: int
    bridges: int
    ports_free: int
    ports_in_use: int
    bind_failures: int
    rx_packets: int
    rx_bytes: int
    dropped: int
    ignored: int
    relatches: int
    pooled: int = 0  # bound endpoints waiting in the pool (their ports count as in use)

    def __init__(
        self,
        endpoints: int,
        bridges: int,
        ports_free: int,
        ports_in_use: int,
        bind_failures: int,
        rx_packets: int,
        rx_bytes: int,
        dropped: int,
        ignored: int,
        relatches: int,
        pooled: int = 0,
    ) -> None:
        # Written out so that mypyc compiles it (docs/decisions.md, D18).
        object.__setattr__(self, "endpoints", endpoints)
        object.__setattr__(self, "bridges", bridges)
        object.__setattr__(self, "ports_free", ports_free)
        object.__setattr__(self, "ports_in_use", ports_in_use)
        object.__setattr__(self, "bind_failures", bind_failures)
        object.__setattr__(self, "rx_packets", rx_packets)
        object.__setattr__(self, "rx_bytes", rx_bytes)
        object.__setattr__(self, "dropped", dropped)
        object.__setattr__(self, "ignored", ignored)
        object.__setattr__(self, "relatches", relatches)
        object.__setattr__(self, "pooled", pooled)


class MediaManager:
    """Allocates endpoints on `address` from the port range `low..high` and bridges them.

    `pool`: how many bound endpoints to keep ready (0: bind on every allocation).
    """

    def __init__(
        self,
        address: str,
        low: int,
        high: int,
        *,
        bind_attempts: int = 16,
        relatch_after: tuple[float, float] = (RTP_RELATCH_AFTER, RTCP_RELATCH_AFTER),
        tos: int | None = DSCP_EF,
        pool: int = 8,
    ) -> None:
        ip = ipaddress.ip_address(address)  # ValueError: the config must give an IP literal
        if ip.is_unspecified:  # `address` goes into SDP, where 0.0.0.0 means "hold"
            raise ValueError(f"media address {address} cannot be written into SDP")
        self.address = address
        self._family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self._ports = PortAllocator(low, high)
        self._bind_attempts = bind_attempts
        self._relatch_after = relatch_after
        self._tos = tos
        self._endpoints: set[RtpEndpoint] = set()
        self._bridges: set[Bridge] = set()
        self._totals = [0] * 5  # counters of released endpoints, in MediaStats order
        self._poll: Poller | None = None
        self._pool: deque[RtpEndpoint] = deque()  # bound and read, not in a call
        self._pool_size = pool
        self._refill_handle: asyncio.Handle | None = None
        #: How a socket of a pair is opened (bound, non-blocking): tests replace it to make
        #: binding fail the way the system would.
        self.open_socket: Callable[[int], socket.socket] = self._bind

    @property
    def ports(self) -> PortAllocator:
        return self._ports

    def _poller(self) -> Poller:
        """The poller of the running loop (made on first use: the manager is built before it)."""
        loop = asyncio.get_running_loop()
        if self._poll is None or self._poll.loop is not loop:
            self._poll = Poller(loop)
        return self._poll

    async def allocate_endpoint(self) -> RtpEndpoint:
        """An endpoint for a call leg; raise `PortsExhausted` if no pair is free or bindable.

        It comes from the pool of ready endpoints when there is one (~4 us, no system call),
        else it is bound now (~45 us: four system calls per socket). Either way the pool is
        refilled afterwards, off the call setup path (see `_refill`).
        """
        endpoint = self._from_pool() or self._bind_endpoint()
        self._endpoints.add(endpoint)
        self._refill_later()
        return endpoint

    def take_ready(self, count: int) -> list[RtpEndpoint] | None:
        """`count` pooled endpoints, or None (and nothing taken) if the pool has fewer.

        This is how a call's setup gets its endpoints in the same step as the INVITE that
        needs them, with no task in between; `allocate_endpoint` is the fallback.
        """
        if len(self._pool) < count:
            return None
        ready = [self._take_pooled() for _ in range(count)]
        self._endpoints.update(ready)
        self._refill_later()
        return ready

    def _bind_endpoint(self) -> RtpEndpoint:
        """Bind a fresh RTP/RTCP pair and start reading it.

        Pairs held by other processes are skipped (up to `bind_attempts` per call). Other bind
        errors (the address is not ours, say) are configuration errors and propagate.
        """
        attempts = max(1, min(self._bind_attempts, self._ports.free))  # each free pair once
        for _ in range(attempts):
            port = self._ports.allocate()
            try:
                rtp, rtcp = self._bind_pair(port)
            except OSError as exc:
                if exc.errno in _OUT_OF_SOCKETS:  # the process, not the port: stop trying
                    self._ports.release(port)
                    raise PortsExhausted(f"cannot open RTP sockets: {exc.strerror}") from exc
                self._ports.mark_bad(port)
                if exc.errno not in _RETRY_ERRNOS:
                    raise
                continue
            return self._open(RtpEndpoint(rtp, rtcp, self._closed, self._relatch_after))
        raise PortsExhausted(f"no bindable RTP port pair after {attempts} attempts")

    def _open(self, endpoint: RtpEndpoint) -> RtpEndpoint:
        try:
            endpoint.attach(self._poller())
        except BaseException:  # the sockets must not leak
            endpoint.close()
            raise
        return endpoint

    # --- the pool of ready endpoints ---

    def _from_pool(self) -> RtpEndpoint | None:
        return self._take_pooled() if self._pool else None

    def _take_pooled(self) -> RtpEndpoint:
        """A pooled endpoint (there must be one), reset: it was read (and dropped) while it
        waited, so it is on the poller already, and whatever strangers sent it meanwhile must
        not follow it into a call (a stranger's old packet must not hold the latch)."""
        endpoint = self._pool.popleft()
        endpoint.reset()
        return endpoint

    def _refill_later(self) -> None:
        """Top the pool up from the loop, after the caller's current step (the call setup)."""
        if self._refill_handle is None and len(self._pool) < self._pool_size:
            self._refill_handle = asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:
        """Bind one pooled endpoint per loop iteration: each costs ~50 us of system calls, and
        signalling waiting behind a whole pool's worth would see it in its latency."""
        self._refill_handle = None
        if len(self._pool) >= self._pool_size or not self._ports.free:
            return
        try:
            self._pool.append(self._bind_endpoint())
        except (OSError, PortsExhausted):  # allocate_endpoint will meet (and raise) it
            return
        self._refill_later()

    def _bind_pair(self, port: int) -> tuple[socket.socket, socket.socket]:
        rtp = self.open_socket(port)
        try:
            return rtp, self.open_socket(port + 1)
        except OSError:
            rtp.close()
            raise

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self._tos is not None:
                with contextlib.suppress(OSError):  # QoS marking is best effort
                    if self._family == socket.AF_INET:
                        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, self._tos)
                    else:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, self._tos)
            sock.bind((self.address, port))
        except OSError:
            sock.close()
            raise
        return sock

    def release(self, endpoint: RtpEndpoint) -> None:
        """Unbridge and close `endpoint`; its ports return to the range once the sockets closed.

        Idempotent, so every teardown path of a call may call it.
        """
        if endpoint.bridge is not None:
            self.unbridge(endpoint.bridge)
        endpoint.close()

    def _closed(self, endpoint: RtpEndpoint) -> None:
        self._endpoints.discard(endpoint)
        for i, n in enumerate(_endpoint_counters(endpoint)):
            self._totals[i] += n
        self._ports.release(endpoint.port)

    def bridge(
        self,
        a: RtpEndpoint,
        b: RtpEndpoint,
        tap: Tap | None = None,
        pt_maps: PtMaps | None = None,
    ) -> RelayBridge:
        """Relay `a` and `b` to each other, rewriting payload types where `pt_maps` says (D9).

        Raise `BridgeError` if either is bridged already (unbridge it first: a transfer is
        unbridge + bridge), `EndpointClosed` if either was released.
        """
        bridge = RelayBridge(a, b, tap, pt_maps)
        bridge.start()
        self._bridges.add(bridge)
        return bridge

    def unbridge(self, bridge: Bridge) -> None:
        """Stop relaying; both endpoints stay allocated (to be bridged elsewhere or released)."""
        bridge.stop()
        self._bridges.discard(bridge)

    def stats(self) -> MediaStats:
        counters = list(self._totals)
        for endpoint in self._endpoints:
            for i, n in enumerate(_endpoint_counters(endpoint)):
                counters[i] += n
        ports = self._ports
        rx_packets, rx_bytes, dropped, ignored, relatches = counters
        return MediaStats(
            len(self._endpoints), len(self._bridges), ports.free, ports.in_use,
            ports.bind_failures, rx_packets, rx_bytes, dropped, ignored, relatches,
            len(self._pool),
        )  # fmt: skip

    async def close(self, timeout: float = 5.0) -> None:
        """Release every endpoint and wait (at most `timeout` s) for the sockets to close."""
        if self._refill_handle is not None:
            self._refill_handle.cancel()
            self._refill_handle = None
        while self._pool:
            self._pool.pop().close()
        endpoints = list(self._endpoints)
        for endpoint in endpoints:
            self.release(endpoint)
        if endpoints:
            waits = [ep.wait_closed() for ep in endpoints]
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        if self._poll is not None:
            self._poll.close()
            self._poll = None


def _endpoint_counters(ep: RtpEndpoint) -> tuple[int, int, int, int, int]:
    rtp, rtcp = ep.rtp, ep.rtcp
    return (
        rtp.rx_packets + rtcp.rx_packets,
        rtp.rx_bytes + rtcp.rx_bytes,
        rtp.dropped + rtcp.dropped,
        rtp.ignored + rtcp.ignored,
        rtp.relatches + rtcp.relatches,
    )
