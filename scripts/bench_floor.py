#!/usr/bin/env python3
"""The floor: what CPython + uvloop costs per SIP datagram with (almost) no logic.

usage: bench_floor.py register --port 15080 [--level echo|digest] [--realm 127.0.0.1]
       bench_floor.py proxy --port 5780 [--no-record-route] [--no-trying]
       (both: [--loop uvloop|asyncio|blocking] [--rcvbuf BYTES])

Why this exists: issue 2 asks for kamailio's CPU per authenticated, persisted registration and
issue 3 for at most 1.7x kamailio's CPU per call as a stateful proxy. The softswitch needs
~3x and ~4.5x. Before optimising further we need the FLOOR: how much CPU a CPython 3.11
process on uvloop spends only receiving and answering the same datagrams under the same SIPp
load, next to kamailio in the same run. Whatever this costs is not available to parsing,
digest, persistence and logging if the aim is to be met.

It is deliberately not a SIP implementation: no parser, no transactions, no timers, no
retransmissions, no validation. It uses the same asyncio path as softswitch/transport.py
(a DatagramProtocol on a non-blocking UDP socket with a 4 MiB receive buffer, `sendto` per
reply) and touches the bytes with C-level `bytes.find`/slicing/concatenation only, so the
Python work per message is a few dozen bytecodes on top of the loop's own.

Modes:

register   answers scripts/sipp/reg_auth.xml (the load of scripts/bench_register.sh): a
           REGISTER without Authorization gets a 401 with WWW-Authenticate (realm, a fresh
           nonce, qop="auth", algorithm=MD5); one with Authorization gets a 200 with the
           Contact echoed with ;expires=. Via/From/To/Call-ID/CSeq are copied (first Via only),
           the To gets a tag.
             --level echo    no checks at all: any Authorization is accepted.
             --level digest  the Authorization header is split into its parameters and the
                             MD5 response (qop=auth) is recomputed with hashlib against the
                             password scripts/mkusers.py gives every user ("pw" + user);
                             a wrong one gets another 401. What is NOT done (kamailio does
                             it): checking that the nonce is ours and fresh, nonce-count
                             replay, the user's existence, storing the binding.
           OPTIONS gets a 200 (bench_util.py sip-ping waits for it).

proxy      a stateless forwarding proxy for scripts/sipp/uac_call.xml -> uas_call.xml as
           scripts/bench_calls.py runs them. REGISTER (bench_calls.py registers each callee
           from its SIPp UAS port, without credentials) stores user -> Contact in a dict and
           gets a 200. An initial INVITE gets a 100 Trying (kamailio's tm sends one too, so
           both servers send the same datagrams: 6 in, 7 out per call), its Request-URI is
           replaced by the callee's Contact, our Via (branch derived from the caller's, so a
           retransmission gets the same one) and a Record-Route are prepended, and it goes to
           the contact. In-dialog requests (to-tag: ACK, BYE) lose the top Route (ours) and go
           to the host:port of their Request-URI (the UAS's Contact). Responses lose the top
           Via (ours) and go to the sent-by of the next one. Max-Forwards is not decremented,
           rport/received are not handled (SIPp's Vias carry neither), nothing is remembered
           per call.

--loop blocking drops the event loop: one thread calling recvfrom/sendto on a blocking socket.
Not a design anyone would ship (no timers, no second socket), but it splits the floor into what
the event loop costs and what CPython costs.

Loopback only: it binds 127.0.0.1 and refuses anything else. Stop it with SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import os
import signal
import socket
import sys
from collections.abc import Callable

HOST = "127.0.0.1"
#: The softswitch's SIP socket asks for the same (softswitch/transport.py UDP_RCVBUF).
RCVBUF = 4 << 20

Addr = tuple[str, int]
Send = Callable[[bytes, Addr], None]


def header_line(data: bytes, name: bytes, start: int = 0) -> bytes:
    """The whole line `Name: value` of the first header called `name` (b"\\r\\nName:"), or b"".

    A C-level `find` instead of a parser: exact case and full names only, which is what SIPp
    sends. This is the floor, not a SIP stack.
    """
    i = data.find(name, start)
    if i < 0:
        return b""
    j = data.find(b"\r\n", i + 2)
    return data[i + 2 : j]


def copied_headers(data: bytes) -> bytes:
    """Via (the first), From, To, Call-ID and CSeq of a request, each ending in CRLF.

    The To is returned last and without its CRLF, so the caller can append ";tag=...".
    """
    return (
        header_line(data, b"\r\nVia:")
        + b"\r\n"
        + header_line(data, b"\r\nFrom:")
        + b"\r\n"
        + header_line(data, b"\r\nCall-ID:")
        + b"\r\n"
        + header_line(data, b"\r\nCSeq:")
        + b"\r\n"
        + header_line(data, b"\r\nTo:")
    )


class Registrar:
    """Mode `register`: 401 to a REGISTER without credentials, 200 to one with them."""

    def __init__(self, level: str, realm: str, send: Send) -> None:
        self.digest = level == "digest"
        self.realm = realm.encode()
        self.send = send
        # Nonces: a per-process random prefix and a counter: unique, and as cheap as possible
        # (kamailio's are a timestamp and an HMAC; the floor does not check them anyway).
        self._prefix = os.urandom(6).hex().encode()
        self._count = itertools.count(1)
        self._www = (
            b'\r\nWWW-Authenticate: Digest realm="' + self.realm + b'", nonce="%s%08x", '
            b'qop="auth", algorithm=MD5\r\nServer: floor\r\nContent-Length: 0\r\n\r\n'
        )

    def on_datagram(self, data: bytes, addr: Addr) -> None:
        """One REGISTER (or OPTIONS) in, one response out; everything else is dropped."""
        if data.startswith(b"REGISTER "):
            auth = header_line(data, b"\r\nAuthorization:")
            if auth and (not self.digest or self.check(auth)):
                contact = header_line(data, b"\r\nContact:")
                expires = header_line(data, b"\r\nExpires:")[8:].strip() or b"3600"
                self.send(
                    b"SIP/2.0 200 OK\r\n"
                    + copied_headers(data)
                    + b";tag=fl0\r\n"
                    + contact
                    + b";expires="
                    + expires
                    + b"\r\nServer: floor\r\nContent-Length: 0\r\n\r\n",
                    addr,
                )
            else:
                self.send(
                    b"SIP/2.0 401 Unauthorized\r\n"
                    + copied_headers(data)
                    + b";tag=fl0"
                    + self._www % (self._prefix, next(self._count)),
                    addr,
                )
        elif data.startswith(b"OPTIONS "):
            answer_options(data, addr, self.send)

    def check(self, auth: bytes) -> bool:
        """Recompute the MD5 digest response (RFC 2617 / 8760, qop=auth) and compare.

        Minimal parsing: the parameters after "Digest " split on commas (no value that SIPp
        sends contains one), quotes stripped. HA1 is computed per request, as kamailio's
        pv_www_authenticate does from a plain-text password.
        """
        p: dict[bytes, bytes] = {}
        for item in auth[auth.find(b"Digest ") + 7 :].split(b","):
            k, _, v = item.partition(b"=")
            p[k.strip()] = v.strip().strip(b'"')
        try:
            user, nonce, uri, response = p[b"username"], p[b"nonce"], p[b"uri"], p[b"response"]
            ha1 = hashlib.md5(user + b":" + self.realm + b":pw" + user).hexdigest().encode()
            ha2 = hashlib.md5(b"REGISTER:" + uri).hexdigest().encode()
            mine = hashlib.md5(
                ha1 + b":" + nonce + b":" + p[b"nc"] + b":" + p[b"cnonce"] + b":auth:" + ha2
            ).hexdigest()
        except KeyError:
            return False
        return mine.encode() == response


def answer_options(data: bytes, addr: Addr, send: Send) -> None:
    """200 to OPTIONS: the benchmarks' readiness probe (bench_util.py sip-ping)."""
    send(
        b"SIP/2.0 200 OK\r\n" + copied_headers(data) + b";tag=fl0\r\nContent-Length: 0\r\n\r\n",
        addr,
    )


def uri_hostport(uri: bytes) -> Addr:
    """host:port of a SIP URI such as sip:2000@127.0.0.1:5805;transport=UDP (port 5060 if
    absent). Loopback only: anything else raises ValueError and the message is dropped."""
    at = uri.find(b"@")
    hp = uri[at + 1 if at >= 0 else uri.find(b":") + 1 :]
    for stop in (b";", b">", b"?"):
        k = hp.find(stop)
        if k >= 0:
            hp = hp[:k]
    host, _, port = hp.partition(b":")
    if not host.startswith(b"127."):
        raise ValueError(f"not loopback: {host!r}")
    return host.decode(), int(port or b"5060")


class Proxy:
    """Mode `proxy`: stateless forwarding with a dict for a location service."""

    def __init__(self, port: int, send: Send, record_route: bool, trying: bool) -> None:
        self.send = send
        self.trying = trying
        me = f"{HOST}:{port}".encode()
        self.via = b"\r\nVia: SIP/2.0/UDP " + me + b";branch=z9hG4bKfl"
        self.rr = b"\r\nRecord-Route: <sip:" + me + b";lr>" if record_route else b""
        self.route = b"\r\nRoute: <sip:" + me + b";lr>"
        self.location: dict[bytes, tuple[bytes, Addr]] = {}

    def on_datagram(self, data: bytes, addr: Addr) -> None:
        """Dispatch on the first bytes: a response, a REGISTER/OPTIONS for us, or a request to
        forward. Malformed or non-loopback messages are dropped (ValueError/IndexError)."""
        with contextlib.suppress(ValueError, IndexError):
            if data.startswith(b"SIP/2.0 "):
                self.response(data)
            elif data.startswith(b"REGISTER "):
                self.register(data, addr)
            elif data.startswith(b"OPTIONS ") and b";tag=" not in header_line(data, b"\r\nTo:"):
                answer_options(data, addr, self.send)
            else:
                self.request(data, addr)

    def register(self, data: bytes, addr: Addr) -> None:
        """user -> (Contact URI, its host:port); a 200 without any authentication."""
        contact = header_line(data, b"\r\nContact:")
        uri = contact[contact.find(b"<") + 1 : contact.find(b">")]
        user = uri[4 : uri.find(b"@")]
        self.location[user] = (uri, uri_hostport(uri))
        self.send(
            b"SIP/2.0 200 OK\r\n"
            + copied_headers(data)
            + b";tag=fl0\r\n"
            + contact
            + b";expires=3600\r\nContent-Length: 0\r\n\r\n",
            addr,
        )

    def request(self, data: bytes, addr: Addr) -> None:
        """Prepend our Via and forward: initial requests to the registered contact (Request-URI
        rewritten, Record-Route added to INVITEs), in-dialog ones to their Request-URI."""
        eol = data.find(b"\r\n")
        sp1 = data.find(b" ")
        method = data[:sp1]
        ruri = data[sp1 + 1 : data.rfind(b" ", 0, eol)]
        via = header_line(data, b"\r\nVia:")
        b = via.find(b"branch=") + 7
        branch = via[b:]
        for stop in (b";", b","):
            k = branch.find(stop)
            if k >= 0:
                branch = branch[:k]
        rest = data[eol:]
        if b";tag=" in header_line(data, b"\r\nTo:"):  # in-dialog: loose route to the R-URI
            dest = uri_hostport(ruri)
            k = rest.find(self.route)
            if k >= 0:
                rest = rest[:k] + rest[rest.find(b"\r\n", k + 2) :]
            self.send(data[:eol] + self.via + branch + rest, dest)
            return
        user = ruri[4 : ruri.find(b"@")]
        hit = self.location.get(user)
        if hit is None:
            self.send(
                b"SIP/2.0 404 Not Found\r\n"
                + copied_headers(data)
                + b";tag=fl0\r\nContent-Length: 0\r\n\r\n",
                addr,
            )
            return
        if method == b"INVITE":
            if self.trying:
                self.send(
                    b"SIP/2.0 100 Trying\r\n"
                    + copied_headers(data)
                    + b"\r\nContent-Length: 0\r\n\r\n",
                    addr,
                )
            self.send(
                method + b" " + hit[0] + b" SIP/2.0" + self.via + branch + self.rr + rest, hit[1]
            )
        else:
            self.send(method + b" " + hit[0] + b" SIP/2.0" + self.via + branch + rest, hit[1])

    def response(self, data: bytes) -> None:
        """Drop the top Via (ours) and send to the sent-by of the next Via."""
        i = data.find(self.via)
        if i < 0:
            return  # not through us
        j = data.find(b"\r\n", i + 2)
        comma = data.find(b",", i + 2, j)
        if comma >= 0:  # "Via: ours, theirs" on one line
            data = data[: i + 7] + data[comma + 1 : j].lstrip() + data[j:]
        else:
            data = data[:i] + data[j:]
        nxt = header_line(data, b"\r\nVia:")
        hp = nxt[nxt.find(b"/UDP ") + 5 :]
        k = hp.find(b";")
        if k >= 0:
            hp = hp[:k]
        host, _, port = hp.strip().partition(b":")
        if not host.startswith(b"127."):
            return
        self.send(data, (host.decode(), int(port or b"5060")))


class Endpoint(asyncio.DatagramProtocol):
    """The same receive path as softswitch/transport.py's UdpEndpoint, minus its checks."""

    def __init__(self, handler: Callable[[bytes, Addr], None]) -> None:
        self.handler = handler

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.handler(data, addr)  # type: ignore[arg-type]

    def error_received(self, exc: Exception) -> None:
        """ICMP port unreachable after a SIPp instance has gone: nothing to do."""


def bound_socket(a: argparse.Namespace) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, a.rcvbuf)
    sock.bind((HOST, a.port))
    return sock


def make_handler(a: argparse.Namespace, send: Send) -> Callable[[bytes, Addr], None]:
    if a.mode == "register":
        return Registrar(a.level, a.realm, send).on_datagram
    return Proxy(a.port, send, a.record_route, a.trying).on_datagram


def banner(a: argparse.Namespace) -> None:
    print(
        f"bench_floor {a.mode} ({a.level if a.mode == 'register' else 'stateless'}) on "
        f"udp:{HOST}:{a.port}, loop {a.loop}, pid {os.getpid()}",
        flush=True,
    )


def serve_blocking(a: argparse.Namespace) -> None:
    """No event loop at all: the lower bound of CPython itself on this datagram path."""
    sock = bound_socket(a)
    handler = make_handler(a, sock.sendto)  # type: ignore[arg-type]
    banner(a)
    # SIGTERM keeps its default action (the process ends at once, nothing to clean up): a
    # Python-level handler only runs once recvfrom returns, which may be never.
    recvfrom = sock.recvfrom
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            data, addr = recvfrom(65535)
            with contextlib.suppress(OSError):
                handler(data, addr)


async def serve(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    sock = bound_socket(a)
    sock.setblocking(False)
    holder: list[asyncio.DatagramTransport] = []

    def send(data: bytes, addr: Addr) -> None:
        holder[0].sendto(data, addr)

    handler = make_handler(a, send)
    transport, _ = await loop.create_datagram_endpoint(lambda: Endpoint(handler), sock=sock)
    holder.append(transport)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    banner(a)
    await stop.wait()
    transport.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("mode", choices=["register", "proxy"])
    ap.add_argument("--port", type=int, required=True, help="UDP port on 127.0.0.1")
    ap.add_argument("--level", choices=["echo", "digest"], default="echo")
    ap.add_argument("--realm", default=HOST)
    ap.add_argument(
        "--record-route",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="proxy: Record-Route initial INVITEs (kamailio's bench config does)",
    )
    ap.add_argument(
        "--trying",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="proxy: 100 Trying to an INVITE (kamailio's tm sends one)",
    )
    ap.add_argument("--loop", choices=["uvloop", "asyncio", "blocking"], default="uvloop")
    ap.add_argument("--rcvbuf", type=int, default=RCVBUF)
    a = ap.parse_args(argv)
    if a.loop == "uvloop":
        import uvloop

        uvloop.run(serve(a))
    elif a.loop == "blocking":
        serve_blocking(a)
    else:
        asyncio.run(serve(a))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
