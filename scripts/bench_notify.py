"""Bounded in-process benchmark of the dialog-event notifier: one busy shared line.

The issue's case: a line with its delegator and 15 delegates, each watching it from 3 phones
(48 subscriptions). For each of N state changes (ring, answer, hold, resume, hang up, again and
again) it times `SubscriptionManager.on_line_event` up to the moment all 48 NOTIFYs are
serialised in the transaction layer's datagram queue; the target is 10 ms. Between changes
every NOTIFY is answered 200, as phones do, outside the timed part. No sockets, no clock but
`perf_counter` and `process_time`; each change costs ~20 ms in all (answers included), so a
run is bounded to seconds.

    python scripts/bench_notify.py               # 500 state changes
    python scripts/bench_notify.py --changes 2000 --profile
    python scripts/bench_notify.py --no-freeze   # with full collections of the start-up heap
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import logging
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import structlog

try:
    from dialplan import load_config_text
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dialplan import load_config_text

from softswitch.directory import Directory
from softswitch.lines import CallState, Direction, LineEvent, LineModel
from softswitch.sip.digest import DigestAuthenticator
from softswitch.sip.message import Request, parse_message
from softswitch.sip.transaction import Address, ClientTransaction
from softswitch.sip.transaction_layer import (
    RequestReceived,
    ResponseReceived,
    TransactionLayer,
    TransactionTimeout,
)
from softswitch.subscriptions import SubscriptionManager

LINE = "1001"
MEMBERS = [f"10{n:02d}" for n in range(1, 17)]  # the delegator and 15 delegates
PHONES_PER_MEMBER = 3
TARGET_MS = 10.0
CYCLE = (CallState.RINGING, CallState.ACTIVE, CallState.HELD, CallState.ACTIVE, CallState.ENDED)
SERVER = Address("udp", "10.0.0.1", 5060)


def config_text() -> str:
    users = "\n".join(
        f'  - {{extension: "{m}", name: "Member {m} & Co", password: p{m}}}' for m in MEMBERS
    )
    delegates = ", ".join(f'"{m}"' for m in MEMBERS[1:])
    return (
        "domain: pbx.example.com\nlisten: [udp:10.0.0.1:5060]\n"
        "media: {address: 10.0.0.1, ports: 20000-20999}\n"
        'trusted: ["10.1.0.0/16"]\n'  # the phones: authentication is not what is measured
        f'users:\n{users}\ndelegations:\n  - delegator: "{LINE}"\n    delegates: [{delegates}]\n'
    )


class Bench:
    """A notifier with 48 subscriptions on one line, its phones answering every NOTIFY."""

    def __init__(self) -> None:
        cfg = load_config_text(config_text())
        self.now = 0.0
        self.layer = TransactionLayer()
        self.model = LineModel()
        self.mgr = SubscriptionManager(
            self.layer,
            lambda transport: Address(transport, SERVER.host, SERVER.port),
            DigestAuthenticator(cfg.realm),
            Directory.from_config(cfg),
            cfg,
            self.model,
            lambda: None,
            lambda: self.now,
        )
        for i, member in enumerate(MEMBERS):
            for k in range(PHONES_PER_MEMBER):
                self.subscribe(member, Address("udp", f"10.1.{i}.{k + 1}", 5060))
        self.answer(self.layer.datagrams_to_send())
        assert self.mgr.stats().subscriptions == len(MEMBERS) * PHONES_PER_MEMBER

    def subscribe(self, member: str, phone: Address) -> None:
        raw = (
            f"SUBSCRIBE sip:{LINE}@pbx.example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {phone.host}:5060;branch=z9hG4bK{phone.host};rport\r\n"
            f"From: <sip:{member}@pbx.example.com>;tag=f{phone.host}\r\n"
            f"To: <sip:{LINE}@pbx.example.com>\r\nCall-ID: {phone.host}-blf\r\n"
            "CSeq: 1 SUBSCRIBE\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:{member}@{phone.host}:5060>\r\nEvent: dialog\r\nExpires: 3600\r\n"
            "Accept: application/dialog-info+xml\r\nContent-Length: 0\r\n\r\n"
        )
        self.layer.receive(parse_message(raw.encode()), phone, self.now)
        self.dispatch()

    def dispatch(self) -> None:
        while (ev := self.layer.next_event()) is not None:
            if isinstance(ev, RequestReceived):
                self.mgr.on_subscribe(ev.txn, ev.request, ev.source)
            elif isinstance(ev, ResponseReceived):
                self.mgr.on_response(ev.txn, ev.response)
            elif isinstance(ev, TransactionTimeout) and isinstance(ev.txn, ClientTransaction):
                self.mgr.on_timeout(ev.txn)

    def answer(self, datagrams: list[tuple[bytes, Address]]) -> int:
        """Every phone answers 200 to what it was sent; returns the number of NOTIFYs."""
        notifies = 0
        for data, dest in datagrams:
            msg = parse_message(data)
            if isinstance(msg, Request) and msg.method == "NOTIFY":
                notifies += 1
                reply = parse_message(msg.make_response(200).to_bytes())
                self.layer.receive(reply, dest, self.now)
        self.dispatch()
        return notifies

    def change(self, n: int) -> tuple[float, float]:
        """One state change of the line: (wall, CPU) seconds from the event to 48 queued
        NOTIFYs. CPU time is what our code costs; wall time adds whatever else the machine
        was running, which on a shared host dominates the tail."""
        state = CYCLE[n % len(CYCLE)]
        call = f"call-{n // len(CYCLE)}"
        party = None if state is CallState.RINGING else MEMBERS[1 + n % 15]
        event = LineEvent(
            LINE, call, state, Direction.INBOUND, party, "+15551234567", "Dave <Caller>",
            time.time() - 5, time.time(), "remote-bye" if state is CallState.ENDED else None,
            (f"{call}@pbx", "phone-tag", "our-tag"),
        )  # fmt: skip
        self.model.apply(event)  # the LineBus applies the model before any subscriber runs
        self.now += 1.0
        self.layer.handle_timer(self.now)  # retire Timer K of the last round
        start, cpu = time.perf_counter(), time.process_time()
        self.mgr.on_line_event(event)
        queued = self.layer.datagrams_to_send()
        elapsed = (time.perf_counter() - start, time.process_time() - cpu)
        if self.answer(queued) != len(MEMBERS) * PHONES_PER_MEMBER:
            raise SystemExit(f"expected 48 NOTIFYs, got {len(queued)} datagrams")
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=500, help="state changes to time")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed part")
    parser.add_argument(
        "--no-freeze", action="store_true", help="leave the start-up heap to the collector"
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    bench = Bench()
    for n in range(50):  # warm-up: caches, branch generator, allocator
        bench.change(n)
    if not args.no_freeze:
        # What a long-running service does once started: a full collection walks every object
        # of the heap (config, modules, pydantic) and takes tens of ms, which is the whole tail.
        gc.collect()
        gc.freeze()
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    runs = [bench.change(n) for n in range(args.changes)]
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    subs = len(MEMBERS) * PHONES_PER_MEMBER
    print(f"{subs} subscriptions, {args.changes} state changes, event -> {subs} NOTIFYs queued:")
    for label, index in (("wall", 0), ("cpu ", 1)):
        times = sorted(run[index] * 1000 for run in runs)
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        median = statistics.median(times)
        verdict = "ok" if p99 <= TARGET_MS else "over the target"
        print(
            f"  {label} median {median:.2f} ms  p99 {p99:.2f} ms  max {times[-1]:.2f} ms"
            f"  ({median * 1000 / subs:.0f} us/NOTIFY; p99 {verdict} of {TARGET_MS:.0f} ms)"
        )
    frozen = "no gc.freeze()" if args.no_freeze else "gc.freeze() after start-up"
    print(f"  load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {frozen}")


if __name__ == "__main__":
    main()
