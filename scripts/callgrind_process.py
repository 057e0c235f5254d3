#!/usr/bin/env python3
"""Everything the service runs per answered call, under real SIPp traffic (D18, session 6).

`scripts/callgrind.sh` counts what runs inside `Service._on_message` while an in-process
driver feeds it. This counts the **whole process**: the softswitch started from its CLI under
valgrind's callgrind, instrumentation switched on (`callgrind_control -i on`) only after
start-up and a warm-up, then SIPp places `--calls` calls through it (trusted caller, no media,
scripts/sipp/uac_call.xml -> uas_call.xml, zero hold time), then instrumentation off. The
count divided by the calls includes the event loop, the UDP reads, the media pool refills and
the timers. Instruction counts repeat to within ~0.5 % here (the loop's idle wake-ups vary).

    python3 scripts/callgrind_process.py                  # 200 calls at 10/s, ~2 minutes
    python3 scripts/callgrind_process.py --cpu --calls 3000 --rate 200
        # no valgrind: the server's utime and stime per call from /proc (for A/B runs:
        # ROOT=/path/to/other/worktree python3 scripts/callgrind_process.py --cpu ...)

Bounded: SIPp `-m` and `-timeout`, every process stopped by PID; loopback only (ports 5760,
6100-6700 and 8780, as scripts/bench_calls.sh uses; run one benchmark at a time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_calls as bc  # noqa: E402  (the scripts directory, put on the path above)
import bench_util  # noqa: E402

SIP_PORT, HTTP_PORT = 5760, 8780
UAS_PORT, UAS_MEDIA, UAS_CTRL = 6100, 6200, 6300
UAC_MEDIA, UAC_PORT, UAC_CTRL = 6400, 6500, 6600
CALLEE = "2000"


def _cpu_ticks(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime in clock ticks


def _uac(out: Path, calls: int, rate: float) -> int:
    cmd = [
        "sipp", f"127.0.0.1:{SIP_PORT}", "-sf", str(bc.SIPP_DIR / "uac_call.xml"),
        "-s", CALLEE, "-key", "caller", bc.CALLER, "-key", "rtp_port", str(UAC_MEDIA),
        "-i", "127.0.0.1", *bc.COMMON, "-p", str(UAC_PORT), "-mp", str(UAC_MEDIA),
        "-cp", str(UAC_CTRL), "-r", f"{rate:g}", "-m", str(calls), "-d", "0",
        "-timeout", f"{int(calls / rate) + 60}s",
    ]  # fmt: skip
    with open(out / "uac.out", "a") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rate", type=float, default=10.0, help="calls per second (default 10)")
    ap.add_argument("--cpu", action="store_true", help="no valgrind: CPU per call from /proc")
    ap.add_argument("--out", help="callgrind output file (default: a new file in /tmp)")
    args = ap.parse_args()
    root = Path(os.environ.get("ROOT", HERE.parent))
    work = Path(tempfile.mkdtemp(prefix="callgrind_process."))
    users = [(bc.CALLER, f"pw{bc.CALLER}"), (CALLEE, f"pw{CALLEE}")]
    cfg = work / "softswitch.yaml"
    cfg.write_text(
        bc.SOFTSWITCH_CFG.format(
            port=SIP_PORT, http=HTTP_PORT, data=work / "var", media="20000-20999",
            level="info", overload_ms=0,
            users="\n".join(f'  - {{extension: "{u}", name: User {u}, password: {p}}}'
                            for u, p in users),
        )
    )  # fmt: skip
    out = args.out or str(work / "callgrind.out")
    valgrind = (
        []
        if args.cpu
        else ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    )
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(root))
    python = str(root / ".venv/bin/python")
    with open(work / "softswitch.log", "w") as log:
        server = subprocess.Popen(
            [*valgrind, python, "-m", "softswitch", "run", "--config", str(cfg)],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    uas = None
    try:
        if not bench_util.sip_ping(SIP_PORT, 120):
            raise SystemExit(f"the softswitch did not answer; see {work}/softswitch.log")
        if not bc.register(SIP_PORT, CALLEE, f"pw{CALLEE}", UAS_PORT):
            raise SystemExit("could not register the callee")
        with open(work / "uas.out", "w") as log:
            uas = subprocess.Popen(
                ["sipp", "-sf", str(bc.SIPP_DIR / "uas_call.xml"), "-i", "127.0.0.1",
                 *bc.COMMON, "-p", str(UAS_PORT), "-mp", str(UAS_MEDIA), "-cp", str(UAS_CTRL),
                 "-m", str(args.calls + 5), "-timeout", f"{int(args.calls / args.rate) + 90}s",
                 "-key", "rtp_port", str(UAS_MEDIA)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        time.sleep(1)
        _uac(work, 5, 5)  # warm-up: first-call imports and caches stay out of the count
        time.sleep(2)
        if valgrind:
            subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        user0, sys0 = _cpu_ticks(server.pid)
        rc = _uac(work, args.calls, args.rate)
        time.sleep(2)  # the last BYE's 200 and the pool refills
        user1, sys1 = _cpu_ticks(server.pid)
        if valgrind:
            subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        if rc != 0:
            print(f"sipp exited {rc}; see {work}/uac.out", file=sys.stderr)
        tick = os.sysconf("SC_CLK_TCK")
        per = 1e6 / tick / args.calls
        user_us, kernel_us = (user1 - user0) * per, (sys1 - sys0) * per
        print(
            f"{args.calls} calls at {args.rate:g}/s: server CPU per call "
            f"{user_us:.0f} µs user + {kernel_us:.0f} µs kernel"
        )
    finally:
        if uas is not None:
            uas.terminate()
            uas.wait(10)
        server.terminate()
        server.wait(120)
    if valgrind:
        total = 0
        for line in (work / "softswitch.log").read_text().splitlines():
            if "Collected :" in line:
                total = int(line.rsplit(":", 1)[1])
        print(f"instructions, whole process: {total} ({total // args.calls} per call); "
              f"profile: {out}")  # fmt: skip
    shutil.rmtree(work / "var", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
