#!/usr/bin/env python3
"""Helpers for scripts/bench_register.sh (stdlib only; Linux /proc).

usage:
  bench_util.py cpu PID [--split]       utime+stime in seconds of PID, its threads and all its
                                        descendants (kamailio's forked workers), from /proc;
                                        --split prints "total user sys"
  bench_util.py mem PID                 JSON {"rss_kb", "pss_kb", "procs"} summed over the tree;
                                        PSS counts kamailio's shared memory once, not per process
  bench_util.py wait-idle PID [--max S] [--below FRACTION]
                                        wait until the tree uses < FRACTION of a core (default
                                        0.05) over 0.5 s, at most S seconds (default 30)
  bench_util.py wait-quiet [PID] [--max S] [--below CORES]
                                        wait until the rest of the machine (all but PID's tree)
                                        uses < CORES (default 0.3) over 2 s, at most S seconds
  bench_util.py sip-ping PORT [--timeout S]
                                        OPTIONS sip:127.0.0.1:PORT over UDP until a 200 arrives;
                                        exit 0 when it does, 1 after S seconds (default 120)
  bench_util.py record OUT.jsonl KEY=VALUE... [--sipp-dir DIR]
                                        append one JSON result; with --sipp-dir, the sipp results
                                        of that run (stat.csv + *_rtt.csv) are summarised into it
  bench_util.py report OUT.jsonl        markdown tables for docs/benchmarks.md
  bench_util.py machine-cpu             busy CPU seconds of the whole machine (/proc/stat)
  bench_util.py plan-sat OUT.jsonl VARIANT "RATES"
                                        the saturation-search rates between the highest load
                                        rate sustained in every repeat and the lowest one that
                                        failed in most repeats
  bench_util.py ran OUT.jsonl KIND VARIANT RATE
                                        exit 0 if such a run is recorded (KIND sustained:
                                        any run at RATE that was sustained)
  bench_util.py hopeless OUT.jsonl VARIANT RATE
                                        exit 0 if a load run at RATE or below reached < 50 %
  $PYTHON bench_util.py serve PROBE_DIR -- softswitch ARGS...
                                        run the softswitch (softswitch.cli.main(ARGS)) with a
                                        memory probe: a thread waits on the FIFO PROBE_DIR/ctl;
                                        "heap" makes it write heap.json, a census of the live
                                        Python heap by type (sys.getsizeof of every reachable
                                        object; stalls the service for seconds: idle only)
  bench_util.py probe PROBE_DIR heap [--timeout S]
                                        ask a `serve` probe for a census and print it
  bench_util.py heap-delta BEFORE.json AFTER.json [--top N] [--short]
                                        growth between two censuses, by type
  bench_util.py profile RAW.txt [--top N]
                                        top functions of a `py-spy record --format raw` profile

Values in KEY=VALUE are parsed as numbers when they look like numbers.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import socket
import statistics
import sys
import time
import uuid
from collections import Counter, defaultdict

HZ = os.sysconf("SC_CLK_TCK")


# --- /proc -------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    return data[data.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """root and all its descendants (by ppid), from one scan of /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            children[int(fields[1])].append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(root: int) -> float:
    """utime+stime (all threads) of root and its descendants. Reaped children are not counted:
    the servers here do not fork workers that exit."""
    ticks = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / HZ


def cpu_split(root: int) -> tuple[float, float]:
    """(utime, stime) in seconds of root's tree."""
    u = st = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            u += int(fields[11])
            st += int(fields[12])
    return u / HZ, st / HZ


def machine_busy_seconds() -> float:
    """CPU seconds spent by everything on the machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / HZ


def mem(root: int) -> dict[str, int]:
    rss = pss = n = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
            n += 1
        except OSError:
            continue
    return {"rss_kb": rss, "pss_kb": pss, "procs": n}


def wait_idle(root: int, max_s: float, below: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        c0 = cpu_seconds(root)
        time.sleep(0.5)
        if (cpu_seconds(root) - c0) / 0.5 < below:
            break
    return time.monotonic() - start


def wait_quiet(exclude: int, max_s: float, below: float) -> float:
    """Wait until everything but `exclude`'s tree uses < below cores over 2 s (at most max_s)."""
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        m0, c0 = machine_busy_seconds(), cpu_seconds(exclude) if exclude else 0.0
        time.sleep(2)
        m1, c1 = machine_busy_seconds(), cpu_seconds(exclude) if exclude else 0.0
        if ((m1 - m0) - (c1 - c0)) / 2 < below:
            break
    return time.monotonic() - start


def sip_ping(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    lport = sock.getsockname()[1]
    n = 0
    while time.monotonic() < deadline:
        n += 1
        branch = "z9hG4bK" + uuid.uuid4().hex[:16]
        msg = (
            f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:bench@127.0.0.1:{lport}>;tag=b{n}\r\n"
            f"To: <sip:127.0.0.1:{port}>\r\n"
            f"Call-ID: ping-{branch}@127.0.0.1\r\n"
            f"CSeq: {n} OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        sock.sendto(msg.encode(), ("127.0.0.1", port))
        try:
            while True:
                data = sock.recv(65535)
                if branch.encode() in data and data.startswith(b"SIP/2.0 200"):
                    return True
        except (TimeoutError, ConnectionRefusedError, OSError):
            time.sleep(0.2)
    return False


# --- sipp results ------------------------------------------------------------------------------
def _num(v: str) -> float | int | str:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def _pct(sorted_vals: list[int], p: float) -> int | None:
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(p / 100 * len(sorted_vals)))]


def sipp_summary(d: str) -> dict[str, object]:
    """successful/failed/retransmissions from stat.csv (last line), the achieved rate and the
    response-time percentiles from the per-call rtt file (ms resolution; 0 means < 1 ms)."""
    out: dict[str, object] = {}
    stat = os.path.join(d, "stat.csv")
    if os.path.exists(stat):
        with open(stat, newline="") as f:
            rows = [r for r in csv.reader(f, delimiter=";") if r]
        if len(rows) >= 2:
            hdr = [h.strip() for h in rows[0]]
            last = dict(zip(hdr, rows[-1], strict=False))

            def g(k: str) -> int:
                v = last.get(k, "").strip()
                return int(v) if v else 0

            out.update(
                created=g("OutgoingCall(C)"),
                successful=g("SuccessfulCall(C)"),
                failed=g("FailedCall(C)"),
                retransmissions=g("Retransmissions(C)"),
            )
    rtts: dict[int, list[int]] = {1: [], 2: []}
    done_ms: list[float] = []
    for path in glob.glob(os.path.join(d, "*_rtt.csv")):
        with open(path) as f:
            next(f, None)
            for line in f:
                parts = line.strip().split(";")
                if len(parts) != 3:
                    continue
                try:
                    at, rt, no = float(parts[0]), int(float(parts[1])), int(parts[2])
                except ValueError:
                    continue
                if no in rtts:
                    rtts[no].append(rt)
                if no == 2:
                    done_ms.append(at)
    for no, vals in rtts.items():
        vals.sort()
        out[f"rtd{no}_p50_ms"] = _pct(vals, 50)
        out[f"rtd{no}_p99_ms"] = _pct(vals, 99)
        out[f"rtd{no}_max_ms"] = vals[-1] if vals else None
    if done_ms:
        # registrations completed per second, from sipp's start to the last 200
        out["achieved_per_s"] = round(len(done_ms) / (max(done_ms) / 1000), 1)
    return out


def record(path: str, pairs: list[str], sipp_dir: str | None) -> dict[str, object]:
    rec: dict[str, object] = {}
    for p in pairs:
        k, _, v = p.partition("=")
        rec[k] = _num(v)
    if sipp_dir:
        rec.update(sipp_summary(sipp_dir))
        ok = rec.get("successful") or 0
        if "cpu0" in rec and "cpu1" in rec:
            cpu = float(rec["cpu1"]) - float(rec["cpu0"])  # type: ignore[arg-type]
            rec["cpu_s"] = round(cpu, 3)
            rec["cpu_us_per_reg"] = round(cpu / ok * 1e6, 1) if ok else None
            if "sys0" in rec and "sys1" in rec:
                sys_s = float(rec.pop("sys1")) - float(rec.pop("sys0"))  # type: ignore[arg-type]
                rec["sys_pct_of_cpu"] = round(100 * sys_s / cpu, 1) if cpu > 0 else None
        if "t0" in rec and "t1" in rec:
            wall = float(rec["t1"]) - float(rec["t0"])  # type: ignore[arg-type]
            rec["wall_s"] = round(wall, 3)
            if "cpu_s" in rec and wall > 0:
                rec["cpu_core_pct"] = round(100 * float(rec["cpu_s"]) / wall, 1)  # type: ignore[arg-type]
        if "m0" in rec and "m1" in rec and "wall_s" in rec:
            # everything else on the machine (not the server, not sipp): a noise indicator
            other = float(rec["m1"]) - float(rec["m0"]) - float(rec.get("cpu_s", 0))  # type: ignore[arg-type]
            tfile = os.path.join(sipp_dir, "sipp_time.txt")
            if os.path.exists(tfile):
                try:
                    with open(tfile) as f:
                        u, s_, _e = f.read().split()[-3:]
                    rec["sipp_cpu_s"] = round(float(u) + float(s_), 2)
                    other -= rec["sipp_cpu_s"]  # type: ignore[operator]
                except ValueError:
                    pass
            if rec["wall_s"]:
                rec["other_cpu_pct"] = round(100 * max(other, 0) / float(rec["wall_s"]), 1)  # type: ignore[arg-type]
                if "sipp_cpu_s" in rec:
                    rec["sipp_core_pct"] = round(
                        100 * float(rec["sipp_cpu_s"]) / float(rec["wall_s"]), 1
                    )  # type: ignore[arg-type]
            del rec["m0"], rec["m1"]
        if rec.get("fsyncs") and ok:
            rec["regs_per_fsync"] = round(ok / float(rec["fsyncs"]), 1)  # type: ignore[arg-type]
        rate = float(rec.get("rate", 0) or 0)  # type: ignore[arg-type]
        ach = float(rec.get("achieved_per_s", 0) or 0)  # type: ignore[arg-type]
        # sustained: nothing failed, every call completed and the achieved rate matches
        rec["sustained"] = bool(
            rate and rec.get("failed") == 0 and ok == rec.get("count") and ach >= 0.95 * rate
        )
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


# --- report ------------------------------------------------------------------------------------
def _med(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: object, nd: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _load(path: str) -> list[dict]:  # type: ignore[type-arg]
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rate_verdicts(recs: list[dict], variant: str) -> tuple[int, list[int]]:  # type: ignore[type-arg]
    """(highest load rate sustained in at least one repeat, the load rates that were hopeless
    or failed in every repeat). The machine is shared: one clean run shows the server can."""
    by_rate: dict[int, list[dict]] = defaultdict(list)  # type: ignore[type-arg]
    for r in recs:
        if r.get("kind") == "load" and r.get("variant") == variant:
            by_rate[r["rate"]].append(r)
    ok = [rate for rate, rs in by_rate.items() if any(r["sustained"] for r in rs)]
    bad = [
        rate
        for rate, rs in by_rate.items()
        if not any(r["sustained"] for r in rs) or any(_is_hopeless(r) for r in rs)
    ]
    return (max(ok) if ok else 0), sorted(bad)


def _is_hopeless(r: dict) -> bool:  # type: ignore[type-arg]
    ach = float(r.get("achieved_per_s") or 0)
    return ach < 0.5 * r["rate"] or (r.get("failed") or 0) > 0.5 * (r.get("count") or 1)


def plan_sat(path: str, variant: str, rates: list[int]) -> list[int]:
    """Saturation-search rates worth trying: above the highest load rate sustained once, below
    any load rate that was hopeless (< 50 % reached). Failing rates are tried again (noise)."""
    recs = _load(path)
    lo, _ = rate_verdicts(recs, variant)
    cap = min(
        (
            r["rate"]
            for r in recs
            if r.get("kind") == "load"
            and r.get("variant") == variant
            and r["rate"] > lo
            and _is_hopeless(r)
        ),
        default=float("inf"),
    )
    return [r for r in sorted(rates) if lo < r < cap]


def hopeless(path: str, variant: str, rate: int) -> bool:
    """True once a load run at `rate` or below reached less than half its rate (or mostly
    failed): higher or repeated runs would only overload the server and slow the next runs."""
    return any(
        r.get("kind") == "load"
        and r.get("variant") == variant
        and r.get("rate", 0) <= rate
        and _is_hopeless(r)
        for r in _load(path)
    )


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _sep(n: int) -> str:
    return "|" + "---|" * n


def _best_cpu(runs: list[dict], variant: str) -> tuple[float, int] | None:  # type: ignore[type-arg]
    """(lowest median CPU per registration over the sustained rates, that rate)."""
    by_rate: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        if r["variant"] == variant and r["sustained"] and r.get("cpu_us_per_reg"):
            by_rate[r["rate"]].append(r["cpu_us_per_reg"])
    return min(((_med(c), rt) for rt, c in by_rate.items()), default=None)  # type: ignore[arg-type]


def _highest(recs: list[dict], variant: str) -> str:  # type: ignore[type-arg]
    sats = [r for r in recs if r.get("kind") == "sat" and r["variant"] == variant]
    lo, bad = rate_verdicts(recs, variant)
    ok = [r["rate"] for r in sats if r["sustained"]] + ([lo] if lo else [])
    # a saturation rate fails only if its retry failed too
    bad += [
        rt
        for rt in {r["rate"] for r in sats}
        if not any(r["sustained"] for r in sats if r["rate"] == rt)
    ]
    bad += [
        r["rate"]
        for r in recs
        if r.get("kind") == "overload" and r["variant"] == variant and not r["sustained"]
    ]
    bad = [b for b in bad if not ok or b > max(ok)]
    if not ok and not bad:
        return "-"
    txt = f"{max(ok):,}/s" if ok else "none"
    return txt + (f" (fails at {min(bad):,}/s)" if bad else " (highest rate tried)")


def report(path: str) -> str:
    recs = _load(path)
    variants: list[str] = []
    for r in recs:
        if r.get("variant") and r["variant"] not in variants:
            variants.append(r["variant"])
    meta = next((r for r in recs if r.get("kind") == "meta"), {})
    loads = [r for r in recs if r.get("kind") == "load"]
    sats = [r for r in recs if r.get("kind") == "sat"]
    mems = {r["variant"]: r for r in recs if r.get("kind") == "mem"}
    idle = {r["variant"]: r for r in recs if r.get("kind") == "idle"}
    rates = sorted({r["rate"] for r in loads})
    out: list[str] = []
    w = out.append

    def med(rs: list[dict], key: str, nd: int = 0) -> str:  # type: ignore[type-arg]
        return _fmt(_med([r.get(key) for r in rs]), nd)  # type: ignore[misc]

    # headline
    cpu_rate = meta.get("cpu_rate") or (rates[0] if rates else None)
    w(_row("", *variants))
    w(_sep(len(variants) + 1))
    cells = []
    for v in variants:
        rs = [r for r in loads if r["variant"] == v and r["rate"] == cpu_rate]
        cells.append(med(rs, "cpu_us_per_reg") + " µs")
    w(_row(f"CPU per registration at {cpu_rate}/s (median of repeats)", *cells))
    best = {v: _best_cpu(loads + sats, v) for v in variants}
    w(
        _row(
            "Lowest CPU per registration at a rate it sustained",
            *(f"{_fmt(b[0])} µs at {b[1]:,}/s" if b else "-" for b in best.values()),
        )
    )
    w(
        _row(
            "= registrations per second per core (1 s / the lowest CPU per registration)",
            *(_fmt(1e6 / b[0]) + " /s" if b else "-" for b in best.values()),
        )
    )
    w(
        _row(
            "Highest rate without failures (achieved ≥ 95 %)",
            *(_highest(recs, v) for v in variants),
        )
    )
    cells = []
    for v in variants:
        m = mems.get(v)
        cells.append(f"{_fmt(m['bytes_per_binding'])} B" if m else "-")
    w(_row("Memory per binding (live allocations after settling)", *cells))
    cells = []
    for v in variants:
        m = mems.get(v)
        if m:
            pss = (m["pss_settled_kb"] - m["pss_before_kb"]) / 1024 * 10000 / m["users"]
            cells.append(f"{_fmt(m['mb_per_10k'], 1)} MB (PSS +{_fmt(pss, 1)} MB)")
        else:
            cells.append("-")
    w(_row("Memory per 10,000 registrations", *cells))
    w("")

    # per rate
    w("Per offered rate (median over repeats; range in brackets; failed: sum):")
    w("")
    w(
        _row(
            "server",
            "offered /s",
            "achieved /s",
            "failed",
            "retrans",
            "CPU µs/reg",
            "of which kernel %",
            "server CPU % of a core",
            "RTD1 p50/p99 ms",
            "RTD2 p50/p99 ms",
            "REGISTERs per fdatasync",
            "sipp CPU %",
            "others' CPU %",
            "repeats",
        )
    )
    w(_sep(14))
    for v in variants:
        for rate in rates:
            rs = [r for r in loads if r["variant"] == v and r["rate"] == rate]
            if not rs:
                continue
            cpu = [r["cpu_us_per_reg"] for r in rs if r.get("cpu_us_per_reg") is not None]
            rng = f" ({min(cpu):,.0f}-{max(cpu):,.0f})" if len(cpu) > 1 else ""
            w(
                _row(
                    v,
                    f"{rate:,}",
                    med(rs, "achieved_per_s"),
                    sum(r.get("failed", 0) or 0 for r in rs),
                    med(rs, "retransmissions"),
                    med(rs, "cpu_us_per_reg") + rng,
                    med(rs, "sys_pct_of_cpu"),
                    med(rs, "cpu_core_pct"),
                    f"{med(rs, 'rtd1_p50_ms')} / {med(rs, 'rtd1_p99_ms')}",
                    f"{med(rs, 'rtd2_p50_ms')} / {med(rs, 'rtd2_p99_ms')}",
                    med(rs, "regs_per_fsync", 1),
                    med(rs, "sipp_core_pct"),
                    med(rs, "other_cpu_pct"),
                    len(rs),
                )
            )
    w("")
    if sats:
        w("Saturation search (one run per rate, a failing rate is retried once):")
        w("")
        w(
            _row(
                "server",
                "offered /s",
                "achieved /s",
                "failed",
                "retrans",
                "CPU µs/reg",
                "RTD2 p99 ms",
                "others' CPU %",
                "sustained",
            )
        )
        w(_sep(9))
        for r in sats:
            w(
                _row(
                    r["variant"],
                    f"{r['rate']:,}",
                    _fmt(r.get("achieved_per_s")),
                    r.get("failed"),
                    r.get("retransmissions"),
                    _fmt(r.get("cpu_us_per_reg")),
                    _fmt(r.get("rtd2_p99_ms")),
                    _fmt(r.get("other_cpu_pct")),
                    "yes" if r["sustained"] else "no",
                )
            )
        w("")
    overs = [r for r in recs if r.get("kind") == "overload"]
    if overs:
        w("Overload (one short run at OVERLOAD_RATE, after everything else):")
        w("")
        w(
            _row(
                "server",
                "offered /s",
                "completed",
                "failed",
                "retrans",
                "achieved /s",
                "CPU µs/reg",
                "RTD2 p50/p99 ms",
            )
        )
        w(_sep(8))
        for r in overs:
            w(
                _row(
                    r["variant"],
                    f"{r['rate']:,}",
                    f"{_fmt(r.get('successful'))} of {_fmt(r.get('count'))}",
                    r.get("failed"),
                    _fmt(r.get("retransmissions")),
                    _fmt(r.get("achieved_per_s")),
                    _fmt(r.get("cpu_us_per_reg")),
                    f"{_fmt(r.get('rtd2_p50_ms'))} / {_fmt(r.get('rtd2_p99_ms'))}",
                )
            )
        w("")
    if mems:
        w(
            f"Memory: every user registered once on a fresh server, then {meta.get('settle', '?')}"
            " s idle (transactions gone):"
        )
        w("")
        w(
            _row(
                "server",
                "bindings",
                "measured",
                "live after the fill",
                "live after settling",
                "per binding",
                "PSS before → after → settled",
                "PSS per binding",
            )
        )
        w(_sep(8))
        for v, m in mems.items():
            after = m.get("live_after_bytes")
            w(
                _row(
                    v,
                    f"{m['users']:,}",
                    m.get("what", ""),
                    f"{_fmt(after // 1024)} kB" if after is not None else "-",
                    f"{_fmt(m.get('live_settled_bytes', 0) // 1024)} kB",
                    f"{_fmt(m.get('bytes_per_binding'))} B",
                    f"{_fmt(m.get('pss_before_kb'))} → {_fmt(m.get('pss_after_kb'))} → "
                    f"{_fmt(m.get('pss_settled_kb'))} kB",
                    f"{_fmt(m.get('pss_bytes_per_binding'))} B",
                )
            )
        w("")
        for v, m in mems.items():
            if m.get("top"):
                w(f"Heap growth of {v} by type (after settling minus before the fill): {m['top']}")
                w("")
    if idle:
        cores = ", ".join(
            f"{v} {_fmt(r.get('cpu_core_pct'), 2)} % of a core" for v, r in idle.items()
        )
        w(f"Server CPU while settling (no load; the finished transactions' timers fire): {cores}")
        w("")
    return "\n".join(out)


def profile(path: str, top: int) -> str:
    """Self and inclusive time per function (line numbers dropped) from py-spy's raw format,
    per thread. py-spy counts a thread as active when it is not in a known idle call, so a
    thread waiting for the GIL (or, here, the bench's own probe thread blocked on its FIFO)
    shows up too: the probe thread is left out, the others are reported separately."""
    per_thread: dict[str, tuple[Counter[str], Counter[str]]] = {}
    totals: Counter[str] = Counter()
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        stack, _, n_s = line.rstrip().rpartition(" ")
        if not stack:
            continue
        n = int(n_s)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        if thread == "bench-memprobe":
            continue
        totals[thread] += n
        self_c, incl = per_thread.setdefault(thread, (Counter(), Counter()))
        funcs = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in frames[1:]]
        if funcs:
            self_c[funcs[-1]] += n
        for f in set(funcs):
            incl[f] += n
    total = sum(totals.values()) or 1
    out = [
        f"samples: {total}; " + ", ".join(f"{t} {c / total:.0%}" for t, c in totals.most_common())
    ]
    skip = (
        "<module>",
        "_run_module_as_main",
        "_run_code",
        "run_service",
        "main (",
        "run (uvloop",
        "Runner.run (",
        "Thread._bootstrap",
        "Thread.run",
        "serve (",
        "_run (softswitch/cli",
    )
    for thread, n in totals.most_common():
        self_c, incl = per_thread[thread]
        k = top if n > 0.3 * total else max(5, top // 4)
        out.append(f"\n[{thread}] self time (% of this thread's samples):")
        out += [f"  {c / n * 100:5.1f}%  {f}" for f, c in self_c.most_common(k)]
        out.append(f"[{thread}] inclusive time (the function and what it calls):")
        out += [
            f"  {c / n * 100:5.1f}%  {f}"
            for f, c in incl.most_common(k + 20)
            if not any(f.startswith(s) for s in skip)
        ][:k]
    return "\n".join(out)


def heap_census() -> dict[str, object]:
    """Every Python object reachable from the gc-tracked ones (the gc untracks tuples and dicts
    of atoms, and never tracks str/int/float/bytes: those are reached as referents), with
    sys.getsizeof: the live Python heap, by type. Holds the GIL for a few seconds: call it
    only while the server is idle."""
    import gc

    gc.collect()
    seen: set[int] = set()
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    total = count = 0
    stack = gc.get_objects()
    mine = {id(seen), id(by_type), id(stack), id(sys._getframe())}  # the census itself
    stack = [o for o in stack if id(o) not in mine]
    for o in stack:
        seen.add(id(o))
    while stack:
        o = stack.pop()
        try:
            size = sys.getsizeof(o)
        except TypeError:
            size = 0
        t = type(o)
        entry = by_type[
            f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__
        ]
        entry[0] += 1
        entry[1] += size
        total += size
        count += 1
        for ref in gc.get_referents(o):
            if id(ref) not in seen and not gc.is_tracked(ref):
                seen.add(id(ref))
                stack.append(ref)
    return {"bytes": total, "objects": count, "by_type": dict(by_type)}


def serve(probe_dir: str, args: list[str]) -> int:
    import threading

    os.makedirs(probe_dir, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    fifo = os.path.join(probe_dir, "ctl")
    if os.path.exists(fifo):
        os.unlink(fifo)
    os.mkfifo(fifo)

    def watch() -> None:
        # open() of a FIFO blocks in C (GIL released) until a client writes: no polling
        while True:
            with open(fifo) as f:
                cmd = f.read().strip()
            if cmd != "heap":
                continue
            t0 = time.monotonic()
            out = heap_census()
            out["seconds"] = round(time.monotonic() - t0, 2)
            tmp = os.path.join(probe_dir, "heap.json.tmp")
            with open(tmp, "w") as f:
                json.dump(out, f)
            os.replace(tmp, os.path.join(probe_dir, "heap.json"))

    threading.Thread(target=watch, name="bench-memprobe", daemon=True).start()
    from softswitch.cli import main as softswitch_main

    return int(softswitch_main(args) or 0)


def heap_delta(before: str, after: str, top: int) -> dict[str, object]:
    with open(before) as fa, open(after) as fb:
        a, b = json.load(fa), json.load(fb)
    rows = []
    for t, (n, size) in b["by_type"].items():
        n0, s0 = a["by_type"].get(t, [0, 0])
        if size - s0:
            rows.append((size - s0, n - n0, t))
    rows.sort(reverse=True)
    return {
        "bytes": b["bytes"] - a["bytes"],
        "objects": b["objects"] - a["objects"],
        "census_seconds": b.get("seconds"),
        "top": [{"type": t, "bytes": d, "objects": n} for d, n, t in rows[:top]],
    }


def probe(probe_dir: str, cmd: str, timeout: float) -> int:
    answer = os.path.join(probe_dir, cmd + ".json")
    if os.path.exists(answer):
        os.unlink(answer)
    fd = os.open(os.path.join(probe_dir, "ctl"), os.O_WRONLY | os.O_NONBLOCK)  # fails if no reader
    os.write(fd, (cmd + "\n").encode())
    os.close(fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(answer):
            with open(answer) as f:
                print(f.read())
            return 0
        time.sleep(0.1)
    print("{}")
    return 1


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    cmd, args = argv[1], argv[2:]

    def opt(name: str, default: str) -> str:
        if name in args:
            i = args.index(name)
            val = args[i + 1]
            del args[i : i + 2]
            return val
        return default

    if cmd == "serve":
        rest = args[args.index("--") + 1 :] if "--" in args else args[1:]
        return serve(args[0], rest)
    if cmd == "probe":
        try:
            return probe(args[0], args[1], float(opt("--timeout", "60")))
        except OSError as exc:
            print(f"probe: {exc}", file=sys.stderr)
            return 1
    if cmd == "cpu":
        if "--split" in args:
            user, system = cpu_split(int(args[0]))
            print(f"{user + system:.2f} {user:.2f} {system:.2f}")
        else:
            print(f"{cpu_seconds(int(args[0])):.2f}")
    elif cmd == "mem":
        print(json.dumps(mem(int(args[0]))))
    elif cmd == "wait-idle":
        mx, below = float(opt("--max", "30")), float(opt("--below", "0.05"))
        print(f"{wait_idle(int(args[0]), mx, below):.1f}")
    elif cmd == "wait-quiet":
        mx, below = float(opt("--max", "60")), float(opt("--below", "0.3"))
        print(f"{wait_quiet(int(args[0]) if args else 0, mx, below):.1f}")
    elif cmd == "sip-ping":
        return 0 if sip_ping(int(args[0]), float(opt("--timeout", "120"))) else 1
    elif cmd == "record":
        sipp_dir = opt("--sipp-dir", "")
        rec = record(args[0], args[1:], sipp_dir or None)
        print(json.dumps(rec))
    elif cmd == "report":
        print(report(args[0]))
    elif cmd == "profile":
        top = int(opt("--top", "25"))
        print(profile(args[0], top))
    elif cmd == "heap-delta":
        d = heap_delta(args[0], args[1], int(opt("--top", "12")))
        if "--short" in args:
            print(
                "; ".join(
                    f"{t['type']} {t['bytes'] // 1024:+,} kB ({t['objects']:+,})"
                    for t in d["top"][:8]
                )
            )
        else:
            print(json.dumps(d))
    elif cmd == "machine-cpu":
        print(f"{machine_busy_seconds():.2f}")
    elif cmd == "plan-sat":
        print(
            " ".join(str(r) for r in plan_sat(args[0], args[1], [int(x) for x in args[2].split()]))
        )
    elif cmd == "ran":
        kind, variant, rate = args[1], args[2], int(args[3])
        return (
            0
            if any(
                (r.get("kind") == kind or (kind == "sustained" and r.get("sustained")))
                and r.get("variant") == variant
                and r.get("rate") == rate
                for r in _load(args[0])
            )
            else 1
        )
    elif cmd == "hopeless":
        return 0 if hopeless(args[0], args[1], int(args[2])) else 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
