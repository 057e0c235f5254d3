#!/usr/bin/env bash
# Instructions executed inside Service._on_message, counted by callgrind (docs/decisions.md, D18).
#
# Usage: scripts/callgrind.sh [--out FILE] [--top N] [bench_inproc.py arguments]
#   scripts/callgrind.sh --users 300            # a registration = 2 REGISTERs (401, then 200)
#   scripts/callgrind.sh --fork --calls 100     # INVITE -> 16 forks -> 16 x 486 -> 486 -> ACK
#
# Wall-clock and CPU timings on this 2-vCPU VM vary by +-20 % run to run on the same build;
# the instruction count repeats to within 0.1 %, so a change of 2 % is visible. Counted is
# only what runs inside the datagram handler (parser, transactions, registrar, digest, call
# set-up, logging); the store's writer thread and the event loop are not. Needs the compiled
# build (the toggle names its C function) and valgrind
# (Debian package) and takes ~30 s for 300 registrations (valgrind runs ~50x slower).
# Prints the total, the count per unit of work and the inclusive top of the call tree;
# `callgrind_annotate --tree=calling --inclusive=yes FILE` shows who calls what.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp /tmp/callgrind.XXXXXX.out)
top=40
args=()
while (($#)); do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --top) top=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
command -v valgrind >/dev/null || { echo "callgrind.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }
PYTHON=${PYTHON:-.venv/bin/python}
summary=$(PYTHONHASHSEED=0 valgrind --tool=callgrind \
  --toggle-collect='CPyPy_softswitch___service___Service____on_message' \
  --callgrind-out-file="$out" "$PYTHON" scripts/bench_inproc.py "${args[@]}" 2>&1)
echo "$summary" | grep -E "registrations|calls forked|calls answered" || true
total=$(echo "$summary" | sed -n 's/.*Collected : \([0-9]*\).*/\1/p')
units=$(echo "$summary" | sed -n 's/^\([0-9]*\) \(registrations\|calls\).*/\1/p' | head -1)
echo "instructions inside _on_message: $total${units:+ ($((total / units)) per unit of work, $units units)}"
echo "profile: $out"
callgrind_annotate --inclusive=yes "$out" 2>/dev/null \
  | grep -E 'CPyDef|\.py:|sre_|encoder|gc_collect' | grep -v '/build/__native' | head -"$top" \
  | sed -E 's#/tmp/python-build[^:]*:##; s# \[/.*##; s#build/__native_softswitch_[a-z]+\.c:CPyDef_##'
