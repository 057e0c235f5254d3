#!/usr/bin/env python3
"""In-process CPU cost of the REGISTER path and of a 16-way fork: the service fed bytes.

The SIPp benchmark (scripts/bench_register.sh) gives the figure that counts, but it takes
minutes and its noise (SIPp and the rest of the machine share two cores) hides changes of a
few percent. This script drives the real `Service` (parser, transaction layer, registrar,
digest, SQLite group commit, logging to a file) by calling its datagram handler directly with
the bytes SIPp would send, and measures the process CPU (every thread: the store's writer
thread included) per registration, i.e. per REGISTER -> 401 -> REGISTER+digest -> 200.
Building the authenticated requests (the client's work) is done outside the measured windows.

    python scripts/bench_inproc.py --users 2000 --batch 4
    python scripts/bench_inproc.py --profile /tmp/reg.prof   # cProfile of the measured windows
    python scripts/bench_inproc.py --fork --calls 300        # INVITE in -> 16 forks queued
    python scripts/bench_inproc.py --call --calls 1000       # CPU of a whole answered call

`--fork`: a delegator (1001) with 15 delegates, one contact each (bindings put in directly),
a trusted caller sends INVITEs one at a time; measured is the time from handing the INVITE to
the service until the 16th forked INVITE is handed to the (fake) transport, wall and CPU, and
the CPU of the whole call (16 x 486 and their ACKs, the final 486 and its ACK). This is the
service's own share of scripts/bench_fork.py's latency, without loopback sendto or scheduling.

Bounded: `--users` registrations, each step awaited with a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dialplan import load_config
from softswitch import logs
from softswitch.service import Service
from softswitch.sip.transaction import Address

PORT = 15990  # below the ephemeral range, like the media ports: e2e tests take theirs there
LO = "127.0.0.1"
FIRST = 200000

CONFIG = """\
domain: 127.0.0.1
listen: [udp:127.0.0.1:{port}]
http: 127.0.0.1:{http}
data_dir: {data_dir}
media: {{address: 127.0.0.1, ports: 23000-23099}}
auth: {{algorithms: [MD5], max_failures: 1000000}}
log: {{level: {level}, format: json}}
users:
"""

REGISTER = (
    "REGISTER sip:127.0.0.1:{port} SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{n}-{cseq}\r\n"
    "From: <sip:{user}@127.0.0.1:{port}>;tag={n}R1\r\n"
    "To: <sip:{user}@127.0.0.1:{port}>\r\n"
    "Call-ID: {n}-bench@127.0.0.1\r\n"
    "CSeq: {cseq} REGISTER\r\n"
    "Contact: <sip:{user}@127.0.0.1:5070;transport=UDP>\r\n"
    "{auth}"
    "Max-Forwards: 70\r\n"
    "Expires: 300\r\n"
    "User-Agent: sipp-reg\r\n"
    "Content-Length: 0\r\n\r\n"
)

NONCE = re.compile(rb'nonce="([^"]+)"')


async def stop_service(service: Service, log_file: IO[str]) -> None:
    await service.stop()
    log_file.close()
    sys.stderr = sys.__stderr__


def finish(tmp: Path, args: argparse.Namespace, profiler: cProfile.Profile | None) -> None:
    if profiler:
        profiler.dump_stats(args.profile)
        print(f"profile: {args.profile}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


def register(n: int, cseq: int, auth: str = "") -> bytes:
    user = str(FIRST + n)
    return REGISTER.format(port=PORT, n=n, cseq=cseq, user=user, auth=auth).encode()


def authorization(n: int, nonce: str) -> str:
    user = str(FIRST + n)
    uri = f"sip:127.0.0.1:{PORT}"
    ha1 = hashlib.md5(f"{user}:127.0.0.1:pw{user}".encode()).hexdigest()
    ha2 = hashlib.md5(f"REGISTER:{uri}".encode()).hexdigest()
    cnonce, nc = "6b8b4567", "00000001"
    resp = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
    return (
        f'Authorization: Digest username="{user}",realm="127.0.0.1",uri="{uri}",'
        f'nonce="{nonce}",response="{resp}",algorithm=MD5,cnonce="{cnonce}",qop=auth,nc={nc}\r\n'
    )


class Wire:
    """Stands in for the transports: collects what the service sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.ok = 0
        self.event = asyncio.Event()
        self.want = 0

    def send(self, data: bytes, dest: Address) -> None:
        self.sent.append(data)
        if data.startswith(b"SIP/2.0 200"):
            self.ok += 1
            if self.ok >= self.want:
                self.event.set()


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_inproc."))
    cfg_path = tmp / "softswitch.yaml"
    with cfg_path.open("w") as f:
        f.write(CONFIG.format(port=PORT, http=PORT + 1, data_dir=tmp / "var", level=args.log))
        for n in range(args.users):
            u = FIRST + n
            f.write(f'  - {{extension: "{u}", name: User {u}, password: pw{u}}}\n')
    cfg = load_config(cfg_path)
    log_file = (tmp / "log.jsonl").open("w")
    sys.stderr = log_file  # the JSON lines go where production sends them: a file
    logs.configure(cfg.log.level, "json")
    service = Service(cfg, cfg_path)
    await service.start()
    wire = Wire()
    service.transports.send = wire.send  # type: ignore[method-assign]
    src = Address("udp", "127.0.0.1", 5070)
    handler = service._on_message
    profiler = cProfile.Profile() if args.profile else None

    cpu = 0.0
    done = 0
    main0, proc0 = time.thread_time(), time.process_time()
    batch = args.batch
    for start in range(0, args.users, batch):
        ns = range(start, min(start + batch, args.users))
        first = [register(n, 1) for n in ns]
        wire.sent.clear()
        t0 = time.process_time()
        if profiler:
            profiler.enable()
        for data in first:
            handler(data, src)
        if profiler:
            profiler.disable()
        cpu += time.process_time() - t0
        nonces = [NONCE.search(d).group(1).decode() for d in wire.sent]  # type: ignore[union-attr]
        pairs = zip(ns, nonces, strict=True)
        second = [register(n, 2, authorization(n, nonce)) for n, nonce in pairs]
        wire.want = wire.ok + len(second)
        wire.event.clear()
        t0 = time.process_time()
        if profiler:
            profiler.enable()
        for data in second:
            handler(data, src)
        await asyncio.wait_for(wire.event.wait(), 10)
        if profiler:
            profiler.disable()
        cpu += time.process_time() - t0
        done += len(second)
    main_cpu, proc_cpu = time.thread_time() - main0, time.process_time() - proc0
    await stop_service(service, log_file)
    print(
        f"{done} registrations, batch {batch}, log {args.log}: "
        f"{cpu / done * 1e6:.0f} µs CPU per registration (all threads); whole run incl. the "
        f"client: main thread {main_cpu / done * 1e6:.0f} µs, other threads "
        f"{(proc_cpu - main_cpu) / done * 1e6:.0f} µs"
    )
    finish(tmp, args, profiler)


CALLS_HEAD = """\
domain: 127.0.0.1
listen: [udp:127.0.0.1:{port}]
http: 127.0.0.1:{http}
data_dir: {data_dir}
media: {{address: 127.0.0.1, ports: 23100-23999}}
trusted: ["127.0.0.1/32"]
log: {{level: {level}, format: json}}
users:
"""
FORK_CONFIG = (
    CALLS_HEAD
    + """\
{users}
delegations:
  - {{delegator: "1001", delegates: [{delegates}]}}
"""
)

INVITE = (
    "INVITE sip:1001@127.0.0.1:{port} SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-call-{n}\r\n"
    "Max-Forwards: 70\r\n"
    'From: "Caller" <sip:3000@127.0.0.1>;tag=c{n}\r\n'
    "To: <sip:1001@127.0.0.1>\r\n"
    "Call-ID: fork-{n}@127.0.0.1\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:3000@127.0.0.1:5070>\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: {length}\r\n\r\n{sdp}"
)
SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 6000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n"
)
HEADER = re.compile(rb"^(Via|From|To|Call-ID|CSeq): .*$", re.M)


def copied_headers(request: bytes, to_tag: bytes = b"") -> bytes:
    """A response's Via, From, To (tagged if `to_tag`), Call-ID and CSeq, from its request."""
    head = request.split(b"\r\n\r\n", 1)[0]
    lines = [m.group(0).rstrip(b"\r") for m in HEADER.finditer(head)]
    if to_tag:
        lines = [ln + b";tag=" + to_tag if ln.startswith(b"To:") else ln for ln in lines]
    return b"\r\n".join(lines) + b"\r\n"


def busy_for(invite: bytes) -> bytes:
    """A phone's 486 to a forked INVITE."""
    return (
        b"SIP/2.0 486 Busy Here\r\n"
        + copied_headers(invite, b"busy")
        + b"Content-Length: 0\r\n\r\n"
    )


def ack_for(n: int, final: bytes) -> bytes:
    to = re.search(rb"^To: .*$", final, re.M).group(0).rstrip(b"\r")  # type: ignore[union-attr]
    return (
        (
            f"ACK sip:1001@127.0.0.1:{PORT} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-call-{n}\r\n"
            f'Max-Forwards: 70\r\nFrom: "Caller" <sip:3000@127.0.0.1>;tag=c{n}\r\n'
        ).encode()
        + to
        + f"\r\nCall-ID: fork-{n}@127.0.0.1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n".encode()
    )


async def start_service(config: Callable[[Path], str]) -> tuple[Path, Service, IO[str]]:
    """A started service on the config `config(data_dir)`, logging JSON to a file."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_inproc."))
    cfg_path = tmp / "softswitch.yaml"
    cfg_path.write_text(config(tmp / "var"))
    cfg = load_config(cfg_path)
    log_file = (tmp / "log.jsonl").open("w")
    sys.stderr = log_file
    logs.configure(cfg.log.level, "json")
    service = Service(cfg, cfg_path)
    await service.start()
    return tmp, service, log_file


async def run_fork(args: argparse.Namespace) -> None:
    from softswitch.store import BindingRecord

    exts = [str(1001 + i) for i in range(16)]
    users = "\n".join(
        f'  - {{extension: "{u}", name: User {u}, password: pw{u}}}' for u in [*exts, "3000"]
    )
    tmp, service, log_file = await start_service(
        lambda data_dir: FORK_CONFIG.format(
            port=PORT, http=PORT + 1, data_dir=data_dir, level=args.log, users=users,
            delegates=", ".join(f'"{u}"' for u in exts[1:]),
        )
    )  # fmt: skip
    service.bindings.apply(
        [
            BindingRecord(
                aor=u, contact=f"<sip:{u}@{LO}:{5900 + i}>", uri=f"sip:{u}@{LO}:{5900 + i}",
                expires_at=time.time() + 3600, call_id=f"reg{u}", cseq=1,
                source=f"udp:127.0.0.1:{5900 + i}", auth_user=u,
            )
            for i, u in enumerate(exts)
        ],
        [],
    )  # fmt: skip
    sent: list[bytes] = []
    forked = asyncio.Event()
    final = asyncio.Event()
    marks: dict[str, float] = {}

    invites = [0]  # forks sent for the current call (a counter: no scan inside the window)

    def send(data: bytes, dest: Address) -> None:
        sent.append(data)
        if data.startswith(b"INVITE "):
            invites[0] += 1
            if invites[0] == 16:
                marks["wall"], marks["cpu"] = time.perf_counter(), time.thread_time()
                forked.set()
        elif data.startswith(b"SIP/2.0 4") and dest.port == 5070:
            final.set()

    service.transports.send = send  # type: ignore[method-assign]
    caller = Address("udp", "127.0.0.1", 5070)
    handler = service._on_message
    profiler = cProfile.Profile() if args.profile else None
    walls: list[float] = []
    cpus: list[float] = []
    call_cpu = 0.0
    for n in range(args.calls):
        invite = INVITE.format(port=PORT, n=n, length=len(SDP), sdp=SDP).encode()
        sent.clear()
        invites[0] = 0
        forked.clear()
        final.clear()
        if profiler:
            profiler.enable()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        handler(invite, caller)
        await asyncio.wait_for(forked.wait(), 5)
        walls.append(marks["wall"] - t0)
        cpus.append(marks["cpu"] - c0)
        invites = [d for d in sent if d.startswith(b"INVITE ")]
        for i, inv in enumerate(invites):
            handler(busy_for(inv), Address("udp", "127.0.0.1", 5900 + i))
        await asyncio.wait_for(final.wait(), 5)
        last = [d for d in sent if d.startswith(b"SIP/2.0 4")][-1]
        handler(ack_for(n, last), caller)
        call_cpu += time.thread_time() - c0
        if profiler:
            profiler.disable()
        await asyncio.sleep(args.gap_ms / 1000)  # idle between calls, as bench_fork.py does
    await stop_service(service, log_file)
    walls.sort()
    cpus.sort()

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6

    print(
        f"{args.calls} calls forked to 16: INVITE in -> 16th fork queued, wall p50 "
        f"{pct(walls, 0.5):.0f} p99 {pct(walls, 0.99):.0f} max {pct(walls, 1.0):.0f} µs; "
        f"CPU p50 {pct(cpus, 0.5):.0f} p99 {pct(cpus, 0.99):.0f} µs; "
        f"main-thread CPU per whole call {call_cpu / args.calls * 1e6:.0f} µs"
    )
    finish(tmp, args, profiler)


CALL_CONFIG = (
    CALLS_HEAD
    + """\
  - {{extension: "2000", name: Callee, password: pw2000}}
  - {{extension: "3000", name: Caller, password: pw3000}}
"""
)
PHONE = Address("udp", "127.0.0.1", 5900)


def answer_for(invite: bytes, status: str, body: str = "") -> bytes:
    """The phone's response to the forked INVITE (tag, Contact, SDP for the 200)."""
    extra = b"Contact: <sip:2000@127.0.0.1:5900>\r\n"
    if body:
        extra += b"Content-Type: application/sdp\r\n"
    return (
        f"SIP/2.0 {status}\r\n".encode() + copied_headers(invite, b"phone") + extra
        + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )  # fmt: skip


def response_to(request: bytes, status: str) -> bytes:
    return f"SIP/2.0 {status}\r\n".encode() + copied_headers(request) + b"Content-Length: 0\r\n\r\n"


def in_dialog(method: str, n: int, cseq: int, to_tag: str) -> bytes:
    """The caller's ACK or BYE on the call's dialog (sent to the service's Contact)."""
    return (
        f"{method} sip:{LO}:{PORT};transport=udp SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {LO}:5070;branch=z9hG4bK-{method}-{n}\r\n"
        f'Max-Forwards: 70\r\nFrom: "Caller" <sip:3000@{LO}>;tag=c{n}\r\n'
        f"To: <sip:2000@{LO}>;tag={to_tag}\r\nCall-ID: call-{n}@{LO}\r\n"
        f"CSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def run_call(args: argparse.Namespace) -> None:
    """INVITE -> 100, fork -> 180, 200 (SDP) -> ACK both ways, BYE -> 200: 14 messages."""
    from softswitch.store import BindingRecord

    tmp, service, log_file = await start_service(
        lambda data_dir: CALL_CONFIG.format(
            port=PORT, http=PORT + 1, data_dir=data_dir, level=args.log
        )
    )
    service.bindings.apply(
        [
            BindingRecord(
                aor="2000", contact=f"<sip:2000@{LO}:5900>", uri=f"sip:2000@{LO}:5900",
                expires_at=time.time() + 3600, call_id="reg2000", cseq=1,
                source=f"udp:{LO}:5900", auth_user="2000",
            )
        ],
        [],
    )  # fmt: skip
    inbox: dict[int, list[bytes]] = {5070: [], 5900: []}
    arrived = asyncio.Event()

    def send(data: bytes, dest: Address) -> None:
        inbox.setdefault(dest.port, []).append(data)
        arrived.set()

    async def wait_for(port: int, prefix: bytes) -> bytes:
        for _ in range(100):
            for data in inbox[port]:
                if data.startswith(prefix):
                    inbox[port].remove(data)
                    return data
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 5)
        raise TimeoutError(prefix)

    service.transports.send = send  # type: ignore[method-assign]
    caller = Address("udp", LO, 5070)
    handler = service._on_message
    profiler = cProfile.Profile() if args.profile else None
    cpu = 0.0
    for n in range(args.calls):
        invite = INVITE.format(port=PORT, n=n, length=len(SDP), sdp=SDP).encode()
        invite = invite.replace(b"1001", b"2000").replace(b"fork-", b"call-")
        for box in inbox.values():
            box.clear()
        if profiler:
            profiler.enable()
        c0 = time.thread_time()
        handler(invite, caller)
        fork = await wait_for(5900, b"INVITE ")
        handler(answer_for(fork, "180 Ringing"), PHONE)
        handler(answer_for(fork, "200 OK", SDP.replace("6000", "7000")), PHONE)
        ok = await wait_for(5070, b"SIP/2.0 200")
        tag = re.search(rb"^To: .*;tag=([^;\r]+)", ok, re.M).group(1).decode()  # type: ignore[union-attr]
        handler(in_dialog("ACK", n, 1, tag), caller)
        handler(in_dialog("BYE", n, 2, tag), caller)
        bye = await wait_for(5900, b"BYE ")
        handler(response_to(bye, "200 OK"), PHONE)
        await wait_for(5070, b"SIP/2.0 200")
        cpu += time.thread_time() - c0
        if profiler:
            profiler.disable()
        await asyncio.sleep(0)
    await stop_service(service, log_file)
    print(
        f"{args.calls} answered calls (7 messages in, 7 out): main-thread CPU per call "
        f"{cpu / args.calls * 1e6:.0f} µs"
    )
    finish(tmp, args, profiler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4, help="registrations per commit window")
    ap.add_argument("--log", default="info", choices=["info", "warning"])
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    ap.add_argument("--profile", help="write a cProfile of the measured windows here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--fork", action="store_true", help="measure the 16-way fork instead")
    ap.add_argument("--call", action="store_true", help="measure an answered call instead")
    ap.add_argument("--calls", type=int, default=300, help="--fork/--call: calls, one at a time")
    ap.add_argument(
        "--gap-ms", type=float, default=0.0,
        help="--fork: idle time between calls (bench_fork.py waits 5 ms): caches go cold",
    )  # fmt: skip
    ap.add_argument(
        "--gc-young", type=int, default=0,
        help="the cyclic GC's youngest threshold (CPython: 700), set before the service starts",
    )  # fmt: skip
    args = ap.parse_args()
    if args.gc_young:
        import gc

        gc.set_threshold(args.gc_young, *gc.get_threshold()[1:])
    coro = run_fork(args) if args.fork else run_call(args) if args.call else run(args)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
