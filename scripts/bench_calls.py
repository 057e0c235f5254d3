#!/usr/bin/env python3
"""Call benchmarks: SIPp UAC -> server -> SIPp UAS on 127.0.0.1, the softswitch next to kamailio.

usage: bench_calls.py run [--quick] [--out DIR] [--phases "cps auth rtp fork"] [options]
       bench_calls.py report DIR            (re)write DIR/report.md from DIR/results.jsonl
       bench_calls.py rtpgen ...             the RTP load generator (started by `run`)

Phases (scripts/bench_calls.sh is the entry point; --help lists every option):
  cps   calls per second without media: the same SIPp load (uac_call.xml -> server ->
        uas_call.xml, 1 s hold, 7 messages per call through the server) at each --rates,
        --repeats times, the softswitch and kamailio interleaved run by run. The caller is
        trusted (softswitch `trusted: ["127.0.0.1/32"]`; kamailio: no auth from 127.0.0.1),
        so there is no 407. Per run: achieved rate, failed calls, INVITE->200 distribution
        (sipp -trace_rtt, 1 ms resolution), the server's CPU seconds (utime+stime of every
        process/thread from /proc) per completed call, sipp's CPU, the rest of the machine.
  auth  the same with digest auth on every INVITE (407, ACK, INVITE with credentials:
        11 messages per call): the caller then sends from 127.0.0.2, which neither server
        trusts; --auth-rates, --repeats times.
  rtp   concurrent calls with G.711 media through the softswitch's relay (kamailio has no
        relay: rtpengine is not installed). --rtp-calls N: N calls set up by SIPp
        (uac_call_rtp.xml / uas_call_rtp.xml, signalling only), media from our generator
        (`rtpgen`, one process per SIPp pair: 50 packets/s of 172 bytes each way per call,
        spread over the 20 ms period, each stamped with its send time). Over a --rtp-window
        second window: offered and relayed packets/s, loss, late (>100 ms) packets, one-way
        latency through the relay, the softswitch's CPU per 1,000 relayed packets, kernel
        drops, RSS growth per active call. --rtp-sipp-calls M: the same with SIPp's own
        rtp_stream (uac/uas_call_rtpstream.xml) as the media source, loss counted from a
        capture on lo (dumpcap), as a cross-check of the generator.
  fork  scripts/bench_fork.py: INVITE arrival -> last of 16 forked INVITEs leaving.

Servers of the cps/auth phases: --servers (default "softswitch kamailio", plus kamailio-qm
with --kamailio-qm). "floor" adds scripts/bench_floor.py's stateless proxy (CPython + uvloop
forwarding the same datagrams with almost no logic, on FLOOR_PORT): the floor under Python
for the per-call CPU; cps phase only (it does not challenge, so there is no auth run).
FLOOR_ARGS adds bench_floor.py arguments (e.g. "--loop blocking").

Each phase is bounded (sipp -m and -timeout, hard deadlines, every process stopped by its
PID). Results: DIR/results.jsonl, DIR/report.md; logs and sipp files under DIR/runs.
Needs sipp (sip-tester 3.6.1), kamailio, dumpcap (only for --rtp-sipp-calls), py-spy (only
for --profile). The softswitch runs as `$PYTHON -m softswitch run --config FILE`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_util  # noqa: E402  (scripts/bench_util.py: /proc CPU and memory of a process tree)

LO = "127.0.0.1"
UNTRUSTED = "127.0.0.2"  # the auth phase's caller: neither server trusts it
HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SIPP_DIR = HERE / "sipp"
COMMON = ["-mi", LO, "-ci", LO, "-nostdin"]
CALLER = "3000"
CALLEE0 = 2000  # callees 2000 .. 2000+CALLEES-1, a fresh one per SIPp pair and run
CALLEES = 600

# ---------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if LOGFILE is not None:
        with open(LOGFILE, "a") as f:
            f.write(line + "\n")


LOGFILE: Path | None = None
# kamailio's memory manager (-x). Its default, qm, is built with memory debugging in the Debian
# package: qm_malloc took 60 % of kamailio's CPU when forking to 16 contacts (perf), 3x the CPU
# of tlsf per call. The comparison runs kamailio as one would in production (tlsf); the cps
# phase also runs it with qm ("kamailio-qm", the default of scripts/kamailio/start.sh).
KAM_MM = os.environ.get("KAM_MM", "tlsf")
NICE = 0  # servers (and sipp / our generator) run at this nice value (--nice; < 0 needs root)


LOAD_NICE = 0  # sipp and our RTP generator (--load-nice)


def niced(cmd: list[str], nice: int | None = None) -> list[str]:
    n = NICE if nice is None else nice
    return ["nice", "-n", str(n), *cmd] if n else cmd


def group_nice(pid: int, nice: int) -> None:
    """With autogroup scheduling (kernel.sched_autogroup_enabled=1, the default) the CPU is
    shared fairly between sessions and a process's own nice value only counts inside its
    session: every process here starts its own session, so its session's autogroup gets the
    nice value too (root for < 0), else other sessions' tests take the cores anyway."""
    if not nice:
        return
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
        f.write(str(nice))


def udp_bound(port: int, host_hex: str = "0100007F") -> bool:
    """Is a UDP socket bound to 127.0.0.1:port (or 0.0.0.0:port)? From /proc/net/udp."""
    want = f"{port:04X}"
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            local = line.split()[1]
            h, p = local.split(":")
            if p == want and h in (host_hex, "00000000"):
                return True
    return False


def udp_drops(ports: set[int] | range) -> int:
    """Sum of the kernel's receive-buffer drops of the UDP sockets bound to these ports."""
    total = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if int(parts[1].split(":")[1], 16) in ports:
                total += int(parts[-1])
    return total


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_cpu(pid: int) -> float:
    """utime+stime of one process (all its threads), seconds; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return 0.0
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def run_delay(root: int) -> float:
    """Seconds the process tree's threads waited on a run queue (CPU contention), from
    /proc/PID/task/TID/schedstat."""
    total = 0
    for pid in bench_util.tree(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return total / 1e9


def pct(vals: list[float], p: float) -> float | None:
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def med(vals: list[Any]) -> Any:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def port_free(port: int) -> bool:
    if udp_bound(port):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LO, port))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# processes: everything we start is recorded and stopped by its PID


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    rusage: Any = None
    rc: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        if self.rc is None:
            try:
                pid, status, ru = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.rc = self.popen.poll() if self.popen.poll() is not None else -1
                return self.rc
            if pid:
                self.rc = os.waitstatus_to_exitcode(status)
                self.rusage = ru
                self.popen.returncode = self.rc
        return self.rc

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.rc

    def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM (sipp then writes its statistics), SIGKILL after `grace` seconds."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            if self.wait(grace) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.wait(5)
        return self.rc

    @property
    def cpu_s(self) -> float | None:
        if self.rusage is None:
            return None
        return self.rusage.ru_utime + self.rusage.ru_stime


PROCS: list[Proc] = []


def spawn(name: str, cmd: list[str], cwd: Path, out: Path, **kw: Any) -> Proc:
    f = open(out, "ab")  # noqa: SIM115 - the child writes to it; closed when we exit
    p = subprocess.Popen(
        cmd, cwd=cwd, stdout=kw.pop("stdout", f), stderr=subprocess.STDOUT,
        stdin=kw.pop("stdin", subprocess.DEVNULL), start_new_session=True, **kw,
    )  # fmt: skip
    proc = Proc(name, p)
    PROCS.append(proc)
    if cmd[:1] == ["nice"]:
        group_nice(p.pid, int(cmd[2]))
    return proc


def stop_all() -> None:
    for p in reversed(PROCS):
        if p.poll() is None:
            p.stop(grace=2.0)


# ---------------------------------------------------------------------------------------------
# SIP: REGISTER with digest (so that a SIPp UAS can then answer on the registered port)


def _md5(s: str) -> str:
    return hashlib.md5(s.encode()).hexdigest()


def digest_header(challenge: str, method: str, uri: str, user: str, pw: str, header: str) -> str:
    p = {k.lower(): a or b for k, a, b in re.findall(r'(\w+)=(?:"([^"]*)"|([^\s,]+))', challenge)}
    realm, nonce = p["realm"], p["nonce"]
    ha1 = _md5(f"{user}:{realm}:{pw}")
    ha2 = _md5(f"{method}:{uri}")
    parts = [f'username="{user}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"']
    qops = [q.strip() for q in p.get("qop", "").split(",") if q.strip()]
    if "auth" in qops:
        cnonce, nc = secrets.token_hex(8), "00000001"
        resp = _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        parts += [f'response="{resp}"', "qop=auth", f"nc={nc}", f'cnonce="{cnonce}"']
    else:
        parts.append(f'response="{_md5(f"{ha1}:{nonce}:{ha2}")}"')
    parts.append("algorithm=MD5")
    if "opaque" in p:
        parts.append(f'opaque="{p["opaque"]}"')
    return f"{header}: Digest " + ", ".join(parts)


def register(
    server_port: int,
    user: str,
    pw: str,
    from_port: int,
    expires: int = 3600,
    sock: socket.socket | None = None,
    host: str = LO,
) -> bool:
    """REGISTER user with Contact = (and sent from) host:from_port; True on 200."""
    own = sock is None
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, from_port))
    sock.settimeout(1.0)
    call_id, tag = secrets.token_hex(10), secrets.token_hex(4)
    uri = f"sip:{LO}:{server_port}"
    auth = ""
    try:
        for cseq in range(1, 4):
            for _attempt in range(4):  # UDP: retransmit a few times
                branch = "z9hG4bK" + secrets.token_hex(8)
                msg = (
                    f"REGISTER {uri} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP {host}:{from_port};branch={branch};rport\r\n"
                    "Max-Forwards: 70\r\n"
                    f"From: <sip:{user}@{LO}>;tag={tag}\r\n"
                    f"To: <sip:{user}@{LO}>\r\n"
                    f"Call-ID: {call_id}\r\n"
                    f"CSeq: {cseq} REGISTER\r\n"
                    f"Contact: <sip:{user}@{host}:{from_port}>\r\n"
                    f"{auth}"
                    f"Expires: {expires}\r\n"
                    "User-Agent: bench-calls\r\n"
                    "Content-Length: 0\r\n\r\n"
                )
                sock.sendto(msg.encode(), (LO, server_port))
                code, text = 0, ""
                with contextlib.suppress(TimeoutError, socket.timeout):
                    while True:
                        data = sock.recv(65535).decode(errors="replace")
                        if branch not in data:
                            continue
                        code = int(data.split(" ", 2)[1])
                        if code >= 200:
                            text = data
                            break
                if code:
                    break
            if code == 200:
                return True
            if code not in (401, 407):
                return False
            m = re.search(r"^(?:WWW|Proxy)-Authenticate:\s*Digest\s+(.*)$", text, re.I | re.M)
            if not m:
                return False
            hdr = "Authorization" if code == 401 else "Proxy-Authorization"
            auth = digest_header(m.group(1), "REGISTER", uri, user, pw, hdr) + "\r\n"
        return False
    finally:
        if own:
            sock.close()


# ---------------------------------------------------------------------------------------------
# servers


SOFTSWITCH_CFG = """\
# written by scripts/bench_calls.py
domain: 127.0.0.1
listen: [udp:127.0.0.1:{port}]
http: 127.0.0.1:{http}
data_dir: {data}
media: {{address: 127.0.0.1, ports: {media}}}
# the load callers (127.0.0.1) need no auth; the auth phase calls from 127.0.0.2
trusted: ["127.0.0.1/32"]
auth: {{algorithms: [MD5], max_failures: 100000000}}
log: {{level: {level}, format: json}}
overload: {{max_queue_delay_ms: {overload_ms}}}
users:
{users}
"""


class Server:
    name: str
    port: int
    pid: int

    def cpu(self) -> float:
        return bench_util.cpu_seconds(self.pid)

    def mem(self) -> dict[str, int]:
        return bench_util.mem(self.pid)


class Softswitch(Server):
    def __init__(
        self,
        out: Path,
        python: str,
        port: int,
        http: int,
        media: str,
        level: str,
        users: list[tuple[str, str]],
        tag: str = "softswitch",
        extra: str = "",
    ) -> None:
        self.name = "softswitch"
        self.port = port
        self.dir = out / tag
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.cfg = self.dir / "softswitch.yaml"
        lines = "\n".join(
            f'  - {{extension: "{u}", name: User {u}, password: {pw}}}' for u, pw in users
        )
        self.cfg.write_text(
            SOFTSWITCH_CFG.format(
                port=port,
                http=http,
                data=self.dir / "var",
                media=media,
                level=level,
                users=lines,
                overload_ms=int(os.environ.get("OVERLOAD_MS", "500")),
            )
            + extra
        )
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        )
        self.proc = spawn(
            tag,
            niced([python, "-m", "softswitch", "run", "--config", str(self.cfg)]),
            ROOT,
            self.dir / "softswitch.log",
            env=env,
        )
        self.pid = self.proc.pid
        if not bench_util.sip_ping(port, 60):
            raise SystemExit(
                f"softswitch did not answer OPTIONS on {port}; see {self.dir}/softswitch.log"
            )
        if self.proc.poll() is not None:
            raise SystemExit(f"softswitch exited; see {self.dir}/softswitch.log")

    def stop(self) -> None:
        self.proc.stop(grace=10)


# A stateful forking proxy + registrar, for the comparison. scripts/kamailio/kamailio.cfg is a
# registrar only ("403 Registrar only" to everything else), so the call benchmark renders its
# own config, trimmed from the interop reference proxy: the same globals (children=4, udp on
# 127.0.0.1, usrloc in memory, digest with qop=auth for users <4-7 digits>/pw<user>), tm +
# rr (Record-Route, loose routing), parallel forking to every contact of the AoR. Callers
# from 127.0.0.1 are trusted (no auth), like the softswitch's `trusted:`; anyone else must
# answer a 407 on INVITE. Every branch and stateless ACK whose next hop is not loopback is
# dropped (checked at start-up, like the reference).
KAMAILIO_CFG = r"""#!KAMAILIO
# written by scripts/bench_calls.py: registrar + stateful forking proxy, loopback only
debug=1
log_stderror=yes
memdbg=5
memlog=5
children=4
max_branches=16
auto_aliases=no
listen=udp:127.0.0.1:@PORT@
alias="127.0.0.1:@PORT@"
dns=no
rev_dns=no
use_dns_cache=off
dns_try_ipv6=no
server_header="Server: kamailio-bench"
user_agent_header="User-Agent: kamailio-bench"
sip_warning=0

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "sanity.so"
loadmodule "ctl.so"
loadmodule "auth.so"

modparam("ctl", "binrpc", "unix:@RUN_DIR@/kamailio_ctl")
modparam("tm", "failure_reply_mode", 3)
modparam("tm", "fr_timer", 30000)
modparam("tm", "fr_inv_timer", 120000)
modparam("rr", "enable_full_lr", 0)
modparam("rr", "append_fromtag", 1)
modparam("registrar", "method_filtering", 1)
modparam("registrar", "max_expires", 3600)
modparam("registrar", "min_expires", 10)
modparam("registrar", "gruu_enabled", 0)
modparam("usrloc", "db_mode", 0)
modparam("usrloc", "timer_interval", 30)
modparam("usrloc", "hash_size", 12)
modparam("auth", "nonce_expire", 300)

event_route[core:worker-one-init] {
	$var(a) = "192.0.2.1"; $var(b) = "127.0.0.1";
	if (!($var(a) =~ "^(127\.[0-9.]+|localhost)$") && ($var(b) =~ "^(127\.[0-9.]+|localhost)$")) {
		xlog("L_ERR", "SAFETY-SELFTEST: loopback regex OK\n");
	} else {
		xlog("L_ERR", "SAFETY-SELFTEST: loopback regex BROKEN\n");
	}
}

request_route {
	force_rport();
	if (!mf_process_maxfwd_header("10")) {
		sl_send_reply("483", "Too Many Hops");
		exit;
	}
	if (is_method("OPTIONS") && uri == myself && $rU == $null) {
		sl_send_reply("200", "Keepalive");
		exit;
	}
	if (!sanity_check("17895", "7")) {
		exit;
	}
	if (is_method("CANCEL")) {
		if (t_check_trans()) {
			route(RELAY);
		}
		exit;
	}
	if (!is_method("ACK")) {
		if (t_precheck_trans()) {
			t_check_trans();
			exit;
		}
		t_check_trans();
	}
	if (has_totag()) {
		if (loose_route()) {
			route(RELAY);
			exit;
		}
		if (is_method("ACK")) {
			if (t_check_trans()) {
				route(RELAY);
			}
			exit;
		}
		sl_send_reply("404", "Not here");
		exit;
	}
	remove_hf("Route");
	if (is_method("INVITE")) {
		record_route();
	}
	if (is_method("REGISTER")) {
		route(REGISTRAR);
		exit;
	}
	route(AUTH);
	if ($rU == $null) {
		sl_send_reply("484", "Address Incomplete");
		exit;
	}
	if (!lookup("location")) {
		t_newtran();
		send_reply("404", "Not Found");
		exit;
	}
	route(RELAY);
}

route[RELAY] {
	if (is_method("ACK") && !($nh(d) =~ "^(127\.[0-9.]+|localhost)$")) {
		xlog("L_ERR", "SAFETY: dropping ACK to non-loopback $nh(d)\n");
		exit;
	}
	t_on_branch("LOOPBACK_ONLY");
	if (!t_relay()) {
		sl_reply_error();
	}
	exit;
}

branch_route[LOOPBACK_ONLY] {
	if (!($nh(d) =~ "^(127\.[0-9.]+|localhost)$")) {
		xlog("L_ERR", "SAFETY: dropping branch to non-loopback $nh(d)\n");
		drop();
	}
}

route[REGISTRAR] {
	if ($tU =~ "^[0-9]{4,7}$") { $var(pw) = "pw" + $tU; } else { $var(pw) = ""; }
	if ($var(pw) == "" || !pv_www_authenticate("$td", "$var(pw)", "0")) {
		www_challenge("$td", "1");
		exit;
	}
	if (!save("location")) {
		sl_reply_error();
	}
	exit;
}

route[AUTH] {
	# trusted like the softswitch's `trusted: ["127.0.0.1/32"]`; everyone else: 407 (qop=auth)
	if ($si == "127.0.0.1") return;
	if ($fU =~ "^[0-9]{4,7}$") { $var(pw) = "pw" + $fU; } else { $var(pw) = ""; }
	if ($var(pw) == "" || !pv_proxy_authenticate("$fd", "$var(pw)", "0")) {
		proxy_challenge("$fd", "1");
		exit;
	}
	if ($au != $fU) {
		sl_send_reply("403", "Forbidden auth ID");
		exit;
	}
	consume_credentials();
}
"""


class Kamailio(Server):
    def __init__(
        self,
        out: Path,
        port: int,
        tag: str = "kamailio",
        mm: str | None = None,
        name: str = "kamailio",
    ) -> None:
        if not shutil.which("kamailio"):
            raise SystemExit("kamailio not found (apt-get install kamailio)")
        self.name = name
        self.port = port
        self.run = Path(out / tag)
        shutil.rmtree(self.run, ignore_errors=True)
        self.run.mkdir(parents=True)
        if len(str(self.run / "kamailio_ctl")) > 100:
            raise SystemExit(f"{self.run}: too long for a unix socket path; use a shorter --out")
        cfg = self.run / "kamailio.cfg"
        cfg.write_text(
            KAMAILIO_CFG.replace("@PORT@", str(port)).replace("@RUN_DIR@", str(self.run))
        )
        shm, pkg = os.environ.get("KAM_SHM_MB", "512"), os.environ.get("KAM_PKG_MB", "8")
        mm = mm if mm is not None else KAM_MM
        mm_args = ["-x", mm] if mm else []  # memory manager: qm (kamailio's default), fm, tlsf
        self.proc = spawn(
            tag,
            niced(
                [
                    "kamailio",
                    "-DD",
                    "-E",
                    "-f",
                    str(cfg),
                    "-m",
                    shm,
                    "-M",
                    pkg,
                    *mm_args,
                    "-Y",
                    str(self.run),
                    "-P",
                    str(self.run / "kamailio.pid"),
                ]
            ),
            self.run,
            self.run / "kamailio.log",
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            text = (self.run / "kamailio.log").read_text(errors="replace")
            if "loopback regex OK" in text and udp_bound(port):
                break
            time.sleep(0.1)
        text = (self.run / "kamailio.log").read_text(errors="replace")
        if self.proc.poll() is not None or "loopback regex OK" not in text:
            self.stop()
            raise SystemExit(
                "kamailio did not start (or failed its loopback self-test); see "
                f"{self.run}/kamailio.log"
            )
        if not bench_util.sip_ping(port, 20):
            self.stop()
            raise SystemExit("kamailio did not answer OPTIONS")

    def stop(self) -> None:
        # like scripts/kamailio/stop.sh: record the children first, SIGTERM the main process,
        # then SIGKILL whatever of those PIDs is still a kamailio
        kids = [p for p in bench_util.tree(self.pid) if p != self.pid]
        self.proc.stop(grace=10)
        for k in kids:
            try:
                if Path(f"/proc/{k}/comm").read_text().strip() == "kamailio":
                    os.kill(k, signal.SIGKILL)
            except OSError:
                pass


class Floor(Server):
    """scripts/bench_floor.py proxy: a stateless forwarding proxy in CPython + uvloop with
    (almost) no logic, run under the same load as the others: what the datagram path alone
    costs in Python, the floor under the softswitch's CPU per call."""

    def __init__(self, out: Path, python: str, port: int) -> None:
        self.name = "floor"
        self.port = port
        self.dir = out / "floor"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(
            "floor",
            niced(
                [
                    python,
                    str(HERE / "bench_floor.py"),
                    "proxy",
                    "--port",
                    str(port),
                    *os.environ.get("FLOOR_ARGS", "").split(),  # e.g. "--loop blocking"
                ]
            ),
            ROOT,
            self.dir / "floor.log",
        )
        self.pid = self.proc.pid
        if not bench_util.sip_ping(port, 20):
            self.stop()
            raise SystemExit(f"bench_floor.py did not answer OPTIONS on {port}; see {self.dir}")

    def stop(self) -> None:
        self.proc.stop(grace=5)


# ---------------------------------------------------------------------------------------------
# SIPp


class Ports:
    """Port plan on 127.0.0.1. Every run gets ports (and callee users) no earlier run used:
    the softswitch keeps retransmitting to a finished run's phones (a BYE, a 487 nobody
    ACKs) for up to 32 s, and a sipp UAS on a reused port would take such a stray BYE for a
    new call and count it as a failure. SIP ports rotate through base..base+599, media ports
    (-mp binds mp and mp+2) through base+1000..+1999, control ports (-cp) base+2000..+2099,
    the generator's sockets base+2200..+2399."""

    def __init__(self, base: int) -> None:
        self.base = base
        self._sip = self._mp = self._cp = self._gen = 0

    def _take(self, attr: str, lo: int, span: int, step: int, width: int) -> int:
        for _ in range(span // step):
            n = getattr(self, attr)
            setattr(self, attr, (n + step) % span)
            port = self.base + lo + n
            if all(not udp_bound(port + i) for i in range(width)):
                return port
        raise SystemExit(f"no free port in {self.base + lo}..{self.base + lo + span}")

    def sip(self) -> int:
        return self._take("_sip", 0, 600, 1, 1)

    def mp(self) -> int:
        return self._take("_mp", 1000, 1000, 4, 4)

    def cp(self) -> int:
        return self._take("_cp", 2000, 100, 1, 1)

    def gen(self) -> int:
        return self._take("_gen", 2200, 200, 2, 1)


def sipp_uas(
    run: Path,
    name: str,
    scenario: str,
    port: int,
    mp: int,
    cp: int,
    count: int,
    timeout: float,
    extra: list[str],
) -> Proc:
    cmd = [
        "sipp",
        "-sf",
        str(SIPP_DIR / scenario),
        "-i",
        LO,
        *COMMON,
        "-p",
        str(port),
        "-mp",
        str(mp),
        "-cp",
        str(cp),
        "-m",
        str(count),
        "-timeout",
        f"{int(timeout)}s",
        "-recv_timeout",
        "15000",
        "-trace_err",
        "-error_file",
        str(run / f"{name}_err.log"),
        "-trace_screen",
        "-screen_file",
        str(run / f"{name}_screen.log"),
        *extra,
    ]
    p = spawn(name, niced(cmd, LOAD_NICE), run, run / f"{name}.out")
    deadline = time.monotonic() + 5
    while not udp_bound(port) and time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"sipp {name} exited at once; see {run}/{name}.out")
        time.sleep(0.02)
    return p


def sipp_uac(
    run: Path,
    name: str,
    scenario: str,
    server_port: int,
    callee: str,
    port: int,
    mp: int,
    cp: int,
    rate: float,
    count: int,
    hold_ms: int,
    timeout: float,
    extra: list[str],
    ip: str = LO,
) -> Proc:
    limit = max(50, int(rate * (hold_ms / 1000 + 10)))
    cmd = [
        "sipp",
        f"{LO}:{server_port}",
        "-sf",
        str(SIPP_DIR / scenario),
        "-s",
        callee,
        "-key",
        "caller",
        CALLER,
        "-au",
        CALLER,
        "-ap",
        f"pw{CALLER}",
        "-i",
        ip,
        "-mi",
        ip,
        "-ci",
        ip,
        "-nostdin",
        "-p",
        str(port),
        "-mp",
        str(mp),
        "-cp",
        str(cp),
        "-r",
        f"{rate:g}",
        "-m",
        str(count),
        "-l",
        str(limit),
        "-d",
        str(hold_ms),
        "-timeout",
        f"{int(timeout)}s",
        "-recv_timeout",
        "15000",
        "-trace_stat",
        "-stf",
        str(run / f"{name}_stat.csv"),
        "-fd",
        "1",
        "-trace_rtt",
        "-rtt_freq",
        "1",
        "-trace_err",
        "-error_file",
        str(run / f"{name}_err.log"),
        "-trace_screen",
        "-screen_file",
        str(run / f"{name}_screen.log"),
        *extra,
    ]
    return spawn(name, niced(cmd, LOAD_NICE), run, run / f"{name}.out")


STAT_FAILS = (
    "FailedCannotSendMessage",
    "FailedMaxUDPRetrans",
    "FailedUnexpectedMessage",
    "FailedCallRejected",
    "FailedCmdNotSent",
    "FailedRegexpDoesntMatch",
    "FailedRegexpHdrNotFound",
    "FailedOutboundCongestion",
    "FailedTimeoutOnRecv",
    "FailedTimeoutOnSend",
)


def sipp_stats(run: Path, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    stat = run / f"{name}_stat.csv"
    if stat.exists():
        with open(stat, newline="") as f:
            rows = [r for r in csv.reader(f, delimiter=";") if r]
        if len(rows) >= 2:
            last = dict(zip([h.strip() for h in rows[0]], rows[-1], strict=False))

            def g(k: str) -> int:
                v = (last.get(k) or "").strip()
                return int(v) if v.isdigit() else 0

            out.update(
                created=g("OutgoingCall(C)"),
                successful=g("SuccessfulCall(C)"),
                failed=g("FailedCall(C)"),
                retransmissions=g("Retransmissions(C)"),
            )
            fails = {k: g(f"{k}(C)") for k in STAT_FAILS if g(f"{k}(C)")}
            if fails:
                out["fail_kinds"] = fails
    return out


def achieved_rate(r1: list[float], at1: list[float]) -> float:
    """Answered calls per second of one UAC: answered calls over the time from its first INVITE
    (first answer time minus its setup time) to its last answer (sipp -trace_rtt, ms)."""
    if not at1:
        return 0.0
    span = max(at1) - min(a - r for a, r in zip(at1, r1, strict=True))
    return len(at1) / (span / 1000) if span > 0 else 0.0


def achieved_of_dir(run: Path) -> float | None:
    """achieved_rate summed over the UACs of a finished run (their *_rtt.csv files)."""
    files = list(run.glob("uac_call_*_rtt.csv"))
    if not files:
        return None
    total = 0.0
    for f in files:
        r1, at1, _ = read_rtt(f)
        total += achieved_rate(r1, at1)
    return round(total, 1)


def read_rtt(path: Path) -> tuple[list[float], list[float], list[float]]:
    """sipp -trace_rtt: Date_ms;response_time_ms;rtd_no -> (rtd1 ms, rtd1 completion ms, rtd2)."""
    r1: list[float] = []
    at1: list[float] = []
    r2: list[float] = []
    with contextlib.suppress(OSError), open(path) as f:
        next(f, None)
        for line in f:
            parts = line.strip().split(";")
            if len(parts) != 3:
                continue
            try:
                at, rt, no = float(parts[0]), float(parts[1]), int(parts[2])
            except ValueError:
                continue
            if no == 1:
                r1.append(rt)
                at1.append(at)
            elif no == 2:
                r2.append(rt)
    return r1, at1, r2


# ---------------------------------------------------------------------------------------------
# the benchmark


@dataclass
class Opts:
    out: Path
    python: str
    phases: list[str]
    rates: list[int]
    auth_rates: list[int]
    repeats: int
    duration: float
    hold_ms: int
    pair_rate: int
    rtp_calls: list[int]
    rtp_sipp_calls: list[int]
    rtp_repeats: int
    rtp_window: float
    setup_rate: int
    rtp_pair_calls: int
    fork_calls: int
    fork_kamailio: bool
    kamailio_qm: bool
    servers: list[str]
    floor_port: int
    profile: bool
    profile_seconds: float
    quick: bool
    ss_port: int
    kam_port: int
    http_port: int
    media: str
    base: int
    level: str
    wait_quiet: float
    capture: bool
    nice: int
    load_nice: int
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, o: Opts) -> None:
        self.o = o
        self.res = o.out / "results.jsonl"
        self.ports = Ports(o.base)
        self.run_no = 0
        self.servers: dict[str, Server] = {}
        self.registered: set[tuple[str, int]] = set()

    def record(self, rec: dict[str, Any]) -> dict[str, Any]:
        with open(self.res, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def new_run_dir(self, label: str) -> Path:
        self.run_no += 1
        d = self.o.out / "runs" / f"{self.run_no:03d}-{label}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # --- servers ---
    def users(self) -> list[tuple[str, str]]:
        return [(CALLER, f"pw{CALLER}")] + [
            (str(CALLEE0 + k), f"pw{CALLEE0 + k}") for k in range(CALLEES)
        ]

    def callee(self, server: Server) -> tuple[str, int]:
        """A callee user nobody called before, registered at a fresh port: (user, port)."""
        self.callee_no = (getattr(self, "callee_no", -1) + 1) % CALLEES
        user, port = str(CALLEE0 + self.callee_no), self.ports.sip()
        if not register(server.port, user, f"pw{user}", port):
            raise SystemExit(f"could not register {user} at {server.name}")
        return user, port

    def quiet(self, server: Server) -> None:
        bench_util.wait_idle(server.pid, 20, 0.05)
        if self.o.wait_quiet:
            bench_util.wait_quiet(server.pid, self.o.wait_quiet, 0.3)

    # --- one SIPp call-load run ---
    def cps_run(
        self,
        server: Server,
        kind: str,
        rate: int,
        rep: int,
        profile: bool = False,
        record: bool = True,
    ) -> dict[str, Any]:
        o = self.o
        pairs = max(1, math.ceil(rate / o.pair_rate))
        count = int(rate * o.duration) if kind != "warmup" else rate
        run = self.new_run_dir(f"{server.name}-{kind}-r{rate}")
        tmax = o.duration + o.hold_ms / 1000 + 25
        per = [count // pairs + (1 if k < count % pairs else 0) for k in range(pairs)]
        callees = [self.callee(server) for _ in range(pairs)]
        uas = []
        for k in range(pairs):
            mp = self.ports.mp()
            uas.append(
                sipp_uas(
                    run,
                    f"uas{k}",
                    "uas_call.xml",
                    callees[k][1],
                    mp,
                    self.ports.cp(),
                    per[k],
                    tmax + 5,
                    ["-key", "rtp_port", str(mp)],
                )
            )
        uac_ports = [self.ports.sip() for _ in range(pairs)]
        ip = UNTRUSTED if kind == "auth" else LO
        cap = start_capture(run, uac_ports) if o.capture else None
        c0, m0, t0, w0 = (
            server.cpu(),
            bench_util.machine_busy_seconds(),
            time.time(),
            run_delay(server.pid),
        )
        load = os.getloadavg()[0]
        spy = None
        if profile:
            spy = self.start_pyspy(server, run, o.profile_seconds)
        uac = []
        for k in range(pairs):
            mp = self.ports.mp()
            uac.append(
                sipp_uac(
                    run,
                    f"uac{k}",
                    "uac_call.xml",
                    server.port,
                    callees[k][0],
                    uac_ports[k],
                    mp,
                    self.ports.cp(),
                    rate / pairs,
                    per[k],
                    o.hold_ms,
                    tmax,
                    ["-key", "rtp_port", str(mp)],
                    ip=ip,
                )
            )
        for p in uac:
            if p.wait(tmax + 10) is None:
                p.stop()
        for p in uas:
            if p.wait(5) is None:
                p.stop()
        time.sleep(0.3)  # the server's last responses
        c1, m1, t1, w1 = (
            server.cpu(),
            bench_util.machine_busy_seconds(),
            time.time(),
            run_delay(server.pid),
        )
        cap_setup: list[float] = []
        if cap is not None:
            cap[0].stop(grace=5)
            cap_setup = setup_times(cap[1], set(uac_ports))
            cap[1].unlink(missing_ok=True)
        if spy is not None:
            spy.wait(o.profile_seconds + 20) or spy.stop()
        rec: dict[str, Any] = dict(
            kind=kind,
            server=server.name,
            rate=rate,
            rep=rep,
            count=count,
            pairs=pairs,
            hold_ms=o.hold_ms,
            dir=str(run),
            loadavg=load,
        )
        ok = failed = retrans = created = 0
        fails: dict[str, int] = {}
        r1: list[float] = []
        r2: list[float] = []
        achieved = 0.0
        for k in range(pairs):
            st = sipp_stats(run, f"uac{k}")
            ok += st.get("successful", 0)
            failed += st.get("failed", 0)
            retrans += st.get("retransmissions", 0)
            created += st.get("created", 0)
            for kk, v in st.get("fail_kinds", {}).items():
                fails[kk] = fails.get(kk, 0) + v
            rtts = list(run.glob(f"uac_call_{uac[k].pid}_rtt.csv"))
            a1, at1, a2 = read_rtt(rtts[0]) if rtts else ([], [], [])
            r1 += a1
            r2 += a2
            achieved += achieved_rate(a1, at1)
        sipp_cpu = sum(p.cpu_s or 0 for p in uac + uas)
        cpu = c1 - c0
        wall = t1 - t0
        rec.update(
            successful=ok,
            failed=failed,
            created=created,
            retransmissions=retrans,
            achieved=round(achieved, 1),
            cpu_s=round(cpu, 3),
            wall_s=round(wall, 2),
            cpu_us_per_call=round(cpu / ok * 1e6, 1) if ok else None,
            cpu_core_pct=round(100 * cpu / wall, 1),
            runq_wait_pct=round(100 * (w1 - w0) / wall, 1),
            sipp_core_pct=round(100 * sipp_cpu / wall, 1),
            other_core_pct=round(100 * max(0.0, (m1 - m0) - cpu - sipp_cpu) / wall, 1),
            sipp_rc=[p.rc for p in uac],
        )
        if fails:
            rec["fail_kinds"] = fails
        rec["setup_clock"] = "sipp -trace_rtt (ms ticks)"
        if cap_setup and len(cap_setup) >= 0.9 * ok:
            r1 = cap_setup
            rec["setup_clock"] = "capture on lo"
        if r1:
            rec.update(
                setup_p50_ms=round(pct(r1, 50), 2),
                setup_p95_ms=round(pct(r1, 95), 2),
                setup_p99_ms=round(pct(r1, 99), 2),
                setup_max_ms=round(max(r1), 2),
                setup_n=len(r1),
                setup_mean_ms=round(sum(r1) / len(r1), 2),
                setup_lt1=round(100 * sum(v < 1 for v in r1) / len(r1), 1),
                setup_lt5=round(100 * sum(v < 5 for v in r1) / len(r1), 1),
                setup_lt10=round(100 * sum(v < 10 for v in r1) / len(r1), 1),
            )
        if r2:
            rec.update(bye_p50_ms=pct(r2, 50), bye_p99_ms=pct(r2, 99))
        rec["sustained"] = bool(failed == 0 and ok == count and achieved >= 0.95 * rate)
        if not profile and record:
            self.record(rec)
        log(
            f"  {server.name:<10} {kind:<4} {rate:>5}/s x{count:<5} rep {rep}: ok {ok} failed "
            f"{failed} "
            f"retrans {retrans} achieved {rec['achieved']}/s cpu {rec['cpu_us_per_call']} us/call "
            f"({rec['cpu_core_pct']} % core, waited {rec['runq_wait_pct']} %) setup p50/p99 "
            f"{rec.get('setup_p50_ms')}/{rec.get('setup_p99_ms')} ms "
            f"sipp {rec['sipp_core_pct']} % others {rec['other_core_pct']} %"
            + ("" if rec["sustained"] else "  NOT SUSTAINED")
            + (f" {fails}" if fails else "")
        )
        self.quiet(server)
        return rec

    def start_pyspy(self, server: Server, run: Path, seconds: float) -> Proc | None:
        spy = shutil.which("py-spy") or str(Path(self.o.python).parent / "py-spy")
        if not os.path.exists(spy) and not shutil.which(spy):
            log("  py-spy not found: no profile (pip install py-spy)")
            return None
        return spawn(
            "py-spy",
            [
                spy,
                "record",
                "--pid",
                str(server.pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "250",
                "--nonblocking",
                "--format",
                "raw",
                "-o",
                str(run / "pyspy.raw"),
            ],
            run,
            run / "pyspy.out",
        )

    def profile_summary(self, run: Path, name: str) -> None:
        raw = run / "pyspy.raw"
        if raw.exists() and raw.stat().st_size:
            text = bench_util.profile(str(raw), 30)
            (self.o.out / f"profile-{name}.txt").write_text(text + "\n")
            log(f"  profile written to {self.o.out}/profile-{name}.txt")

    # --- phases ---
    def phase_cps(self) -> None:
        o = self.o
        order = [n for n in o.servers if n in self.servers]
        if "kamailio-qm" in self.servers and "kamailio-qm" not in order:
            order.append("kamailio-qm")
        hopeless: dict[str, int] = {}
        for kind, rates in (("cps", o.rates), ("auth", o.auth_rates)):
            if kind not in o.phases:
                continue
            log(
                f"== {kind}: rates {rates}, {o.repeats} repeats, {o.duration:g} s of calls each, "
                f"hold {o.hold_ms} ms"
            )
            for rep in range(1, o.repeats + 1):
                for rate in rates:
                    for name in order:
                        if kind != "cps" and name in ("kamailio-qm", "floor"):
                            continue  # the floor does not challenge; qm: cps only
                        server = self.servers[name]
                        key = f"{kind}/{server.name}"
                        if rep > 1 and key in hopeless and rate >= hopeless[key]:
                            log(
                                f"  {server.name:<10} {kind:<4} {rate:>5}/s rep {rep}: skipped "
                                f"(rep 1 at {hopeless[key]}/s: < 60 % achieved or > 5 % failed)"
                            )
                            continue
                        rec = self.cps_run(server, kind, rate, rep)
                        if rec["achieved"] < 0.6 * rate or rec["failed"] > 0.05 * rec["count"]:
                            hopeless[key] = min(hopeless.get(key, rate), rate)
        if o.profile and "cps" in o.phases and "softswitch" in self.servers:
            rate = int(os.environ.get("PROFILE_RATE", "200"))
            log(
                f"== profile: py-spy on the softswitch during one more cps run at {rate}/s (not "
                "in the results)"
            )
            saved = o.duration
            o.duration = max(o.duration, o.profile_seconds + 1)
            self.cps_run(self.servers["softswitch"], "cps", rate, 0, profile=True)
            o.duration = saved
            self.profile_summary(
                self.o.out / "runs" / sorted(os.listdir(self.o.out / "runs"))[-1], "cps"
            )

    def phase_rtp(self) -> None:
        o = self.o
        # a fresh softswitch: memory per call is measured from its idle RSS
        old = self.servers.pop("softswitch", None)
        if old is not None:
            old.stop()
        ss = Softswitch(
            o.out,
            o.python,
            o.ss_port,
            o.http_port,
            o.media,
            o.level,
            self.users(),
            tag="softswitch-rtp",
        )
        self.servers["softswitch"] = ss
        time.sleep(1)
        idle = rss_kb(ss.pid)
        # warm-up: a few calls, so that first-use costs (imports, caches, the first sockets of the
        # relay) are not counted as per-call memory
        self.cps_run(ss, "warmup", 20, 0, record=False)
        time.sleep(2)
        warm = rss_kb(ss.pid)
        self.record(
            dict(
                kind="rtp-idle",
                server="softswitch",
                rss_kb=idle,
                rss_warm_kb=warm,
                pss_kb=ss.mem()["pss_kb"],
            )
        )
        log(
            f"== rtp: softswitch RSS {idle} kB idle, {warm} kB after 20 warm-up calls; calls "
            f"{o.rtp_calls} "
            "(our generator, largest first: its RSS growth is the memory per call), "
            f"{o.rtp_sipp_calls} "
            f"(sipp rtp_stream); {o.rtp_window:g} s windows, {o.rtp_repeats} repeats"
        )
        self.mem_measured = False
        for rep in range(1, o.rtp_repeats + 1):
            for n in sorted(o.rtp_calls, reverse=True):
                self.rtp_run(ss, n, rep, warm, "ours")
        for n in o.rtp_sipp_calls:
            self.rtp_run(ss, n, 1, idle, "sipp")
        if o.profile and o.rtp_calls:
            n = int(os.environ.get("PROFILE_RTP_CALLS", "400"))
            log(f"== profile: py-spy on the softswitch relaying {n} calls (not in the results)")
            self.rtp_run(ss, n, 0, idle, "ours", profile=True)

    def rtp_run(
        self, ss: Softswitch, n: int, rep: int, idle_kb: int, gen: str, profile: bool = False
    ) -> None:
        """N calls up first (media silent, for "ours"), then media for warm-up + the window."""
        o = self.o
        pairs = max(1, math.ceil(n / o.rtp_pair_calls))
        run = self.new_run_dir(f"rtp-{gen}-{n}")
        per = [n // pairs + (1 if k < n % pairs else 0) for k in range(pairs)]
        ramp = n / o.setup_rate
        window = o.rtp_window if not profile else max(o.rtp_window, o.profile_seconds + 1)
        warm, drain = 1.5, 0.5
        setup_limit = 1.5 * ramp + 5  # the window starts by then, whether every call is up or not
        hold_s = setup_limit + warm + window + drain + 3
        tmax = hold_s + ramp + 30
        rss_before = rss_kb(ss.pid)
        uac_logs = [run / f"uac{k}_logs.log" for k in range(pairs)]
        uas_logs = [run / f"uas{k}_logs.log" for k in range(pairs)]
        callees = [self.callee(ss) for _ in range(pairs)]
        gen_ports = [(self.ports.gen(), self.ports.gen()) for _ in range(pairs)]
        uas_mp = [self.ports.mp() for _ in range(pairs)]
        uac_mp = [self.ports.mp() for _ in range(pairs)]
        gens: list[Proc] = []
        if gen == "ours":
            scen_uac, scen_uas = "uac_call_rtp.xml", "uas_call_rtp.xml"
            cmd = [sys.executable, str(HERE / "bench_calls.py"), "rtpgen"]
            for k in range(pairs):
                cmd += [
                    "--pair",
                    f"{gen_ports[k][0]}:{gen_ports[k][1]}:{uac_logs[k]}:{uas_logs[k]}",
                ]
            # one process (at most one core) at the load generators' priority
            gens.append(
                spawn(
                    "gen",
                    niced(cmd, LOAD_NICE),
                    run,
                    run / "gen.err",
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
            deadline = time.monotonic() + 5
            while not all(udp_bound(p) for pp in gen_ports for p in pp):
                if time.monotonic() > deadline or gens[0].poll() is not None:
                    raise SystemExit(f"rtp generator did not start; see {run}/gen.err")
                time.sleep(0.02)
        else:
            scen_uac, scen_uas = "uac_call_rtpstream.xml", "uas_call_rtpstream.xml"
            (run / "pcmu.raw").write_bytes(b"\xff" * 8000)  # 1 s of u-law silence, looped
        uas = [
            sipp_uas(
                run,
                f"uas{k}",
                scen_uas,
                callees[k][1],
                uas_mp[k],
                self.ports.cp(),
                per[k],
                tmax,
                [
                    "-key",
                    "rtp_port",
                    str(gen_ports[k][1]),
                    "-trace_logs",
                    "-log_file",
                    str(uas_logs[k]),
                ],
            )
            for k in range(pairs)
        ]
        t_start = time.time()
        uac = [
            sipp_uac(
                run,
                f"uac{k}",
                scen_uac,
                ss.port,
                callees[k][0],
                self.ports.sip(),
                uac_mp[k],
                self.ports.cp(),
                o.setup_rate / pairs,
                per[k],
                int(hold_s * 1000),
                tmax,
                [
                    "-key",
                    "rtp_port",
                    str(gen_ports[k][0]),
                    "-trace_logs",
                    "-log_file",
                    str(uac_logs[k]),
                ],
            )
            for k in range(pairs)
        ]
        # wait until every call is up (the UAS logs after the ACK)
        deadline = t_start + setup_limit
        up_a = up_b = 0
        while time.time() < deadline:
            up_a = sum(_count_lines(p, "A ") for p in uac_logs)
            up_b = sum(_count_lines(p, "B ") for p in uas_logs)
            if up_a >= n and up_b >= n:
                break
            if all(p.poll() is not None for p in uac):
                break
            time.sleep(0.1)
        t_up = time.time()
        rss_up_silent = rss_kb(ss.pid)
        # media: our generators start sending now; the window starts after a warm-up
        t0 = time.time() + warm
        t1 = t0 + window
        for g in gens:
            assert g.popen.stdin is not None
            g.popen.stdin.write(f"go {t0:.6f} {t1:.6f}\n".encode())
            g.popen.stdin.flush()
        rec: dict[str, Any] = dict(
            kind="rtp",
            gen=gen,
            server="softswitch",
            calls=n,
            rep=rep,
            pairs=pairs,
            calls_up=min(up_a, up_b),
            setup_s=round(t_up - t_start, 2),
            window_s=window,
            dir=str(run),
        )
        cap = None
        if gen == "sipp":
            cap = start_capture(run, uas_mp + uac_mp, snaplen=64)
            if cap is None:
                log("  no capture (dumpcap, root): the sipp rtp_stream run cannot count packets")
        spy = self.start_pyspy(ss, run, o.profile_seconds) if profile else None
        time.sleep(max(0.0, t0 - time.time()))
        relay_ports = range(int(o.media.split("-")[0]), int(o.media.split("-")[1]) + 1)
        c0, m0, d0, w0 = (
            ss.cpu(),
            bench_util.machine_busy_seconds(),
            udp_drops(relay_ports),
            run_delay(ss.pid),
        )
        g0 = sum(proc_cpu(p.pid) for p in gens + uac + uas)
        time.sleep(max(0.0, t1 - time.time()))
        c1, m1, d1, w1 = (
            ss.cpu(),
            bench_util.machine_busy_seconds(),
            udp_drops(relay_ports),
            run_delay(ss.pid),
        )
        g1 = sum(proc_cpu(p.pid) for p in gens + uac + uas)
        rss_up = rss_kb(ss.pid)
        pss_up = ss.mem()["pss_kb"]
        rec["rss_up_silent_kb"] = rss_up_silent
        if gen == "ours" and not self.mem_measured and not profile:
            self.mem_measured = True
            up = max(1, min(up_a, up_b))
            self.record(
                dict(
                    kind="mem",
                    server="softswitch",
                    calls=up,
                    rss_warm_kb=idle_kb,
                    rss_up_kb=rss_up_silent,
                    kb_per_call=round((rss_up_silent - idle_kb) / up, 2),
                )
            )
            log(
                f"  memory: RSS {idle_kb} kB (warm, idle) -> {rss_up_silent} kB with {up} calls "
                "up = "
                f"{(rss_up_silent - idle_kb) / up:.1f} kB per call"
            )
        if cap is not None:
            time.sleep(0.3)
            cap[0].stop(grace=5)
        wall = t1 - t0
        cpu = c1 - c0
        rec.update(
            cpu_s=round(cpu, 3),
            cpu_core_pct=round(100 * cpu / wall, 1),
            runq_wait_pct=round(100 * (w1 - w0) / wall, 1),
            loadgen_core_pct=round(100 * (g1 - g0) / wall, 1),
            other_core_pct=round(100 * max(0.0, (m1 - m0) - cpu - (g1 - g0)) / wall, 1),
            relay_drops=d1 - d0,
            rss_before_kb=rss_before,
            rss_up_kb=rss_up,
            pss_up_kb=pss_up,
            rss_warm_kb=idle_kb,
            sipp_hold_end_margin_s=round(t_start + hold_s - t1, 1),
        )
        if gen == "ours":
            results = []
            for g in gens:
                line = _read_line(g, t1 + 15)
                results.append(json.loads(line) if line else {})
            sent = sum(r.get("sent", 0) for r in results)
            recv = sum(r.get("received", 0) for r in results)
            late = sum(r.get("late", 0) for r in results)
            hist: dict[str, int] = {}
            for r in results:
                for kk, v in r.get("latency_hist_us", {}).items():
                    hist[kk] = hist.get(kk, 0) + v
            rec.update(
                sent=sent,
                received=recv,
                late=late,
                offered_pps=round(sent / wall),
                relayed_pps=round(recv / wall),
                loss_pct=round(100 * (sent - recv) / sent, 4) if sent else None,
                late_pct=round(100 * late / sent, 4) if sent else None,
                streams=sum(r.get("streams", 0) for r in results),
                streams_with_loss=sum(r.get("streams_with_loss", 0) for r in results),
                gen_drops=sum(r.get("socket_drops", 0) for r in results),
                gen_behind_ms=max((r.get("max_behind_ms", 0) for r in results), default=0),
                gen_skipped=sum(r.get("skipped", 0) for r in results),
                kernel_ts_pct=round(
                    100 * sum(r.get("kernel_timestamps", 0) for r in results) / max(1, recv), 1
                ),
                lat_p50_us=_hist_pct(hist, 50),
                lat_p99_us=_hist_pct(hist, 99),
                lat_p999_us=_hist_pct(hist, 99.9),
                lat_max_us=max((r.get("latency_max_us", 0) for r in results), default=0),
            )
            rec["cpu_ms_per_1k_pkts"] = round(1000 * cpu / recv * 1000, 3) if recv else None
        else:
            sent = recv = 0
            if cap is not None:
                ports = set(uas_mp + uac_mp)
                for ts, sport, dport, _ in pcap_packets(cap[1]):
                    if t0 <= ts < t1:  # the CPU window
                        sent += sport in ports
                        recv += dport in ports
                cap[1].unlink(missing_ok=True)
            rec.update(
                sent=sent,
                received=recv,
                offered_pps=round(sent / wall),
                relayed_pps=round(recv / wall),
                loss_pct=round(100 * (sent - recv) / sent, 4) if sent else None,
                note="packets on lo in the window: sent by sipp vs delivered to sipp (dumpcap)",
            )
            rec["cpu_ms_per_1k_pkts"] = round(1000 * cpu / recv * 1000, 3) if recv else None
        for p in uac:
            if p.wait(tmax + 5) is None:
                p.stop()
        for p in uas:
            if p.wait(10) is None:
                p.stop()
        for g in gens:
            if g.wait(5) is None:
                g.stop()
        if spy is not None:
            spy.wait(o.profile_seconds + 20) or spy.stop()
        ok = sum(sipp_stats(run, f"uac{k}").get("successful", 0) for k in range(pairs))
        failed = sum(sipp_stats(run, f"uac{k}").get("failed", 0) for k in range(pairs))
        rec.update(calls_ok=ok, calls_failed=failed)
        if profile:
            self.profile_summary(run, f"rtp-{n}")
        else:
            self.record(rec)
        log(
            f"  rtp {gen:<4} {n:>5} calls rep {rep}: up {rec['calls_up']} in {rec['setup_s']} s; "
            f"offered {rec.get('offered_pps')} pps relayed {rec.get('relayed_pps')} pps loss "
            f"{rec.get('loss_pct')} % "
            f"late {rec.get('late_pct')} % lat p50/p99 "
            f"{rec.get('lat_p50_us')}/{rec.get('lat_p99_us')} us; "
            f"softswitch {rec['cpu_core_pct']} % core (waited for a CPU {rec['runq_wait_pct']} "
            "%) = "
            f"{rec.get('cpu_ms_per_1k_pkts')} ms per 1k pkts; "
            f"loadgen {rec['loadgen_core_pct']} % others {rec['other_core_pct']} %; "
            f"RSS {rss_before} -> {rss_up} kB; "
            f"relay drops {rec['relay_drops']} calls ok/failed {ok}/{failed} margin "
            f"{rec['sipp_hold_end_margin_s']} "
            "s"
        )
        self.quiet(ss)

    def phase_fork(self) -> None:
        o = self.o
        cmd = [
            sys.executable,
            str(HERE / "bench_fork.py"),
            "--python",
            o.python,
            "--out",
            str(o.out / "fork"),
            "--calls",
            str(o.fork_calls),
            "--port",
            str(o.ss_port + 1),
            "--http",
            str(o.http_port + 1),
            "--results",
            str(self.res),
        ]
        if o.fork_kamailio:
            cmd += ["--kamailio", "--kam-port", str(o.kam_port + 1)]
        if o.nice:
            cmd += ["--nice", str(o.nice)]
        if not o.capture:
            cmd += ["--no-capture"]
        if o.profile:
            cmd += ["--profile"]
        log("== fork: " + " ".join(cmd[1:]))
        p = subprocess.run(cmd, check=False)
        if p.returncode:
            log(f"  bench_fork.py exited with {p.returncode}")

    def run(self) -> None:
        o = self.o
        need_sip = any(ph in o.phases for ph in ("cps", "auth"))
        if need_sip:
            if "floor" in o.servers and "cps" in o.phases:
                self.servers["floor"] = Floor(o.out, o.python, o.floor_port)
            if "softswitch" in o.servers:
                self.servers["softswitch"] = Softswitch(
                    o.out, o.python, o.ss_port, o.http_port, o.media, o.level, self.users()
                )
            if "kamailio" in o.servers:
                self.servers["kamailio"] = Kamailio(o.out, o.kam_port)
            if o.kamailio_qm and "cps" in o.phases:
                self.servers["kamailio-qm"] = Kamailio(
                    o.out, o.kam_port + 2, tag="kamailio-qm", mm="qm", name="kamailio-qm"
                )
            time.sleep(1)
            for s in self.servers.values():
                c0 = s.cpu()
                time.sleep(3)
                self.record(
                    dict(
                        kind="idle",
                        server=s.name,
                        cpu_core_pct=round(100 * (s.cpu() - c0) / 3, 2),
                        rss_kb=s.mem()["rss_kb"],
                        pss_kb=s.mem()["pss_kb"],
                    )
                )
            self.phase_cps()
        if "rtp" in o.phases:
            for name in ("kamailio", "kamailio-qm", "floor"):
                kam = self.servers.pop(name, None)
                if kam is not None:
                    kam.stop()
            self.phase_rtp()
        for s in list(self.servers.values()):
            s.stop()
        self.servers.clear()
        if "fork" in o.phases:
            self.phase_fork()


def _count_lines(path: Path, prefix: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.startswith(prefix))
    except OSError:
        return 0


def _read_line(p: Proc, deadline: float) -> str:
    out = p.popen.stdout
    assert out is not None
    while time.time() < deadline:
        r, _, _ = select.select([out], [], [], 0.5)
        if r:
            line = out.readline()
            if not line:
                return ""
            if line.startswith(b"{"):
                return line.decode()
    return ""


def _hist_pct(hist: dict[str, int], p: float) -> int | None:
    total = sum(hist.values())
    if not total:
        return None
    want = p / 100 * total
    acc = 0
    for k in sorted(hist, key=int):
        acc += hist[k]
        if acc >= want:
            return int(k)
    return int(max(hist, key=int))


def start_capture(
    run: Path, ports: list[int], name: str = "dumpcap", snaplen: int = 0
) -> tuple[Proc, Path] | None:
    """dumpcap on lo for these UDP ports into a temporary pcap (classic format); None if it
    cannot run (not root, not installed)."""
    if not shutil.which("dumpcap") or os.geteuid() != 0:
        return None
    pcap = (
        Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_calls_{os.getpid()}_{run.name}_{name}.pcap"
    )
    flt = "udp and (" + " or ".join(f"port {p}" for p in ports) + ")"
    cmd = ["dumpcap", "-i", "lo", "-f", flt, "-P", "-q", "-w", str(pcap)]
    if snaplen:
        cmd[5:5] = ["-s", str(snaplen)]
    out = run / f"{name}.out"
    p = spawn(name, cmd, run, out)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "Capturing on" in out.read_text(errors="replace"):
            time.sleep(0.5)  # it says so a moment before packets are really captured
            return p, pcap
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.stop()
    pcap.unlink(missing_ok=True)
    return None


def pcap_packets(path: Path) -> Any:
    """(timestamp, sport, dport, udp payload) of every IPv4/UDP packet of a classic pcap from lo."""
    with open(path, "rb") as f:
        hdr = f.read(24)
        if len(hdr) < 24:
            return
        magic = struct.unpack("<I", hdr[:4])[0]
        endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
        rec = struct.Struct(endian + "IIII")
        while True:
            h = f.read(16)
            if len(h) < 16:
                return
            sec, frac, incl, _ = rec.unpack(h)
            data = f.read(incl)
            if len(data) < 14 + 20 + 8:
                continue
            ihl = (data[14] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", data, 14 + ihl)
            yield sec + frac / (1e9 if nano else 1e6), sport, dport, data[14 + ihl + 8 :]


_CALLID = re.compile(rb"^(?:Call-ID|i)\s*:\s*(\S+)", re.I | re.M)
_CSEQ = re.compile(rb"^CSeq\s*:\s*(\d+)\s+(\w+)", re.I | re.M)


def setup_times(pcap: Path, uac_ports: set[int]) -> list[float]:
    """Per call seen by the UAC: its first INVITE leaving -> the first 200 (INVITE) arriving, ms."""
    first: dict[bytes, float] = {}
    done: dict[bytes, float] = {}
    for ts, sport, dport, payload in pcap_packets(pcap):
        if sport in uac_ports and payload.startswith(b"INVITE "):
            m = _CALLID.search(payload)
            if m and m.group(1) not in first:
                first[m.group(1)] = ts
        elif dport in uac_ports and payload.startswith(b"SIP/2.0 200"):
            c, q = _CALLID.search(payload), _CSEQ.search(payload)
            if c and q and q.group(2) == b"INVITE" and c.group(1) not in done:
                done[c.group(1)] = ts
    return [1000 * (done[k] - first[k]) for k in done if k in first]


# ---------------------------------------------------------------------------------------------
# the RTP load generator (a separate process per SIPp pair)

PERIOD = 0.020
SLOTS = 20  # sends spread over 20 slots of 1 ms per 20 ms period
RTP_HDR = struct.Struct("!BBHII")
STAMP = struct.Struct("!Id")  # stream id, send time (time.time()), right after the RTP header
PAYLOAD = 160


class _MMsg:
    """sendmmsg/recvmmsg through ctypes: one system call per batch instead of one per packet
    (the generator shares the two cores with the relay; Python has no sendmmsg)."""

    def __init__(self) -> None:
        import ctypes as C

        self.C = C
        libc = C.CDLL(None, use_errno=True)
        self.sendmmsg, self.recvmmsg = libc.sendmmsg, libc.recvmmsg

        class IoVec(C.Structure):
            _fields_ = [("base", C.c_void_p), ("len", C.c_size_t)]

        class SockAddrIn(C.Structure):
            _fields_ = [
                ("family", C.c_ushort),
                ("port", C.c_uint16),
                ("addr", C.c_uint32),
                ("zero", C.c_char * 8),
            ]

        class MsgHdr(C.Structure):
            _fields_ = [
                ("name", C.c_void_p),
                ("namelen", C.c_uint32),
                ("iov", C.POINTER(IoVec)),
                ("iovlen", C.c_size_t),
                ("control", C.c_void_p),
                ("controllen", C.c_size_t),
                ("flags", C.c_int),
            ]

        class MMsgHdr(C.Structure):
            _fields_ = [("hdr", MsgHdr), ("len", C.c_uint)]

        self.IoVec, self.SockAddrIn, self.MMsgHdr = IoVec, SockAddrIn, MMsgHdr
        for f in (self.sendmmsg, self.recvmmsg):
            f.restype = C.c_int
        self.sendmmsg.argtypes = [C.c_int, C.c_void_p, C.c_uint, C.c_int]
        self.recvmmsg.argtypes = [C.c_int, C.c_void_p, C.c_uint, C.c_int, C.c_void_p]

    def addr(self, port: int) -> Any:
        sa = self.SockAddrIn()
        sa.family = socket.AF_INET
        sa.port = socket.htons(port)
        sa.addr = struct.unpack("=I", socket.inet_aton(LO))[0]
        return sa

    def batch(self, items: list[tuple[Any, Any]]) -> Any:
        """An mmsghdr array for (buffer, sockaddr) pairs; the caller keeps everything alive."""
        C = self.C
        arr = (self.MMsgHdr * max(1, len(items)))()
        iovs = (self.IoVec * max(1, len(items)))()
        for i, (buf, sa) in enumerate(items):
            iovs[i].base = C.addressof(buf)
            iovs[i].len = C.sizeof(buf)
            arr[i].hdr.name = C.addressof(sa)
            arr[i].hdr.namelen = C.sizeof(sa)
            arr[i].hdr.iov = C.pointer(iovs[i])
            arr[i].hdr.iovlen = 1
        return arr, iovs

    CTRL = 32  # CMSG_SPACE(sizeof(struct timespec)): SO_TIMESTAMPNS

    def rx_batch(self, n: int, size: int) -> tuple[Any, Any, bytearray, bytearray]:
        """n receive slots of `size` bytes, each with room for a kernel receive timestamp."""
        C = self.C
        big = bytearray(n * size)
        ctrl = bytearray(n * self.CTRL)
        cbuf = (C.c_char * len(big)).from_buffer(big)
        cctl = (C.c_char * len(ctrl)).from_buffer(ctrl)
        arr = (self.MMsgHdr * n)()
        iovs = (self.IoVec * n)()
        for i in range(n):
            iovs[i].base = C.addressof(cbuf) + i * size
            iovs[i].len = size
            arr[i].hdr.iov = C.pointer(iovs[i])
            arr[i].hdr.iovlen = 1
            arr[i].hdr.control = C.addressof(cctl) + i * self.CTRL
            arr[i].hdr.controllen = self.CTRL
        return (arr, iovs, cbuf, cctl), arr, big, ctrl


def rtpgen(argv: list[str]) -> int:
    """Load generator for N calls of one or more SIPp pairs: learns the relay ports from the
    sipp -trace_logs files ("A port" from the UAC, "B port" from the UAS), and on "go T0 T1"
    (stdin) sends 50 packets/s to each, spread over 20 slots of 1 ms, from the pair's A or B
    socket (the ports the sipp SDPs announced), and counts what comes back. Packets carry their
    stream and send time; those sent in [T0, T1) are counted, received until T1 + 0.5 s.
    Prints one JSON line and exits."""
    ap = argparse.ArgumentParser(prog="bench_calls.py rtpgen")
    ap.add_argument("--pair", action="append", required=True, help="A_PORT:B_PORT:A_LOG:B_LOG")
    ap.add_argument("--max-seconds", type=float, default=600)
    ap.add_argument("--no-mmsg", action="store_true", help="one sendto/recv per packet")
    a = ap.parse_args(argv)
    mm = None if a.no_mmsg else _MMsg()
    socks: list[socket.socket] = []
    logs: list[list[Any]] = []  # [path, offset, partial line, socket index]
    for spec in a.pair:
        a_port, b_port, a_log, b_log = spec.split(":", 3)
        for port, path in ((int(a_port), a_log), (int(b_port), b_log)):
            sk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for opt, fallback, size in (
                (33, socket.SO_RCVBUF, 16 << 20),
                (32, socket.SO_SNDBUF, 4 << 20),
            ):
                try:
                    sk.setsockopt(
                        socket.SOL_SOCKET, opt, size
                    )  # SO_RCVBUFFORCE / SO_SNDBUFFORCE (root)
                except OSError:
                    sk.setsockopt(socket.SOL_SOCKET, fallback, size)
            sk.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS: kernel receive times
            sk.bind((LO, port))
            sk.setblocking(False)
            logs.append([path, 0, b"", len(socks)])
            socks.append(sk)
    streams: list[list[Any]] = []  # [socket index, relay port, seq, ts, sid, buf, sent_win]
    recv_win_by: list[int] = []

    def tail() -> None:
        for entry in logs:
            path, off, part, idx = entry
            try:
                with open(path, "rb") as f:
                    f.seek(off)
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            entry[1] = off + len(data)
            lines = (part + data).split(b"\n")
            entry[2] = lines.pop()
            for line in lines:
                m = re.match(rb"[AB] (\d+)", line.strip())
                if m:
                    buf = bytearray(RTP_HDR.size + PAYLOAD)
                    streams.append(
                        [
                            idx,
                            int(m.group(1)),
                            secrets.randbelow(65536),
                            secrets.randbelow(1 << 32),
                            len(streams),
                            buf,
                            0,
                        ]
                    )
                    recv_win_by.append(0)

    stdin = sys.stdin.buffer
    win0 = win1 = stop_at = math.inf
    started = time.time()
    while True:  # until "go": learn the streams
        r, _, _ = select.select([stdin], [], [], 0.1)
        tail()
        if r:
            line = stdin.readline()
            if not line:
                return 1
            parts = line.split()
            if parts and parts[0] == b"go":
                win0, win1 = float(parts[1]), float(parts[2])
                stop_at = win1 + 0.5
                break
        if time.time() - started > a.max_seconds:
            return 1
    tail()
    # the send plan: slot k of every 20 ms period sends every 20th stream, batched per socket
    slots: list[list[tuple[int, list[list[Any]], Any]]] = [[] for _ in range(SLOTS)]
    keep: list[Any] = []
    for k in range(SLOTS):
        for idx in range(len(socks)):
            sts = [st for st in streams[k::SLOTS] if st[0] == idx]
            if not sts:
                continue
            if mm is not None:
                items = []
                for st in sts:
                    cbuf = (mm.C.c_char * len(st[5])).from_buffer(st[5])
                    sa = mm.addr(st[1])
                    keep += [cbuf, sa]
                    items.append((cbuf, sa))
                arr, iovs = mm.batch(items)
                keep += [arr, iovs]
                slots[k].append((socks[idx].fileno(), sts, arr))
            else:
                slots[k].append((idx, sts, None))
    if mm is not None:
        _rx_keep, rx_arr, rx_big, rx_ctl = mm.rx_batch(64, 256)
        rx_ptr = mm.C.addressof(rx_arr)
        rx_hdrs = [rx_arr[i].hdr for i in range(64)]
    ts_unpack = struct.Struct("qq").unpack_from
    rbuf = bytearray(2048)
    sent_win = recv_win = late = kernel_ts = skipped = 0
    lat_max = 0.0
    hist: dict[int, int] = {}
    max_behind = 0.0
    pack_hdr, pack_stamp, unpack_stamp = RTP_HDR.pack_into, STAMP.pack_into, STAMP.unpack_from
    hsize = RTP_HDR.size
    fds = [sk.fileno() for sk in socks]
    next_t = time.time()
    k = 0
    while True:
        now = time.time()
        behind = now - next_t
        if behind > max_behind and win0 <= now < win1:
            max_behind = behind
        while next_t <= now:
            in_win = win0 <= now < win1
            if now - next_t > PERIOD:  # more than a period behind (no CPU): skip, do not burst
                skipped += sum(len(sts) for _, sts, _ in slots[k])
                k = (k + 1) % SLOTS
                next_t += PERIOD / SLOTS
                continue
            for fd, sts, arr in slots[k]:
                for st in sts:
                    buf = st[5]
                    st[2] = (st[2] + 1) & 0xFFFF
                    st[3] = (st[3] + 160) & 0xFFFFFFFF
                    pack_hdr(buf, 0, 0x80, 0, st[2], st[3], st[4])
                    pack_stamp(buf, hsize, st[4], now)
                if arr is not None:
                    n = mm.sendmmsg(fd, arr, len(sts), 0)  # type: ignore[union-attr]
                else:
                    n = 0
                    for st in sts:
                        try:
                            socks[fd].sendto(st[5], (LO, st[1]))
                            n += 1
                        except OSError:
                            pass
                if in_win and n > 0:
                    sent_win += n
                    for st in sts[:n]:
                        st[6] += 1
            k = (k + 1) % SLOTS
            next_t += PERIOD / SLOTS
        for i, fd in enumerate(fds):
            while True:
                if mm is not None:
                    for hdr in rx_hdrs:  # the kernel shrinks it to what it wrote
                        hdr.controllen = 32
                    rx_ctl[:] = bytes(len(rx_ctl))
                    n = mm.recvmmsg(fd, rx_ptr, 64, socket.MSG_DONTWAIT, None)
                    if n <= 0:
                        break
                    t_now = time.time()
                    for j in range(n):
                        sid, t_sent = unpack_stamp(rx_big, j * 256 + hsize)
                        if win0 <= t_sent < win1:
                            # the kernel's receive time (SO_TIMESTAMPNS): when the relay's packet
                            # reached our socket, whatever our own loop's lag
                            sec, nsec = ts_unpack(rx_ctl, j * 32 + 16)
                            if sec:
                                lat = sec + nsec * 1e-9 - t_sent
                                kernel_ts += 1
                            else:
                                lat = t_now - t_sent
                            recv_win += 1
                            if sid < len(recv_win_by):
                                recv_win_by[sid] += 1
                            if lat > 0.1:
                                late += 1
                            if lat > lat_max:
                                lat_max = lat
                            b = int(lat * 1e5) * 10  # 10 us bins
                            hist[b] = hist.get(b, 0) + 1
                    if n < 64:
                        break
                else:
                    try:
                        nb, anc, _, _ = socks[i].recvmsg_into([rbuf], 64)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # ICMP port unreachable after a call ended
                        continue
                    if nb < hsize + STAMP.size:
                        continue
                    sid, t_sent = unpack_stamp(rbuf, hsize)
                    if win0 <= t_sent < win1:
                        t_rx = time.time()
                        for level, typ, data in anc:
                            if level == socket.SOL_SOCKET and typ == 35:  # SO_TIMESTAMPNS
                                sec, nsec = ts_unpack(data)
                                t_rx = sec + nsec * 1e-9
                                kernel_ts += 1
                        lat = t_rx - t_sent
                        recv_win += 1
                        if sid < len(recv_win_by):
                            recv_win_by[sid] += 1
                        late += lat > 0.1
                        lat_max = max(lat_max, lat)
                        b = int(lat * 1e5) * 10
                        hist[b] = hist.get(b, 0) + 1
        if now >= stop_at or now - started > a.max_seconds:
            break
        select.select(socks, [], [], max(0.0, next_t - time.time()))
    ports = {sk.getsockname()[1] for sk in socks}
    res = dict(
        streams=len(streams),
        sent=sent_win,
        received=recv_win,
        late=late,
        streams_with_loss=sum(1 for st in streams if st[6] > recv_win_by[st[4]]),
        latency_max_us=int(lat_max * 1e6),
        latency_hist_us={str(k): v for k, v in hist.items()},
        socket_drops=udp_drops(ports),
        max_behind_ms=round(max_behind * 1000, 2),
        mmsg=mm is not None,
        kernel_timestamps=kernel_ts,
        skipped=skipped,
    )
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    del keep
    return 0


# ---------------------------------------------------------------------------------------------
# report


def _f(v: Any, nd: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _cores(r: dict[str, Any]) -> float | None:
    """% of a core the server needs for the achieved rate (CPU per call x calls/s): unlike CPU
    over the run's wall time, not diluted by stragglers waiting for a timeout."""
    if not r.get("cpu_us_per_call") or not r.get("achieved"):
        return None
    return float(r["cpu_us_per_call"]) * float(r["achieved"]) / 1e4


def report(out: Path) -> str:
    with open(out / "results.jsonl") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    for r in recs:  # the same definition of "achieved" for results written by older versions
        if r.get("kind") in ("cps", "auth") and r.get("dir") and Path(r["dir"]).is_dir():
            ach = achieved_of_dir(Path(r["dir"]))
            if ach is not None:
                r["achieved"] = ach
                r["sustained"] = bool(
                    r["failed"] == 0 and r["successful"] == r["count"] and ach >= 0.95 * r["rate"]
                )
    meta = next((r for r in recs if r.get("kind") == "meta"), {})
    w: list[str] = []
    if meta:
        w.append(
            f"Run: {meta.get('date')} on {meta.get('machine')}; code: {meta.get('git')}; "
            f"command: `{meta.get('command')}`"
        )
        w.append("")
    idle = [r for r in recs if r.get("kind") == "idle"]
    if idle:
        w.append(
            "Idle servers: "
            + "; ".join(
                f"{r['server']} {r['cpu_core_pct']} % of a core, RSS {r['rss_kb']:,} kB (PSS "
                f"{r['pss_kb']:,} kB)"
                for r in idle
            )
        )
        w.append("")
    for kind, title in (
        ("cps", "Calls per second, no media, no auth (trusted caller)"),
        ("auth", "Calls per second with digest auth on every INVITE (407 + retry)"),
    ):
        rs = [r for r in recs if r.get("kind") == kind]
        if not rs:
            continue
        w.append(f"**{title}** (median of repeats; CPU = server utime+stime per completed call):")
        w.append("")
        w.append(
            "| server | offered /s | achieved /s | ok / failed (all repeats) | retrans "
            "| INVITE→200 p50 / p95 / p99 / max ms | < 1 / < 5 / < 10 ms "
            "| server CPU µs/call (min-max) | server % core at that rate "
            "| server waited for a CPU % (sum of its processes) | sipp % core "
            "| others % core | runs |"
        )
        w.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        rates = sorted({r["rate"] for r in rs})
        for rate in rates:
            for server in ("softswitch", "kamailio", "kamailio-qm", "floor"):
                g = [r for r in rs if r["rate"] == rate and r["server"] == server]
                if not g:
                    continue
                cpu = [r["cpu_us_per_call"] for r in g if r.get("cpu_us_per_call")]
                rng = f" ({min(cpu):,.0f}-{max(cpu):,.0f})" if len(cpu) > 1 else ""
                w.append(
                    f"| {server} | {rate:,} | {_f(med([r['achieved'] for r in g]), 1)} "
                    f"| {sum(r['successful'] for r in g):,} / {sum(r['failed'] for r in g):,} "
                    f"| {_f(med([r['retransmissions'] for r in g]))} "
                    f"| {_f(med([r.get('setup_p50_ms') for r in g]), 2)} / "
                    f"{_f(med([r.get('setup_p95_ms') for r in g]), 2)} / "
                    ""
                    f"{_f(med([r.get('setup_p99_ms') for r in g]), 2)} / "
                    f"{_f(float(max((r.get('setup_max_ms') or 0) for r in g)), 1)} "
                    ""
                    f"| {_f(med([r.get('setup_lt1') for r in g]), 1)} / "
                    f"{_f(med([r.get('setup_lt5') for r in g]), 1)} / "
                    ""
                    f"{_f(med([r.get('setup_lt10') for r in g]), 1)} % "
                    f"| {_f(med(cpu))}{rng} "
                    f"| {_f(med([_cores(r) for r in g]), 1)} "
                    f"| {_f(med([r.get('runq_wait_pct') for r in g]), 1)} "
                    f"| {_f(med([r['sipp_core_pct'] for r in g]), 1)} | "
                    f"{_f(med([r['other_core_pct'] for r in g]), 1)} "
                    ""
                    f"| {len(g)} |"
                )
        w.append("")
        ratio_rows = []
        for rate in rates:

            def cpu_of(server: str, rate: int = rate, rs: list[Any] = rs) -> float | None:
                return med(
                    [
                        r["cpu_us_per_call"]
                        for r in rs
                        if r["rate"] == rate and r["server"] == server and r.get("cpu_us_per_call")
                    ]
                )

            sm, km, qm = cpu_of("softswitch"), cpu_of("kamailio"), cpu_of("kamailio-qm")
            if sm and km:
                sus = all(
                    r["sustained"] for r in rs if r["rate"] == rate and r["server"] == "softswitch"
                )
                ratio_rows.append(
                    f"| {rate:,} | {sm:,.0f} | {km:,.0f} | **{sm / km:.1f}x** "
                    f"| {_f(qm)} | {f'{sm / qm:.1f}x' if qm else '-'} "
                    f"| {1e6 / sm:,.0f} | {1e6 / km:,.0f} | {'yes' if sus else 'no'} |"
                )
        floor_rows = []
        for rate in rates:
            fm, km, sm = (
                med(
                    [
                        r["cpu_us_per_call"]
                        for r in rs
                        if r["rate"] == rate and r["server"] == n and r.get("cpu_us_per_call")
                    ]
                )
                for n in ("floor", "kamailio", "softswitch")
            )
            if fm and km:
                floor_rows.append(
                    f"| {rate:,} | {fm:,.0f} | {km:,.0f} | **{fm / km:.2f}x** "
                    f"| {_f(sm)} | {f'{sm / fm:.1f}x' if sm else '-'} |"
                )
        if ratio_rows:
            w.append(
                "| offered /s | softswitch µs/call | kamailio (tlsf) µs/call | ratio (aim ≤ 1.7x) "
                "| kamailio-qm µs/call | ratio to qm | softswitch calls/s per core (projected) "
                "| kamailio calls/s per core | softswitch sustained the rate |"
            )
            w.append("|---|---|---|---|---|---|---|---|---|")
            w += ratio_rows
            w.append("")
        if floor_rows:
            w.append(
                "| offered /s | floor (bench_floor.py proxy) µs/call | kamailio µs/call "
                "| floor / kamailio | softswitch µs/call | softswitch / floor |"
            )
            w.append("|---|---|---|---|---|---|")
            w += floor_rows
            w.append("")
        fails = [r for r in rs if r.get("fail_kinds")]
        if fails:
            w.append(
                "Failed calls by sipp's reason: "
                + "; ".join(
                    f"{r['server']} {r['rate']}/s rep {r['rep']}: {r['fail_kinds']}" for r in fails
                )
            )
            w.append("")
    rtp = [r for r in recs if r.get("kind") == "rtp"]
    if rtp:
        w.append(
            "**Concurrent calls with G.711 media through the softswitch's relay** "
            "(50 packets/s of 172 bytes each way per call; median of repeats):"
        )
        w.append("")
        w.append(
            "| media source | calls | offered pkt/s | relayed pkt/s | loss % (aim < 0.1) | late "
            "> 100 ms % "
            "| relay latency p50 / p99 / p99.9 / max µs | softswitch % core | waited for a CPU % "
            "| softswitch ms CPU per 1k pkts | pkt/s per core (projected) "
            "| load generator % core | others % core | relay socket drops | runs |"
        )
        w.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for gen in ("ours", "sipp"):
            for n in sorted({r["calls"] for r in rtp if r["gen"] == gen}):
                g = [r for r in rtp if r["gen"] == gen and r["calls"] == n]
                cpk = med([r.get("cpu_ms_per_1k_pkts") for r in g])
                w.append(
                    f"| {'our generator' if gen == 'ours' else 'sipp rtp_stream'} | {n:,} "
                    f"| {_f(med([r.get('offered_pps') for r in g]))} | "
                    f"{_f(med([r.get('relayed_pps') for r in g]))} "
                    ""
                    f"| {_f(med([r.get('loss_pct') for r in g]), 3)} | "
                    f"{_f(med([r.get('late_pct') for r in g]), 3)} "
                    ""
                    f"| {_f(med([r.get('lat_p50_us') for r in g]))} / "
                    f"{_f(med([r.get('lat_p99_us') for r in g]))} / "
                    ""
                    f"{_f(med([r.get('lat_p999_us') for r in g]))} / "
                    f"{_f(max((r.get('lat_max_us') or 0) for r in g) if gen == 'ours' else None)} "
                    f"| {_f(med([r['cpu_core_pct'] for r in g]), 1)} | "
                    f"{_f(med([r.get('runq_wait_pct') for r in g]), 1)} "
                    ""
                    f"| {_f(cpk, 1)} "
                    f"| {_f(1e6 / cpk) if cpk else '-'} "
                    f"| {_f(med([r['loadgen_core_pct'] for r in g]), 1)} | "
                    f"{_f(med([r['other_core_pct'] for r in g]), 1)} "
                    ""
                    f"| {_f(med([r.get('relay_drops') for r in g]))} "
                    f"| {len(g)} |"
                )
        w.append("")
        bad = [
            r
            for r in rtp
            if r.get("calls_up", 0) < r["calls"]
            or r.get("calls_failed")
            or r.get("sipp_hold_end_margin_s", 1) < 0
        ]
        if bad:
            w.append(
                "Runs with trouble: "
                + "; ".join(
                    f"{r['gen']} {r['calls']} calls rep {r['rep']}: up {r.get('calls_up')}, "
                    f"failed {r.get('calls_failed')}, "
                    ""
                    f"hold margin {r.get('sipp_hold_end_margin_s')} s"
                    for r in bad
                )
            )
            w.append("")
    mem = [r for r in recs if r.get("kind") == "mem"]
    if rtp and mem:
        m = mem[0]
        idle_r = next((r for r in recs if r.get("kind") == "rtp-idle"), {})
        w.append(
            f"Memory per active call (aim ≤ 32 KB): RSS {_f(idle_r.get('rss_kb'))} kB idle, "
            f"{_f(m['rss_warm_kb'])} kB after 20 warm-up calls, {_f(m['rss_up_kb'])} kB with "
            f"{_f(m['calls'])} calls up "
            f"(before media) = **{m['kb_per_call']:.1f} kB per call** (2 relay endpoints = 4 UDP "
            "sockets, "
            "2 dialogs, transactions; kernel socket buffers not included)."
        )
        w.append("")
    fork = [r for r in recs if r.get("kind") == "fork"]
    if fork:
        w.append(
            "**Fork to 16 contacts** (delegator + 15 delegates, one phone each; "
            "INVITE sent by the caller → 16th forked INVITE in the phones' socket, kernel "
            "receive timestamps):"
        )
        w.append("")
        w.append(
            "| server | clock | calls | p50 µs | p95 µs | p99 µs (aim < 2,000) | max µs | first "
            "fork p50 µs "
            "| spread first→last p50 µs | server CPU µs/call | server waited for a CPU % | "
            "others % core |"
        )
        w.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in fork:
            w.append(
                f"| {r['server']} | {r['mode']} | {r['calls']:,} | {_f(r.get('p50_us'))} | "
                f"{_f(r.get('p95_us'))} "
                ""
                f"| {_f(r.get('p99_us'))} | {_f(r.get('max_us'))} | {_f(r.get('first_p50_us'))} "
                f"| {_f(r.get('spread_p50_us'))} | {_f(r.get('cpu_us_per_call'))} | "
                f"{_f(r.get('runq_wait_pct'), 1)} "
                ""
                f"| {_f(r.get('other_core_pct'), 1)} |"
            )
        w.append("")
    text = "\n".join(w)
    (out / "report.md").write_text(text + "\n")
    return text


# ---------------------------------------------------------------------------------------------


def parse_run(argv: list[str]) -> Opts:
    ap = argparse.ArgumentParser(
        prog="bench_calls.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick", action="store_true", help="about 3 minutes: fewer rates, 1 repeat, short runs"
    )
    ap.add_argument(
        "--out", help="results directory (default: a new /tmp/bench_calls.XXXXXX, kept)"
    )
    ap.add_argument("--phases", default="cps auth rtp fork", help='any of "cps auth rtp fork"')
    ap.add_argument(
        "--rates", default="100 200 400 800", help="offered call rates (calls/s) of the cps phase"
    )
    ap.add_argument("--auth-rates", default="100 200", help="offered call rates of the auth phase")
    ap.add_argument(
        "--repeats", type=int, default=3, help="repeats of every cps/auth rate (medians reported)"
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=5,
        help="seconds of call generation per cps run (calls = rate x this)",
    )
    ap.add_argument("--hold", type=int, default=1000, help="ms between ACK and BYE (cps/auth)")
    ap.add_argument(
        "--pair-rate",
        type=int,
        default=500,
        help="calls/s per sipp UAC/UAS pair (more pairs above it)",
    )
    ap.add_argument(
        "--rtp-calls",
        default="50 100 200 400 1000",
        help="concurrent calls with media (our generator)",
    )
    ap.add_argument(
        "--rtp-sipp-calls",
        default="50 200",
        help="concurrent calls with sipp rtp_stream media ('' = none)",
    )
    ap.add_argument("--rtp-repeats", type=int, default=2)
    ap.add_argument("--rtp-window", type=float, default=8, help="seconds of measured media per run")
    ap.add_argument(
        "--setup-rate", type=int, default=100, help="calls/s while setting up the media calls"
    )
    ap.add_argument(
        "--rtp-pair-calls",
        type=int,
        default=250,
        help="calls per sipp UAC/UAS pair (one generator process serves all pairs)",
    )
    ap.add_argument("--fork-calls", type=int, default=500)
    ap.add_argument(
        "--servers",
        default="softswitch kamailio",
        help="servers of the cps/auth phases, in the order they take turns: any of "
        "softswitch, kamailio, floor (scripts/bench_floor.py proxy on FLOOR_PORT, default "
        "5780; cps only); kamailio-qm follows --kamailio-qm",
    )
    ap.add_argument(
        "--fork-kamailio",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fork through kamailio (16 contacts on one AoR)",
    )
    ap.add_argument(
        "--kamailio-qm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cps phase: also kamailio with its default memory manager qm "
        "(as scripts/kamailio/start.sh)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the softswitch in one extra cps run and one rtp run",
    )
    ap.add_argument("--profile-seconds", type=float, default=6)
    ap.add_argument(
        "--capture",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="INVITE->200 from a dumpcap capture of the UAC's packets (sub-ms; root) "
        "instead of sipp's ms ticks",
    )
    ap.add_argument("--log-level", default="warning", help="softswitch log level during the load")
    ap.add_argument(
        "--nice", type=int, default=0, help="run the servers at this nice value (root for < 0)"
    )
    ap.add_argument(
        "--load-nice", type=int, default=0, help="run sipp and the RTP generator at this nice value"
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        help="before each run wait up to S s for the machine to be quiet",
    )
    a = ap.parse_args(argv)
    if a.quick:
        a.rates = "100 400"
        a.auth_rates = "100"
        a.repeats = 1
        a.duration = 3
        a.rtp_calls = "100 400"
        a.rtp_sipp_calls = "100"
        a.rtp_repeats = 1
        a.rtp_window = 4
        a.fork_calls = 200
    out = (
        Path(a.out)
        if a.out
        else Path(
            subprocess.check_output(["mktemp", "-d", "/tmp/bench_calls.XXXXXX"], text=True).strip()
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    python = os.environ.get("PYTHON", ".venv/bin/python")
    if not os.path.isabs(python) and "/" in python:
        python = str(ROOT / python)
    ss_port = int(os.environ.get("SS_PORT", "5760"))
    return Opts(
        out=out.resolve(),
        python=python,
        phases=a.phases.split(),
        rates=[int(x) for x in a.rates.split()],
        auth_rates=[int(x) for x in a.auth_rates.split()],
        repeats=a.repeats,
        duration=a.duration,
        hold_ms=a.hold,
        pair_rate=a.pair_rate,
        rtp_calls=[int(x) for x in a.rtp_calls.split()],
        rtp_sipp_calls=[int(x) for x in a.rtp_sipp_calls.split()],
        rtp_repeats=a.rtp_repeats,
        rtp_window=a.rtp_window,
        setup_rate=a.setup_rate,
        rtp_pair_calls=a.rtp_pair_calls,
        fork_calls=a.fork_calls,
        fork_kamailio=a.fork_kamailio,
        kamailio_qm=a.kamailio_qm,
        servers=a.servers.split(),
        floor_port=int(os.environ.get("FLOOR_PORT", "5780")),
        profile=a.profile,
        profile_seconds=a.profile_seconds,
        quick=a.quick,
        ss_port=ss_port,
        kam_port=int(os.environ.get("KAM_PORT", "5770")),
        http_port=int(os.environ.get("HTTP_PORT", "8780")),
        media=os.environ.get("MEDIA_PORTS", "20000-29999"),
        base=int(os.environ.get("SIPP_BASE", "5800")),
        level=a.log_level,
        wait_quiet=a.wait_quiet,
        capture=a.capture,
        nice=a.nice,
        load_nice=a.load_nice,
    )


def _git_state() -> str:
    """The commit the service ran from, and whether softswitch/ media/ dialplan/ had changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "status",
                "--porcelain",
                "--",
                "softswitch",
                "media",
                "dialplan",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + (
        f" + {len(dirty)} changed/untracked files in softswitch/ media/ dialplan/" if dirty else ""
    )


def main(argv: list[str]) -> int:
    global LOGFILE, NICE, LOAD_NICE
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd = argv[1]
    if cmd == "rtpgen":
        return rtpgen(argv[2:])
    if cmd == "report":
        print(report(Path(argv[2])))
        return 0
    if cmd != "run":
        print(__doc__, file=sys.stderr)
        return 2
    o = parse_run(argv[2:])
    NICE, LOAD_NICE = o.nice, o.load_nice
    LOGFILE = o.out / "bench.log"
    if not shutil.which("sipp"):
        raise SystemExit("sipp not found (apt-get install sip-tester)")
    if not (os.path.exists(o.python) or shutil.which(o.python)):
        raise SystemExit(f"no interpreter at {o.python} (scripts/setup.sh, or set PYTHON)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * max(o.rtp_calls + o.rtp_sipp_calls + [0]) + 1024  # 4 sockets per call in the relay
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        log(
            f"raised RLIMIT_NOFILE {soft} -> {min(want, hard)} (the relay holds 4 sockets per call)"
        )
    # the servers' ports; sipp and the generator take free ports from SIPP_BASE up (Ports)
    ports = [o.ss_port, o.kam_port, o.ss_port + 1, o.kam_port + 1, o.kam_port + 2]
    if "floor" in o.servers:
        ports.append(o.floor_port)
    unknown = set(o.servers) - {"softswitch", "kamailio", "floor"}
    if unknown:
        raise SystemExit(f"--servers: unknown {sorted(unknown)} (softswitch, kamailio, floor)")
    busy = [p for p in ports if not port_free(p)]
    if busy:
        raise SystemExit(f"ports in use: {busy} (set SS_PORT/KAM_PORT/SIPP_BASE)")
    (o.out / "results.jsonl").write_text("")
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        mem_mb = int(f.readline().split()[1]) // 1024
    machine = f"{os.cpu_count()} CPUs, {model}, {mem_mb} MB RAM"
    bench = Bench(o)
    bench.record(
        dict(
            kind="meta",
            date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            machine=machine,
            command="scripts/bench_calls.sh " + " ".join(argv[2:]),
            sipp=subprocess.run(["sipp", "-v"], capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1:],
            python=o.python,
            opts={k: str(v) for k, v in o.__dict__.items()},
            git=_git_state(),
        )
    )
    log(f"results in {o.out}")

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for s in list(bench.servers.values()):
            with contextlib.suppress(Exception):
                s.stop()
        stop_all()
    log(f"done in {time.monotonic() - t0:.0f} s")
    print(report(o.out))
    log(f"report: {o.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
