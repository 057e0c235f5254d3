"""RTP relay benchmark on 127.0.0.1: how many G.711 calls can one relay process carry?

The relay (media.MediaManager, one process) bridges N calls; a load generator plays 2N phones:
each sends 50 packets/s of 172 bytes (G.711, 20 ms) to its relay port and counts what the relay
delivers from the other side. Sends are spread evenly over each 20 ms period, like real phones.
The generator is scripts/rtpgen.c (built with gcc into a temporary directory at each run, so that
it costs the relay's core little: sendmmsg/recvmmsg, ~2 us a packet) or, with --generator python,
this process (which tops out around 70k packets/s, below 1,000 calls). Both count alike.
Every run starts with a warm-up (--warmup, 3 s): media flows, the relay latches onto the
phones, and nothing is counted; then T seconds are measured. Everything is bounded: N <= 10,000
calls, warm-up <= 60 s, T <= 170 s, then a drain of at most 10 s; only 127.0.0.1 is bound or
sent to.

Reported per run: offered and relayed packets/s, loss (never delivered) and late packets
(delivered more than 100 ms after they were sent: a jitter buffer would discard them), the
relay's CPU time per relayed packet (utime + stime from /proc/<pid>/stat over the load window
and the drain after it) and what that projects to per core, the generator's and other processes'
CPU meanwhile (the machine may be shared), and memory per call (tracemalloc and RSS growth while
allocating and bridging N calls). Kernel receive-buffer drops on either side are read from
/proc/net/udp. On a shared machine, use --quiet and read the other% column: a busy neighbour
shows up as late packets.

On loopback the sender's sendto also runs the receive path into the destination socket, so the
relay pays for delivering to the phones as well: more kernel time than it would spend on a NIC.

    python scripts/bench_rtp.py                      # 100 250 500 1000 calls, uvloop and asyncio
    python scripts/bench_rtp.py --calls 500 --loop uvloop --seconds 5
    python scripts/bench_rtp.py --calls 500 --py-spy /tmp/relay.txt   # profile the relay too
    python scripts/bench_rtp.py --generator python   # the former in-process generator
    python scripts/bench_rtp.py --setup 1000         # endpoint allocation, pool vs no pool
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Measure the relay of this checkout, not whatever an (editable, possibly stale) install
# of the package resolves `media` to.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from aiortc.rtp import RtpPacket

from media import MediaManager

HOST = "127.0.0.1"
PPS_PER_STREAM = 50
PAYLOAD = 160  # G.711 20 ms -> 172-byte RTP packets
SLOTS = 10  # sends are spread over this many slots per 20 ms period
LATE = 0.1  # seconds: later than this, a packet is as good as lost to a jitter buffer
STAMP = struct.Struct("!HIId")  # seq, timestamp, ssrc, then the send time in the payload
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- relay process ----------------------------------------------------------------------------


def relay_main(loop_name: str, low: int, high: int, pin: bool) -> None:
    """Bridge the calls described on stdin, report on stdout, until stdin says quit."""
    if pin:
        os.sched_setaffinity(0, {0})
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(_relay(low, high))
    else:
        asyncio.run(_relay(low, high))


async def _relay(low: int, high: int) -> None:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    buffer = b""

    def on_stdin() -> None:
        nonlocal buffer
        buffer += os.read(0, 65536) or b"quit\n"
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            lines.put_nowait(line.decode())

    loop.add_reader(0, on_stdin)
    manager = MediaManager(HOST, low, high, tos=None)
    phones = json.loads(await lines.get())
    ports, memory = await _bridge_calls(manager, phones)
    _reply({"ports": ports, "memory": memory})
    while (command := await lines.get()) != "quit":
        if command == "stats":
            stats = manager.stats()
            _reply({"rx": stats.rx_packets, "dropped": stats.dropped, "ignored": stats.ignored})
    await manager.close()


async def _bridge_calls(
    manager: MediaManager, phones: list[list[int]]
) -> tuple[list[list[int]], dict[str, float]]:
    rss_before = _rss()
    tracemalloc.start()
    ports = []
    for port_a, port_b in phones:
        ep_a, ep_b = await manager.allocate_endpoint(), await manager.allocate_endpoint()
        ep_a.set_remote((HOST, port_a))
        ep_b.set_remote((HOST, port_b))
        manager.bridge(ep_a, ep_b)
        ports.append([ep_a.port, ep_b.port])
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    calls = max(1, len(phones))
    return ports, {"traced_per_call": traced / calls, "rss_per_call": (_rss() - rss_before) / calls}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --- load generator (this process) -------------------------------------------------------------


@dataclass
class Result:
    loop: str
    calls: int
    seconds: float  # the load window
    cpu_seconds: float  # the load window and the drain after it, over which CPU is counted
    sent: int
    received: int
    late: int  # received more than LATE seconds after sending
    max_delay: float
    p99: float | None  # 99th percentile of the delay (the C generator measures it)
    lag: float  # how far behind its schedule the generator fell, at worst
    relay_rx: int  # packets the relay received from the phones
    relay_cpu: tuple[float, float]  # user, system seconds over cpu_seconds
    gen_cpu: float  # CPU seconds of the generator over cpu_seconds
    others: float  # CPU seconds used by other processes on the machine meanwhile
    memory: dict[str, float]
    notes: list[str]

    def row(self) -> str:
        sent, secs, cpu_secs = max(1, self.sent), self.seconds, self.cpu_seconds
        user, system = (1e6 * t / max(1, self.received) for t in self.relay_cpu)
        per_pkt = user + system
        p99 = "-" if self.p99 is None else f"{1000 * self.p99:.1f}"
        cells = (
            f"{self.loop:8} {self.calls:6} {self.sent / secs:8.0f} {self.received / secs:8.0f}",
            f"{100 * (self.sent - self.received) / sent:7.3f} {100 * self.late / sent:6.2f}",
            f"{p99:>6} {1000 * self.max_delay:6.0f} {1000 * self.lag:6.1f}",
            f"{per_pkt:6.2f} {user:5.2f} {system:5.2f}",
            f"{100 * sum(self.relay_cpu) / cpu_secs:5.1f} {1e6 / max(0.01, per_pkt):7.0f}",
            f"{100 * self.gen_cpu / cpu_secs:5.0f} {100 * self.others / cpu_secs:6.0f}",
            f"{self.memory['traced_per_call'] / 1024:7.2f}",
            f"{self.memory['rss_per_call'] / 1024:6.1f}",
        )
        notes = f"  ({', '.join(self.notes)})" if self.notes else ""
        return " ".join(cells) + notes


HEADER = (
    f"{'loop':8} {'calls':>6} {'offer/s':>8} {'relay/s':>8} {'loss %':>7} {'late %':>6} "
    f"{'p99 ms':>6} {'max ms':>6} {'lag ms':>6} {'us/pkt':>6} {'user':>5} {'sys':>5} "
    f"{'cpu %':>5} {'pkt/s/c':>7} {'gen %':>5} {'other%':>6} {'KB/call':>7} {'RSS KB':>6}"
)
LEGEND = f"""\
offer/s, relay/s: packets/s the phones sent, and the relay delivered back to them
loss %: never delivered; late %: delivered > {LATE * 1000:.0f} ms after sending (relay backlog, or
  either process waiting for a CPU: the generator's own lag counts too); p99 ms, max ms: delay
  of the 99th percentile (C generator only) and the worst; lag ms: how far behind its schedule
  the generator fell (offer/s below 50 per phone means it could not keep up)
us/pkt = user + sys: relay CPU time per relayed packet; pkt/s/c = 1e6 / us/pkt, per core
cpu %, gen %: relay and generator load; other%: CPU other processes used meanwhile (100 = 1 core)
  (all CPU figures cover the load and the drain of what was still in flight after it)
KB/call: tracemalloc per call (2 endpoints, 4 sockets, 1 bridge); RSS KB: RSS growth per call"""


@dataclass
class Arrivals:
    """What the phones received: counted per packet by either generator."""

    received: int
    bad: int  # not 172 bytes long
    late: int  # received more than LATE seconds after sending
    max_delay: float
    p99: float | None
    send_errors: int = 0  # sends that failed (a full buffer): not sent, not counted


class Phones:
    """The Python generator (--generator python): 2N simulated phones sending from and
    receiving on a few UDP sockets (phone i: i % K).

    The relay's endpoints do not care that several of them send to one address, and K sockets
    instead of 2N keep this generator cheap enough to share two cores with the relay. Each
    packet carries its send time in the payload, so the receiver can tell late from lost.
    """

    def __init__(self, calls: int, sockets: int) -> None:
        self.streams = 2 * calls
        self.socks = [self._open() for _ in range(min(sockets, self.streams))]
        k = len(self.socks)
        self.ports = [self.socks[i % k].getsockname()[1] for i in range(self.streams)]
        self._sendto = [self.socks[i % k].sendto for i in range(self.streams)]
        self.packets = [self._template(i) for i in range(self.streams)]
        self.received = self.bad = self.late = 0
        self.max_delay = 0.0
        self.counted_from = 0.0  # packets sent earlier (the warm-up) are not counted
        self._poll = select.poll()
        for sock in self.socks:
            self._poll.register(sock, select.POLLIN)
        self._recv = {sock.fileno(): sock.recv_into for sock in self.socks}
        self._buf = bytearray(2048)

    @staticmethod
    def _open() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # capped by net.core.rmem_max
        s.bind((HOST, 0))
        s.setblocking(False)
        return s

    @staticmethod
    def _template(i: int) -> bytearray:
        return bytearray(RtpPacket(0, False, 0, 0, 0x10000 + i, b"\xff" * PAYLOAD).serialize())

    def run(
        self, relay_ports: list[int], warmup: float, seconds: float, on_start: Callable[[], None]
    ) -> tuple[int, float]:
        """Send 50 packets/s per phone for `warmup` + `seconds`, receiving meanwhile; call
        `on_start` when the measured window starts, and count only what is sent from then on.

        If the generator falls behind (CPU), it sends late rather than skipping: every packet
        of the schedule is sent, and offered packets/s comes out lower than nominal. Returns
        the packets sent and how far behind the schedule it fell at worst (seconds).
        """
        targets = [(HOST, p) for p in relay_ports]
        per_slot = -(-self.streams // SLOTS)
        period = 1.0 / PPS_PER_STREAM
        sent = seq = 0
        lag = 0.0
        start = time.monotonic()
        window = start + warmup
        self.counted_from = float("inf")  # nothing counts before the window starts
        started = False
        while (tick := start + seq * period) < window + seconds:
            for slot in range(SLOTS):
                due = tick + slot * period / SLOTS
                self.drain_until(due)
                if not started and due >= window:  # stamps from now on are in the window
                    on_start()
                    started, sent, lag, self.counted_from = True, 0, 0.0, time.monotonic()
                lag = max(lag, time.monotonic() - due)
                sent += self._send(slot * per_slot, (slot + 1) * per_slot, targets, seq)
            seq += 1
        return sent, lag

    def finish(self, relay: Relay, sent: int, rx0: int) -> Arrivals:
        """Wait for the packets still in flight, then count what arrived."""
        settle(self, relay, sent, rx0, 0)
        return Arrivals(self.received, self.bad, self.late, self.max_delay, None)

    def _send(self, first: int, stop: int, targets: list[tuple[str, int]], seq: int) -> int:
        sendto, packets, pack_into = self._sendto, self.packets, STAMP.pack_into
        seq16, ts, now = seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, time.monotonic()
        sent = 0
        for i in range(first, min(stop, self.streams)):
            packet = packets[i]
            pack_into(packet, 2, seq16, ts, 0x10000 + i, now)
            try:
                sendto[i](packet, targets[i])
                sent += 1
            except BlockingIOError:
                pass
        return sent

    def drain_until(self, due: float) -> None:
        """Receive and count until monotonic time `due`; at least one pass even if late."""
        poll, recv, buf, unpack_from = self._poll, self._recv, self._buf, STAMP.unpack_from
        received = bad = late = 0
        max_delay, counted_from = self.max_delay, self.counted_from
        while True:
            timeout_ms = max(0.0, due - time.monotonic()) * 1000
            for fd, _ in poll.poll(timeout_ms):
                recv_into, now = recv[fd], time.monotonic()
                while True:
                    try:
                        n = recv_into(buf)
                    except BlockingIOError:
                        break
                    stamp = unpack_from(buf, 2)[3]
                    if stamp < counted_from:
                        continue
                    received += 1
                    bad += n != PAYLOAD + 12
                    delay = now - stamp
                    if delay > max_delay:
                        max_delay = delay
                    if delay > LATE:
                        late += 1
            if time.monotonic() >= due:
                break
        self.received += received
        self.bad += bad
        self.late += late
        self.max_delay = max_delay

    @property
    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        for s in self.socks:
            s.close()


class CPhones:
    """The C generator (scripts/rtpgen.c, --generator c): the same phones and the same counting,
    with sendmmsg/recvmmsg, in its own process, so that it leaves the relay a core of its own.
    """

    def __init__(self, binary: str, calls: int, sockets: int, pin: bool) -> None:
        cmd = [binary, "--calls", str(calls), "--sockets", str(sockets), "--late-ms"]
        self._cmd = [*cmd, str(LATE * 1000)]
        self.streams = 2 * calls
        self.proc: subprocess.Popen[str] | None = None
        self._pin = pin

    def start(self, warmup: float, seconds: float) -> None:
        cmd = [*self._cmd, "--warmup", str(warmup), "--seconds", str(seconds)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self._pin:
            os.sched_setaffinity(self.proc.pid, {1})
        socks = self._read(10)["ports"]
        self.ports = [socks[i % len(socks)] for i in range(self.streams)]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        poll = select.poll()
        poll.register(self.proc.stdout, select.POLLIN)
        if not poll.poll(timeout * 1000):
            raise TimeoutError("rtpgen did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"rtpgen exited with {self.proc.wait(5)}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(
        self, relay_ports: list[int], warmup: float, seconds: float, on_start: Callable[[], None]
    ) -> tuple[int, float]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(" ".join(map(str, relay_ports)) + "\n")
        self.proc.stdin.flush()
        self._read(warmup + 30)  # {"warm": ...}: the measured window starts
        on_start()
        done = self._read(seconds + 30)
        return int(done["sent"]), float(done["max_lag"])

    def finish(self, relay: Relay, sent: int, rx0: int) -> Arrivals:
        """rtpgen drains by itself (until all arrived, 1 s of silence, or 10 s)."""
        r = self._read(15)
        return Arrivals(
            r["received"], r["bad"], r["late"], r["max_delay"], r["p99"], r["send_errors"]
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(5)


def build_rtpgen(directory: str) -> str:
    """Compile scripts/rtpgen.c into `directory` (a temporary one: no binary in the tree)."""
    binary = str(Path(directory) / "rtpgen")
    source = str(Path(__file__).with_name("rtpgen.c"))
    subprocess.run(["gcc", "-O2", "-Wall", "-o", binary, source], check=True)
    return binary


def _proc_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _cpu_snapshot(
    relay: int, generator: int
) -> tuple[tuple[float, float], tuple[float, float], float, float, float]:
    """CPU of the relay and the generator, of the machine and this process, and the time."""
    return _proc_cpu(relay), _proc_cpu(generator), _machine_busy(), _own(), time.monotonic()


def _udp_drops(ports: set[int]) -> int:
    """Datagrams the kernel dropped (receive buffer full) on our loopback UDP sockets."""
    drops = 0
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) in ports:
                drops += int(fields[-1])
    return drops


def _machine_busy() -> float:
    """CPU seconds all processes used since boot (from /proc/stat), to spot a noisy neighbour."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


class Relay:
    """The relay process, driven over its stdin/stdout."""

    def __init__(self, args: argparse.Namespace, loop: str) -> None:
        cmd = [sys.executable, __file__, "--role", "relay", "--loop", loop, "--ports", args.ports]
        self.proc = subprocess.Popen(
            cmd + ["--pin"] * args.pin, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.proc.pid

    def ask(self, line: str, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        poll = select.poll()  # not select.select: the phones' sockets may take fds above 1024
        poll.register(self.proc.stdout, select.POLLIN)
        if not poll.poll(timeout * 1000):
            raise TimeoutError("relay did not answer")
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"relay exited with {self.proc.wait(5)}")
        answer: dict[str, Any] = json.loads(reply)
        return answer

    def rx(self) -> int:
        return int(self.ask("stats")["rx"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def settle(phones: Phones, relay: Relay, sent: int, rx0: int, received0: int) -> None:
    """After the load: wait until the relay has relayed all it got and the phones have it all,
    or nothing moves for 1 s (at most 10 s). Late packets then count as late, not as lost."""
    end = time.monotonic() + 10
    last, still = (-1, -1), 0
    while time.monotonic() < end and still < 5:
        phones.drain_until(time.monotonic() + 0.2)
        now = (relay.rx() - rx0, phones.received - received0)
        if now[0] >= sent and now[1] >= now[0]:
            return
        still = still + 1 if now == last else 0
        last = now


def run_one(args: argparse.Namespace, loop: str, calls: int) -> Result:
    phones: Phones | CPhones
    if args.rtpgen:
        phones = CPhones(args.rtpgen, calls, args.sockets, args.pin)
        phones.start(args.warmup, args.seconds)
    else:
        phones = Phones(calls, args.sockets)
    relay = Relay(args, loop)
    spy: subprocess.Popen[bytes] | None = None
    try:
        pairs = [[phones.ports[2 * i], phones.ports[2 * i + 1]] for i in range(calls)]
        setup = relay.ask(json.dumps(pairs), timeout=60)
        relay_ports = [port for pair in setup["ports"] for port in pair]
        if args.py_spy:
            spy = subprocess.Popen(
                [_py_spy(), "record", "--format", "raw", "-o", args.py_spy, "-r", "200",
                 "-d", str(int(args.seconds)), "-p", str(relay.pid)]
            )  # fmt: skip
        # Reading /proc/net/udp takes seconds when 8,000 sockets are busy: only outside the load
        # (so the drops counted include the warm-up's).
        drops0 = _udp_drops(set(relay_ports)), _udp_drops(set(phones.ports))
        at_start: list[Any] = []

        def on_start() -> None:  # the measured window starts (after the warm-up)
            at_start[:] = [_cpu_snapshot(relay.pid, phones.pid), relay.rx()]

        sent, lag = phones.run(relay_ports, args.warmup, args.seconds, on_start)
        t1 = time.monotonic()
        (cpu0, gen0, busy0, own0, t0), rx0 = at_start
        got = phones.finish(relay, sent, rx0)
        # CPU up to the end of the drain: a relay that fell behind relays its backlog after
        # the load window, and that work belongs to the packets too.
        cpu1, gen1, busy1, own1, t2 = _cpu_snapshot(relay.pid, phones.pid)
        relay_rx = relay.rx() - rx0
        drops = _udp_drops(set(relay_ports)) - drops0[0], _udp_drops(set(phones.ports)) - drops0[1]
        relay.stop()
        if spy is not None:
            spy.wait(args.seconds + 30)
        relay_cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
        gen_cpu = sum(gen1) - sum(gen0)
        if isinstance(phones, CPhones):  # this process, mostly waiting for rtpgen, counts too
            gen_cpu += own1 - own0
        others = max(0.0, busy1 - busy0 - sum(relay_cpu) - gen_cpu)
        # After a warm-up the relay's count is read a few ms into the window, so comparing it
        # with `sent` would only measure that delay; the kernel's drop counters are exact.
        unseen = sent - relay_rx if not args.warmup else 0
        counts = (
            (got.bad, "bad packets"),
            (got.send_errors, "failed sends"),
            (unseen, "never reached the relay"),
            (drops[0], "relay rcvbuf drops (warm-up included)"),
            (drops[1], "phone rcvbuf drops (warm-up included)"),
        )
        notes = [f"{n} {what}" for n, what in counts if n > 0]
        if abs(t1 - t0 - args.seconds) > 0.05 * args.seconds:
            notes.append(f"window {t1 - t0:.2f} s")
        return Result(
            loop, calls, t1 - t0, t2 - t0, sent, got.received, got.late, got.max_delay, got.p99,
            lag, relay_rx, relay_cpu, gen_cpu, others, setup["memory"], notes,
        )  # fmt: skip
    finally:
        phones.close()
        relay.stop()
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait(5)


def setup_bench(args: argparse.Namespace) -> None:
    """--setup N: what allocating a call's two endpoints costs on the call setup path, with the
    pool of bound endpoints (the default, 8) and without it, N calls, one every 5 ms."""
    import uvloop

    low, high = (int(x) for x in args.ports.split("-"))
    print(f"{'pool':>4} {'calls':>6} {'p50 us':>7} {'p90 us':>7} {'p99 us':>7} {'max us':>7}")
    for pool in (0, 8, 0, 8):
        times = uvloop.run(_setup_times(low, high, pool, args.setup))
        times.sort()
        q = [times[min(len(times) - 1, int(f * len(times)))] / 1000 for f in (0.5, 0.9, 0.99)]
        cells = " ".join(f"{x:7.1f}" for x in (*q, times[-1] / 1000))
        print(f"{pool:4} {len(times):6} {cells}", flush=True)


async def _setup_times(low: int, high: int, pool: int, calls: int) -> list[int]:
    manager = MediaManager(HOST, low, high, tos=None, pool=pool)
    times = []
    try:
        for i in range(calls):
            t = time.perf_counter_ns()
            ep_a, ep_b = await manager.allocate_endpoint(), await manager.allocate_endpoint()
            times.append(time.perf_counter_ns() - t)
            ep_a.set_remote((HOST, 40000 + 2 * i))
            ep_b.set_remote((HOST, 50000 + 2 * i))
            manager.bridge(ep_a, ep_b)
            await asyncio.sleep(0.005)
    finally:
        await manager.close()
    return times


def wait_for_quiet(limit: float, threshold: float = 0.3) -> float:
    """Wait (at most `limit` s) for a second in which other processes use < `threshold` cores.

    The machine may be shared (CI, other developers' tests): a run next to a busy neighbour
    measures the neighbour. Returns the load of the last second observed.
    """
    end = time.monotonic() + limit
    while True:
        busy0, own0 = _machine_busy(), _own()
        time.sleep(1.0)
        load = _machine_busy() - busy0 - (_own() - own0)
        if load < threshold or time.monotonic() >= end:
            return load


def _own() -> float:
    t = os.times()
    return t.user + t.system


def _py_spy() -> str:
    """py-spy from PATH, else from beside this Python (a venv not activated)."""
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _runs(args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    loops = ["uvloop", "asyncio"] if args.loop == "both" else [args.loop]
    for loop in loops:
        for calls in args.calls:
            yield loop, calls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--role", choices=["bench", "relay"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--calls", type=_ints, default=[100, 250, 500, 1000], help="e.g. 100,250,500"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per run, at most 170")
    parser.add_argument(
        "--warmup", type=float, default=3.0,
        help="seconds of media before the measured window (latching, start-up), at most 60",
    )  # fmt: skip
    parser.add_argument(
        "--generator", choices=["c", "python"], default="c",
        help="c: scripts/rtpgen.c, built with gcc at run time (default); python: in-process",
    )  # fmt: skip
    parser.add_argument("--loop", choices=["uvloop", "asyncio", "both"], default="both")
    parser.add_argument("--ports", default="22000-29999", help="relay port range (4 per call)")
    parser.add_argument("--sockets", type=int, default=16, help="generator sockets (default 16)")
    parser.add_argument(
        "--quiet", type=float, default=0.0, metavar="S",
        help="before each run, wait up to S seconds for the machine to be idle",
    )  # fmt: skip
    parser.add_argument(
        "--setup", type=int, metavar="N",
        help="instead: the call setup cost of 2 endpoints, with and without the pool, N calls",
    )  # fmt: skip
    parser.add_argument("--pin", action="store_true", help="relay on CPU 0, generator on CPU 1")
    parser.add_argument(
        "--py-spy", metavar="FILE", help="record the relay with py-spy (raw format)"
    )
    args = parser.parse_args()
    low, high = (int(x) for x in args.ports.split("-"))
    if args.role == "relay":
        relay_main(args.loop, low, high, args.pin)
        return
    if max(args.calls) * 4 > high - low + 1:
        parser.error(f"--ports {args.ports} is too small for {max(args.calls)} calls")
    if not 0 < args.seconds <= 170 or not 0 <= args.warmup <= 60 or max(args.calls) > 10_000:
        parser.error("at most 170 s per run, 60 s of warm-up and 10,000 calls")
    if args.setup:
        setup_bench(args)
        return
    if args.pin:
        os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="bench_rtp.") as tmp:
        args.rtpgen = build_rtpgen(tmp) if args.generator == "c" else None
        bench(args)


def bench(args: argparse.Namespace) -> None:
    pinning = "relay on CPU 0, generator on CPU 1" if args.pin else "not pinned"
    print(
        f"{os.cpu_count()} CPUs, {pinning}, {args.warmup:g} s warm-up + {args.seconds:g} s per "
        f"run, G.711 50 pps/stream, {args.generator} generator with {args.sockets} sockets"
    )
    print(LEGEND)
    print(HEADER, flush=True)
    for loop, calls in _runs(args):
        if args.quiet:
            wait_for_quiet(args.quiet)
        print(run_one(args, loop, calls).row(), flush=True)


if __name__ == "__main__":
    main()
