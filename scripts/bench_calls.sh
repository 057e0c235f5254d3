#!/usr/bin/env bash
# Call benchmarks: SIPp UAC -> softswitch -> SIPp UAS on 127.0.0.1, next to kamailio as a
# stateful proxy under the same SIPp load, plus media through the softswitch's relay and the
# 16-way fork latency. The logic is in scripts/bench_calls.py (and scripts/bench_fork.py).
#
# Usage: scripts/bench_calls.sh [--quick] [--out DIR] [--phases "cps auth rtp fork"] [--profile]
#                               [--rates "100 200 400 800"] [--repeats 3] [--nice N] ...
#   --quick     about 3 minutes: 2 rates, 1 repeat, short runs, 2 media sizes, 200 fork calls
#   (default)   about 15 minutes: 4 rates x 3 repeats x 3 servers, auth at 2 rates, media at
#               50/100/200/400/1000 calls (2 repeats) + sipp rtp_stream at 50/200, 500 fork calls
#   --profile   also py-spy the softswitch during one extra cps run and one media run
#   --servers   cps/auth servers, default "softswitch kamailio"; "floor" adds the CPython +
#               uvloop floor (scripts/bench_floor.py proxy, cps only)
#   --help      every option (bench_calls.py run --help)
#
# Env: PYTHON (default .venv/bin/python: runs `python -m softswitch run --config FILE`),
#      SS_PORT (5760; the fork bench uses +1), KAM_PORT (5770, +1 fork, +2 kamailio-qm),
#      HTTP_PORT (8780), SIPP_BASE (5800: sipp and generator ports from there up to +2400),
#      MEDIA_PORTS (softswitch relay range, 20000-29999), KAM_MM (kamailio memory manager for
#      "kamailio": tlsf; "kamailio-qm" always runs qm, kamailio's default), FLOOR_PORT (5780)
#      and FLOOR_ARGS (--servers floor: scripts/bench_floor.py proxy and its extra arguments),
#      OVERLOAD_MS (500: the softswitch's overload.max_queue_delay_ms; 0 turns shedding off).
# Results: DIR/results.jsonl, DIR/report.md (also printed), DIR/bench.log, per-run sipp files
# under DIR/runs, fork results under DIR/fork. DIR defaults to a new /tmp/bench_calls.XXXXXX
# and is kept. Every process is stopped by its PID; loopback only; needs root for dumpcap
# (sub-ms INVITE->200 and the sipp rtp_stream packet count) and for --nice < 0.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^set -u/{/^#/p}' "$0"; echo; exec python3 scripts/bench_calls.py run --help ;; esac
export PYTHON=${PYTHON:-.venv/bin/python}
for tool in sipp kamailio python3; do
  command -v "$tool" >/dev/null || { echo "bench_calls.sh: $tool not found" >&2; exit 1; }
done
exec python3 scripts/bench_calls.py run "$@"
