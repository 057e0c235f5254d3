#!/usr/bin/env python3
"""Fork latency: a call to a delegator with 15 delegates rings 16 phones; how long from the
caller's INVITE reaching the server until the 16th forked INVITE has left it?

usage: bench_fork.py [--out DIR] [--calls 500] [--gap-ms 5] [--python PY] [--port 5761]
                     [--kamailio [--kam-port 5771]] [--no-capture] [--log-level warning]
                     [--results RESULTS.jsonl]

One softswitch (users 1001..1016 and the caller 3000; delegation 1001 -> 1002..1016, every
delegate with all permissions and no ring delay; the caller is trusted, so no 407). This
process plays all 17 phones on 127.0.0.1: 16 UDP sockets register 1001..1016 (digest, one
contact each) and answer every INVITE at once with 486 Busy Here; a caller socket sends
--calls INVITEs to 1001 one after the other (the next one --gap-ms after the previous call's
final response and ACK), so calls never overlap and each measurement is of an idle server.

Two clocks, both reported:
  * sockets (always): the phones' sockets have SO_TIMESTAMPNS, so every forked INVITE carries
    the kernel's receive time; the caller takes time.time_ns() just before its sendto. On
    loopback sendto() queues the datagram into the server's socket inside the syscall, so
    "caller send" is the INVITE's arrival to within a few µs (slightly pessimistic: it
    includes our sendto and the loopback delivery into the phone's socket).
  * capture (default if dumpcap runs, root): dumpcap on lo; the INVITE to the server's port
    and the 16 INVITEs from it are timestamped by the same kernel path (one clock, no user
    space in between). Waits for "Capturing on" and one more second before the first call.
Latency = last fork - arrival; also the first fork and the spread first -> last. The server's
CPU per call (utime+stime, /proc) covers the whole call: INVITE, 100, 16 forks, 16 x 486 and
their ACKs, the final 486 and its ACK.

--kamailio repeats it through kamailio (stateful proxy, scripts/bench_calls.py's config): the
16 sockets register as 16 contacts of one AoR (1001), which kamailio forks to in parallel.
Results: printed, DIR/fork.json, and one line per server and clock appended to --results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_calls as bc  # noqa: E402  (servers, digest REGISTER, process bookkeeping)
import bench_util  # noqa: E402

LO = "127.0.0.1"
DELEGATOR = 1001
PHONES = 16
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TS = struct.Struct("qq")

SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


def hdr(msg: str, name: str) -> str:
    m = re.search(rf"^{name}:\s*(.*?)\r$", msg, re.I | re.M)
    return m.group(1) if m else ""


def all_hdrs(msg: str, name: str) -> list[str]:
    return re.findall(rf"^{name}:\s*(.*?)\r$", msg, re.I | re.M)


class Phones:
    """16 sockets with kernel receive timestamps, answering INVITEs with 486."""

    def __init__(self, base_port: int) -> None:
        self.socks: list[socket.socket] = []
        for i in range(PHONES):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.bind((LO, base_port + i))
            self.socks.append(s)
        self.ports = [base_port + i for i in range(PHONES)]

    def register(self, server_port: int, users: list[str]) -> None:
        for s, port, user in zip(self.socks, self.ports, users, strict=True):
            s.setblocking(True)
            if not bc.register(server_port, user, f"pw{user}", port, sock=s):
                raise SystemExit(f"REGISTER {user} from {port} failed")
            s.setblocking(False)

    def drain(self) -> None:
        for s in self.socks:
            with contextlib.suppress(BlockingIOError):
                while True:
                    s.recv(65535)

    def handle(self, s: socket.socket) -> list[int]:
        """Read everything on s; answer INVITEs with 486; return their kernel rx times (ns)."""
        out = []
        while True:
            try:
                data, anc, _, addr = s.recvmsg(65535, socket.CMSG_SPACE(TS.size))
            except BlockingIOError:
                return out
            msg = data.decode(errors="replace")
            if not msg.startswith("INVITE "):
                continue  # ACK of our 486, CANCEL, ...
            ts = 0
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS:
                    sec, nsec = TS.unpack(cdata[: TS.size])
                    ts = sec * 1_000_000_000 + nsec
            out.append(ts or time.time_ns())
            vias = "".join(f"Via: {v}\r\n" for v in all_hdrs(msg, "Via"))
            resp = (
                "SIP/2.0 486 Busy Here\r\n" + vias
                + f"From: {hdr(msg, 'From')}\r\n"
                + f"To: {hdr(msg, 'To')};tag=b{secrets.token_hex(4)}\r\n"
                f"Call-ID: {hdr(msg, 'Call-ID')}\r\nCSeq: {hdr(msg, 'CSeq')}\r\nContent-Length: "
                "0\r\n\r\n"
            )  # fmt: skip
            s.sendto(resp.encode(), addr)

    def close(self) -> None:
        for s in self.socks:
            s.close()


def run_calls(
    server_port: int, caller_port: int, phones: Phones, calls: int, gap_ms: float, callee: str
) -> tuple[list[dict[str, int]], int]:
    """Sequential calls; per call: send time and the 16 forks' kernel rx times (ns)."""
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind((LO, caller_port))
    c.setblocking(False)
    fd_map = {s.fileno(): s for s in phones.socks}
    results: list[dict[str, int]] = []
    failures = 0
    tag = secrets.token_hex(4)
    for n in range(calls):
        call_id = f"fork-{n}-{secrets.token_hex(6)}"
        branch = "z9hG4bK" + secrets.token_hex(8)
        sdp = SDP.format(port=40000 + 2 * (n % 1000))
        ruri = f"sip:{callee}@{LO}:{server_port}"
        invite = (
            f"INVITE {ruri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {LO}:{caller_port};branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:3000@{LO}>;tag={tag}{n}\r\n"
            f"To: <sip:{callee}@{LO}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:3000@{LO}:{caller_port}>\r\n"
            "Content-Type: application/sdp\r\n"
            f"Content-Length: {len(sdp)}\r\n\r\n{sdp}"
        ).encode()
        forks: list[int] = []
        t_send = time.time_ns()
        c.sendto(invite, (LO, server_port))
        final = None
        deadline = time.monotonic() + 5
        while final is None and time.monotonic() < deadline:
            r, _, _ = select.select([c, *phones.socks], [], [], 0.5)
            for s in r:
                if s is c:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            data = c.recv(65535).decode(errors="replace")
                            if branch not in data:
                                continue
                            code = int(data.split(" ", 2)[1])
                            if code >= 200:
                                final = (code, data)
                else:
                    forks += phones.handle(fd_map[s.fileno()])
        # collect forks still queued (a phone may be read after the final response)
        for s in phones.socks:
            forks += phones.handle(s)
        if final is None:
            failures += 1
            continue
        code, data = final
        if code >= 300:  # ACK the non-2xx final response (same branch, To with its tag)
            ack = (
                f"ACK {ruri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {LO}:{caller_port};branch={branch};rport\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:3000@{LO}>;tag={tag}{n}\r\n"
                f"To: {hdr(data, 'To')}\r\n"
                f"Call-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
            )
            c.sendto(ack.encode(), (LO, server_port))
        if len(forks) != PHONES:
            failures += 1
        results.append(
            dict(
                send=t_send,
                first=min(forks) if forks else 0,
                last=max(forks) if forks else 0,
                forks=len(forks),
                final=code,
            )
        )
        time.sleep(gap_ms / 1000)
        phones.drain()
    c.close()
    return results, failures


def summarize(lat_ns: list[int]) -> dict[str, float | None]:
    us = sorted(v / 1000 for v in lat_ns)
    return dict(
        p50_us=bc.pct(us, 50),
        p95_us=bc.pct(us, 95),
        p99_us=bc.pct(us, 99),
        max_us=max(us) if us else None,
        mean_us=round(sum(us) / len(us), 1) if us else None,
    )


def capture_start(out: Path, ports: list[int], tag: str) -> tuple[bc.Proc, Path] | None:
    if not shutil.which("dumpcap") or os.geteuid() != 0:
        return None
    pcap = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_fork_{os.getpid()}_{tag}.pcap"
    flt = "udp and (" + " or ".join(f"port {p}" for p in ports) + ")"
    logf = out / f"dumpcap-{tag}.out"
    p = bc.spawn("dumpcap", ["dumpcap", "-i", "lo", "-f", flt, "-q", "-w", str(pcap)], out, logf)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "Capturing on" in logf.read_text(errors="replace"):
            time.sleep(1.0)  # "Capturing on" comes a little before packets are really captured
            return p, pcap
        if p.poll() is not None:
            break
        time.sleep(0.1)
    p.stop()
    return None


def capture_latencies(
    pcap: Path, server_port: int, caller_port: int, phone_ports: set[int]
) -> list[tuple[int, int, int]]:
    """Per call (in order): arrival of the caller's INVITE, first and last forked INVITE (ns)."""
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", "sip.Method == \"INVITE\"", "-T", "fields",
         "-e", "frame.time_epoch", "-e", "udp.srcport", "-e", "udp.dstport"],
        capture_output=True, text=True, timeout=600, check=False,
    ).stdout  # fmt: skip
    calls: list[list[int]] = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        sec, _, frac = parts[0].partition(".")
        t = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
        src, dst = int(parts[1]), int(parts[2])
        if src == caller_port and dst == server_port:
            calls.append([t])
        elif dst in phone_ports and calls:
            calls[-1].append(t)
    res = []
    for c in calls:
        if len(c) == 1 + PHONES:
            forks = c[1:]
            res.append((c[0], min(forks), max(forks)))
    return res


def bench_server(
    server: bc.Server,
    name: str,
    out: Path,
    users: list[str],
    callee: str,
    args: argparse.Namespace,
    base_port: int,
    caller_port: int,
) -> list[dict[str, object]]:
    phones = Phones(base_port)
    try:
        phones.register(server.port, users)
        time.sleep(0.5)
        # warm-up: a few calls (first-use costs: imports, caches)
        run_calls(server.port, caller_port, phones, 20, args.gap_ms, callee)
        bench_util.wait_idle(server.pid, 10, 0.05)
        cap = None if args.no_capture else capture_start(out, [server.port], name)
        spy = None
        if args.profile and name == "softswitch":
            exe = shutil.which("py-spy") or str(Path(args.python_abs).parent / "py-spy")
            spy = bc.spawn(
                "py-spy",
                [
                    exe,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--rate",
                    "500",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    str(out / "pyspy-fork.raw"),
                ],
                out,
                out / "pyspy.out",
            )
            time.sleep(1.0)
        c0, w0, m0 = server.cpu(), bc.run_delay(server.pid), bench_util.machine_busy_seconds()
        own0 = sum(os.times()[:2])
        t0 = time.monotonic()
        results, failures = run_calls(
            server.port, caller_port, phones, args.calls, args.gap_ms, callee
        )
        wall = time.monotonic() - t0
        cpu = server.cpu() - c0
        waited = bc.run_delay(server.pid) - w0
        if spy is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spy.pid, 2)  # SIGINT: py-spy writes what it has
            spy.wait(20)
            raw = out / "pyspy-fork.raw"
            if raw.exists() and raw.stat().st_size:
                (out / "profile-fork.txt").write_text(bench_util.profile(str(raw), 30) + "\n")
                print(f"profile: {out}/profile-fork.txt", flush=True)
        others = bench_util.machine_busy_seconds() - m0 - cpu - (sum(os.times()[:2]) - own0)
        recs: list[dict[str, object]] = []
        good = [r for r in results if r["forks"] == PHONES]
        base = dict(
            kind="fork",
            server=name,
            calls=len(good),
            failures=failures,
            gap_ms=args.gap_ms,
            cpu_us_per_call=round(cpu / max(1, len(results)) * 1e6, 1),
            wall_s=round(wall, 2),
            runq_wait_pct=round(100 * waited / wall, 1),
            other_core_pct=round(100 * max(0.0, others) / wall, 1),
            finals=sorted({int(r["final"]) for r in results}),
        )
        s = summarize([int(r["last"]) - int(r["send"]) for r in good])
        rec = dict(
            base,
            mode="sockets (caller send → 16th INVITE in the phone's socket)",
            **s,
            first_p50_us=summarize([int(r["first"]) - int(r["send"]) for r in good])["p50_us"],
            spread_p50_us=summarize([int(r["last"]) - int(r["first"]) for r in good])["p50_us"],
        )
        recs.append(rec)
        if cap is not None:
            proc, pcap = cap
            time.sleep(0.5)
            proc.stop(grace=5)
            lat = capture_latencies(pcap, server.port, caller_port, set(phones.ports))
            pcap.unlink(missing_ok=True)
            if lat:
                s2 = summarize([last - arr for arr, _, last in lat])
                recs.append(
                    dict(
                        base,
                        mode="capture on lo (INVITE in → 16th INVITE out)",
                        **s2,
                        calls=len(lat),
                        first_p50_us=summarize([first - arr for arr, first, _ in lat])["p50_us"],
                        spread_p50_us=summarize([last - first for _, first, last in lat])["p50_us"],
                    )
                )
        return recs
    finally:
        phones.close()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", help="results directory (default: a new /tmp/bench_fork.XXXXXX)")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--gap-ms", type=float, default=5.0, help="pause between calls")
    ap.add_argument("--python", default=os.environ.get("PYTHON", ".venv/bin/python"))
    ap.add_argument("--port", type=int, default=5761, help="softswitch SIP port")
    ap.add_argument("--http", type=int, default=8781)
    ap.add_argument("--media", default="31000-31999")
    ap.add_argument("--phone-base", type=int, default=5900)
    ap.add_argument(
        "--kamailio", action="store_true", help="also through kamailio (stateful proxy)"
    )
    ap.add_argument("--only-kamailio", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kam-port", type=int, default=5771)
    ap.add_argument("--no-capture", action="store_true", help="sockets clock only (no dumpcap)")
    ap.add_argument("--log-level", default="warning")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the servers and this process at this nice value (root)",
    )
    ap.add_argument("--results", help="append the result lines to this JSONL file")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the softswitch during the calls (profile-fork.txt)",
    )
    args = ap.parse_args()
    out = Path(
        args.out
        or subprocess.check_output(["mktemp", "-d", "/tmp/bench_fork.XXXXXX"], text=True).strip()
    )
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    python = args.python
    if "/" in python and not os.path.isabs(python):
        python = str(bc.ROOT / python)
    args.python_abs = python
    users = [str(DELEGATOR + i) for i in range(PHONES)]
    if args.nice:
        bc.NICE = args.nice
        os.nice(args.nice)
        bc.group_nice(os.getpid(), args.nice)  # our session's autogroup (the phones' side)
    recs: list[dict[str, object]] = []
    caller_port = args.phone_base + PHONES + 2
    servers: list[bc.Server] = []
    try:
        if not args.only_kamailio:
            delegates = ", ".join(f'"{u}"' for u in users[1:])
            delegation = (
                f'delegations:\n  - {{delegator: "{users[0]}", delegates: [{delegates}]}}\n'
            )
            ss = bc.Softswitch(
                out,
                python,
                args.port,
                args.http,
                args.media,
                args.log_level,
                [(u, f"pw{u}") for u in users] + [("3000", "pw3000")],
                tag="softswitch-fork",
                extra=delegation,
            )
            servers.append(ss)
            print(
                f"softswitch: {PHONES} phones, {args.calls} sequential calls to {users[0]}",
                flush=True,
            )
            recs += bench_server(
                ss, "softswitch", out, users, users[0], args, args.phone_base, caller_port
            )
            ss.stop()
            servers.remove(ss)
        if args.kamailio or args.only_kamailio:
            kam = bc.Kamailio(out, args.kam_port, tag="kamailio-fork")
            servers.append(kam)
            print(
                f"kamailio: {PHONES} contacts of {users[0]}, {args.calls} sequential calls",
                flush=True,
            )
            recs += bench_server(
                kam,
                "kamailio",
                out,
                [users[0]] * PHONES,
                users[0],
                args,
                args.phone_base,
                caller_port,
            )
            kam.stop()
            servers.remove(kam)
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()
        bc.stop_all()
    for r in recs:
        print(
            f"  {r['server']:<10} {r['mode']}: {r['calls']} calls (failures {r['failures']}, "
            f"finals {r['finals']}): "
            ""
            f"p50 {r['p50_us']:.0f} p95 {r['p95_us']:.0f} p99 {r['p99_us']:.0f} max "
            f"{r['max_us']:.0f} µs; "
            ""
            f"first fork p50 {r['first_p50_us']:.0f} µs, spread p50 {r['spread_p50_us']:.0f} µs; "
            f"server CPU {r['cpu_us_per_call']} µs/call; server waited for a CPU "
            f"{r['runq_wait_pct']} %, "
            ""
            f"others {r['other_core_pct']} % of a core"
        )
    (out / "fork.json").write_text(json.dumps(recs, indent=1) + "\n")
    if args.results:
        with open(args.results, "a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    return 0 if recs else 1


if __name__ == "__main__":
    sys.exit(main())
