#!/usr/bin/env python3
"""In-process CPU cost of the REGISTER path: the service fed bytes, no network, no SIPp.

The SIPp benchmark (scripts/bench_register.sh) gives the figure that counts, but it takes
minutes and its noise (SIPp and the rest of the machine share two cores) hides changes of a
few percent. This script drives the real `Service` (parser, transaction layer, registrar,
digest, SQLite group commit, logging to a file) by calling its datagram handler directly with
the bytes SIPp would send, and measures the process CPU (every thread: the store's writer
thread included) per registration, i.e. per REGISTER -> 401 -> REGISTER+digest -> 200.
Building the authenticated requests (the client's work) is done outside the measured windows.

    python scripts/bench_inproc.py --users 2000 --batch 4
    python scripts/bench_inproc.py --profile /tmp/reg.prof   # cProfile of the measured windows

Bounded: `--users` registrations, each step awaited with a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dialplan import load_config
from softswitch import logs
from softswitch.service import Service
from softswitch.sip.transaction import Address

PORT = 15990
FIRST = 200000

CONFIG = """\
domain: 127.0.0.1
listen: [udp:127.0.0.1:{port}]
http: 127.0.0.1:{http}
data_dir: {data_dir}
media: {{address: 127.0.0.1, ports: 30000-30099}}
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
    await service.stop()
    log_file.close()
    sys.stderr = sys.__stderr__
    print(
        f"{done} registrations, batch {batch}, log {args.log}: "
        f"{cpu / done * 1e6:.0f} µs CPU per registration (all threads); whole run incl. the "
        f"client: main thread {main_cpu / done * 1e6:.0f} µs, other threads "
        f"{(proc_cpu - main_cpu) / done * 1e6:.0f} µs"
    )
    if profiler:
        profiler.dump_stats(args.profile)
        print(f"profile: {args.profile}")
    if not args.keep:
        os.system(f"rm -rf {tmp}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4, help="registrations per commit window")
    ap.add_argument("--log", default="info", choices=["info", "warning"])
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    ap.add_argument("--profile", help="write a cProfile of the measured windows here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
