#!/usr/bin/env bash
# REGISTER benchmark: softswitch vs kamailio, same users, same SIPp load, same run.
#
# Usage: scripts/bench_register.sh [--quick] [--out DIR] [--users N] [--rates "500 1000 2000"]
#            [--repeats 3] [--duration S] [--sat-rates "..."] [--variants "..."] [--settle S]
#            [--wait-quiet S] [--nice N] [--profile]
#
# Takes about 10 minutes (15 with --wait-quiet 30 on a busy machine).
#   --quick       about 3 minutes: 2000 users, rates "500 2000", 1 repeat, 2 s runs, 5 s settle
#   --out DIR     results (default: a new /tmp/bench_register.XXXXXX; kept, never deleted)
#   --users N     distinct users = bindings measured for memory (default 10000)
#   --rates R     offered REGISTER rates (complete registrations per second, each one
#                 REGISTER -> 401 -> REGISTER+digest -> 200) of the repeated load runs
#   --repeats K   repeats of every rate (default 3; medians are reported)
#   --duration S  seconds of load per run (default 5): a run is rate*S registrations, bounded
#                 by sipp -m and -timeout (S+10 s)
#   --sat-rates R saturation search: rates tried above the highest rate the load runs sustained
#   --variants V  any of softswitch, kamailio, softswitch-warning (default: these three),
#                 floor-echo, floor-digest (only when asked for: scripts/bench_floor.py
#                 register, CPython + uvloop answering the same datagrams with almost no
#                 logic, --level echo or digest, on FLOOR_PORT: the floor under Python)
#   --settle S    idle seconds before the "settled" memory reading (default 35: the server
#                 transactions of the last REGISTERs live 32 s, Timer J)
#   --wait-quiet S  before each measured run wait up to S s until the rest of the machine
#                 uses < 0.3 core (others' tests skew the numbers; default 0 = do not wait)
#   --nice N      run the servers and sipp at nice N (e.g. -5, root only: they then win the
#                 two cores from other work on the machine; default 0)
#   --profile     also run py-spy on the softswitch during one extra run (PROFILE_RATE, default
#                 the lowest rate) and write profile.txt (needs `pip install py-spy`)
#
# Env: PYTHON (default .venv/bin/python, runs `python -m softswitch`), SS_PORT (15060),
#      KAM_PORT (15070), SIPP_PORT (15062), SS_HTTP_PORT (18080), FILL_RATE (500),
#      OVERLOAD_RATE (4000: one 2 s run at this rate unless already sustained), PYSPY (py-spy),
#      OVERLOAD_MS (500: the softswitch's overload.max_queue_delay_ms; 0 turns shedding off),
#      FLOOR_PORT (15080, the floor-* variants), FLOOR_ARGS (more bench_floor.py arguments,
#      e.g. "--loop asyncio" or "--loop blocking").
#
# For each variant the server is started fresh, then
#   1. fill:   every user registers once at FILL_RATE (first registrations; memory before,
#              right after and after --settle idle seconds)
#   2. load:   each rate x repeats, rates ascending within a repeat; the same users refresh
#              their bindings. A rate above the lowest is skipped once it or a lower one
#              reached < 50 % (it would only overload the server and slow the runs after it)
#   3. search: the saturation rate (failures 0, achieved >= 95 % of offered): --sat-rates above
#              the highest load rate sustained once; a failing rate is retried once
#   4. overload: one short run at OVERLOAD_RATE (does it degrade gracefully?)
# softswitch-warning is the softswitch with log level warning (the logging cost); it starts
# on the info variant's database (10,000 bindings loaded from disk) and skips the fill.
# floor-echo / floor-digest keep nothing, so they skip the fill (and its memory figures).
# CPU = utime+stime of every thread/process of the server (/proc), sampled around each sipp
# run, divided by the completed registrations. sipp runs on the same two cores.
# Everything is on 127.0.0.1; processes are stopped by PID. Results: DIR/results.jsonl,
# the markdown summary DIR/report.md (also printed), logs and sipp files under DIR.
# Needs: sipp (sip-tester), kamailio + kamcmd, /usr/bin/time; optional: perf (counts the
# softswitch's fdatasync calls = commits), py-spy.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/scripts
cd "$ROOT"

PYTHON=${PYTHON:-.venv/bin/python}
SS_PORT=${SS_PORT:-15060}
KAM_PORT=${KAM_PORT:-15070}
SIPP_PORT=${SIPP_PORT:-15062}
SS_HTTP_PORT=${SS_HTTP_PORT:-18080}
FLOOR_PORT=${FLOOR_PORT:-15080}
FILL_RATE=${FILL_RATE:-500}
OVERLOAD_RATE=${OVERLOAD_RATE:-4000}
OVERLOAD_MS=${OVERLOAD_MS:-500}
PYSPY=${PYSPY:-py-spy}
USERS=10000
RATES="500 1000 2000"
REPEATS=3
DUR=5
SAT_RATES="250 500 750 1000 1500 2000 3000 4000 5000 6000 8000 10000"
VARIANTS="softswitch kamailio softswitch-warning"
SETTLE=35
PROFILE=0
WAIT_QUIET=0
NICE=0
OUT=""
QUICK=0

while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1; USERS=2000; RATES="500 2000"; REPEATS=1; DUR=2; SETTLE=5
             SAT_RATES="250 1000 4000 8000" ;;
    --out) OUT=$2; shift ;;
    --users) USERS=$2; shift ;;
    --rates) RATES=$2; shift ;;
    --repeats) REPEATS=$2; shift ;;
    --duration) DUR=$2; shift ;;
    --sat-rates) SAT_RATES=$2; shift ;;
    --variants) VARIANTS=$2; shift ;;
    --settle) SETTLE=$2; shift ;;
    --profile) PROFILE=1 ;;
    --wait-quiet) WAIT_QUIET=$2; shift ;;
    --nice) NICE=$2; shift ;;
    -h|--help) sed -n '2,/^set -u/{/^#/p}' "$HERE/bench_register.sh"; exit 0 ;;
    *) echo "bench_register.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "bench_register.sh: $*" >&2; exit 1; }
for tool in sipp /usr/bin/time; do command -v "$tool" >/dev/null || die "$tool not found"; done
case " $VARIANTS " in *" kamailio "*)
  command -v kamailio >/dev/null && command -v kamcmd >/dev/null \
    || die "kamailio/kamcmd not found (apt-get install kamailio)";; esac
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null || die "no interpreter at $PYTHON (scripts/setup.sh, or set PYTHON)"
PORTS="$SS_PORT $KAM_PORT $SIPP_PORT $SS_HTTP_PORT"
case " $VARIANTS " in *" floor-"*) PORTS="$PORTS $FLOOR_PORT" ;; esac
for port in $PORTS; do
  if ss -Hlun "sport = :$port" | grep -q . || ss -Hltn "sport = :$port" | grep -q .; then
    die "port $port is in use (set SS_PORT/KAM_PORT/SIPP_PORT/SS_HTTP_PORT)"
  fi
done
HAVE_PERF=0
if command -v perf >/dev/null && perf list 2>/dev/null | grep -q 'syscalls:sys_enter_fdatasync'; then HAVE_PERF=1; fi
if [ "$PROFILE" -eq 1 ] && ! command -v "$PYSPY" >/dev/null; then
  if [ -x "$(dirname "$PYTHON")/py-spy" ]; then PYSPY=$(dirname "$PYTHON")/py-spy
  else die "--profile needs py-spy (pip install py-spy, or set PYSPY)"; fi
fi

RATES=$(printf '%s\n' $RATES | sort -n | tr '\n' ' '); RATES=${RATES% }
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/bench_register.XXXXXX)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
RES=$OUT/results.jsonl
U="python3 $HERE/bench_util.py"
COMMON="-i 127.0.0.1 -mi 127.0.0.1 -ci 127.0.0.1 -nostdin"
KRUN=$OUT/kam
DATA=$OUT/var
: > "$RES"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/bench.log"; }

# ---- servers -------------------------------------------------------------------------------
SPID=""        # the running server's main PID
SERVER=""      # softswitch | kamailio | floor
SIPP_PID=""
cleanup() {
  [ -n "$SIPP_PID" ] && kill -0 "$SIPP_PID" 2>/dev/null && kill -TERM "$SIPP_PID" 2>/dev/null
  stop_server
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_softswitch() {   # LEVEL
  local cfg=$OUT/softswitch-$1.yaml
  python3 "$HERE/mkusers.py" --csv "$OUT/users.csv" --config "$cfg" --count "$USERS" \
    --port "$SS_PORT" --http "$SS_HTTP_PORT" --data-dir "$DATA" --log-level "$1" \
    --overload-ms "$OVERLOAD_MS"
  local t0=$SECONDS
  # = `python -m softswitch run --config CFG`, plus a thread that takes a heap census on demand
  nice -n "$NICE" "$PYTHON" "$HERE/bench_util.py" serve "$OUT/probe" -- run --config "$cfg" \
    > "$OUT/softswitch-$1.stdout" 2> "$OUT/softswitch-$1.log" < /dev/null &
  SPID=$!; SERVER=softswitch
  if ! $U sip-ping "$SS_PORT" --timeout 300; then
    tail -5 "$OUT/softswitch-$1.log"; die "softswitch did not answer OPTIONS on $SS_PORT"
  fi
  kill -0 "$SPID" 2>/dev/null || die "softswitch exited; see $OUT/softswitch-$1.log"
  log "softswitch (log $1) ready, pid $SPID, after $((SECONDS - t0)) s ($USERS users in the config)"
  PORT=$SS_PORT
}

start_kamailio() {
  KAM_PORT=$KAM_PORT nice -n "$NICE" "$HERE/kamailio/start.sh" "$KRUN" | tee -a "$OUT/bench.log" || die "kamailio did not start"
  SPID=$(cat "$KRUN/kamailio.pid"); SERVER=kamailio
  $U sip-ping "$KAM_PORT" --timeout 20 || die "kamailio did not answer OPTIONS"
  PORT=$KAM_PORT
}

start_floor() {   # LEVEL (echo | digest)
  # shellcheck disable=SC2086  # FLOOR_ARGS: several words on purpose
  nice -n "$NICE" "$PYTHON" "$HERE/bench_floor.py" register --port "$FLOOR_PORT" --level "$1" \
    ${FLOOR_ARGS:-} > "$OUT/floor-$1.log" 2>&1 < /dev/null &
  SPID=$!; SERVER=floor
  $U sip-ping "$FLOOR_PORT" --timeout 20 || { tail -5 "$OUT/floor-$1.log"; die "bench_floor.py did not answer OPTIONS on $FLOOR_PORT"; }
  log "floor ($1) ready, pid $SPID"
  PORT=$FLOOR_PORT
}

stop_server() {
  case $SERVER in
    softswitch|floor)
      if kill -0 "$SPID" 2>/dev/null; then
        kill -TERM "$SPID"
        for _ in $(seq 1 100); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$SPID" 2>/dev/null && { echo "SIGKILL $SERVER $SPID"; kill -KILL "$SPID"; }
        wait "$SPID" 2>/dev/null
      fi ;;
    kamailio) "$HERE/kamailio/stop.sh" "$KRUN" > /dev/null ;;
  esac
  SERVER=""; SPID=""
}

kam_shm() {   # FIELD (used | real_used): kamailio shared memory in bytes (allocator view)
  kamcmd -s "unix:$KRUN/kamailio_ctl" core.shmmem 2>/dev/null | awk -v f="$1:" '$1 == f {print $2}'
}
json_get() { python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], 0))' "$1"; }

# ---- one bounded sipp run, measured ---------------------------------------------------------
RUN_NO=0
measure() {   # KIND VARIANT RATE COUNT [REP]
  local kind=$1 variant=$2 rate=$3 count=$4 rep=${5:-1}
  RUN_NO=$((RUN_NO + 1))
  local dir; dir=$OUT/runs/$(printf '%03d' $RUN_NO)-$variant-$kind-r$rate
  mkdir -p "$dir"
  local tmax=$(( count / rate + 10 ))
  local limit=$(( rate * 2 > 200 ? rate * 2 : 200 ))
  local perf_pid=""
  if [ "$HAVE_PERF" -eq 1 ] && [ "$SERVER" = softswitch ]; then
    perf stat -x, -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync -p "$SPID" \
      -o "$dir/perf.txt" > /dev/null 2>&1 &
    perf_pid=$!
    sleep 0.2
  fi
  local load c0 m0 t0 c1 m1 t1 rc
  if [ "$WAIT_QUIET" != 0 ]; then $U wait-quiet "$SPID" --max "$WAIT_QUIET" > /dev/null; fi
  load=$(cut -d' ' -f1 /proc/loadavg)
  local s0 s1 _u
  read -r c0 _u s0 < <($U cpu "$SPID" --split); m0=$($U machine-cpu); t0=$(date +%s.%N)
  ( cd "$dir" && exec nice -n "$NICE" /usr/bin/time -f "%U %S %e" -o sipp_time.txt \
      sipp "127.0.0.1:$PORT" -sf "$HERE/sipp/reg_auth.xml" -inf "$OUT/users.csv" $COMMON -p "$SIPP_PORT" \
      -r "$rate" -m "$count" -l "$limit" -timeout "$tmax" \
      -trace_stat -stf stat.csv -fd 1 -trace_rtt -rtt_freq 1000 -trace_err -error_file errors.log \
      > sipp.stdout 2>&1 ) &
  SIPP_PID=$!
  wait "$SIPP_PID"; rc=$?
  SIPP_PID=""
  sleep 0.2   # responses already in the server's socket buffer
  read -r c1 _u s1 < <($U cpu "$SPID" --split); m1=$($U machine-cpu); t1=$(date +%s.%N)
  local fsyncs=""
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" 2>/dev/null
    fsyncs=$(awk -F, '/sys_enter_f(data)?sync/ {n += $1} END {print n+0}' "$dir/perf.txt")
  fi
  local rec
  rec=$($U record "$RES" kind="$kind" variant="$variant" rate="$rate" count="$count" rep="$rep" \
        cpu0="$c0" cpu1="$c1" sys0="$s0" sys1="$s1" t0="$t0" t1="$t1" m0="$m0" m1="$m1" loadavg="$load" sipp_rc="$rc" \
        ${fsyncs:+fsyncs=$fsyncs} dir="$dir" --sipp-dir "$dir")
  python3 - "$rec" <<'EOF' | tee -a "$OUT/bench.log"
import json, sys
r = json.loads(sys.argv[1])
print(f"  {r['variant']:<19} {r['kind']:<5} {r['rate']:>6}/s x{r['count']:<6} ok {r.get('successful')} "
      f"failed {r.get('failed')} retrans {r.get('retransmissions')} achieved {r.get('achieved_per_s')}/s "
      f"cpu {r.get('cpu_us_per_reg')} us/reg ({r.get('cpu_core_pct')} % core) "
      f"rtd2 p50/p99 {r.get('rtd2_p50_ms')}/{r.get('rtd2_p99_ms')} ms sipp {r.get('sipp_core_pct')} % "
      f"other {r.get('other_cpu_pct')} %" + (f" regs/fsync {r['regs_per_fsync']}" if r.get('regs_per_fsync') else "")
      + ("" if r["sustained"] else "  NOT SUSTAINED"))
EOF
  # let a backlog drain before the next run (an overloaded server keeps working after sipp)
  $U wait-idle "$SPID" --max 30 > /dev/null
  sleep 0.5
}

mem_kb() { $U mem "$SPID" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pss_kb"])'; }

# ---- one variant -----------------------------------------------------------------------------
bench_variant() {   # VARIANT
  local v=$1
  log "== $v"
  local need_fill=1
  [ "$v" = softswitch-warning ] && [ -s "$DATA/softswitch.db" ] && need_fill=0
  case $v in floor-*) need_fill=0 ;; esac
  case $v in
    softswitch) rm -rf "$DATA"; start_softswitch info ;;
    softswitch-warning) start_softswitch warning ;;
    kamailio)
      python3 "$HERE/mkusers.py" --csv "$OUT/users.csv" --count "$USERS"
      start_kamailio ;;
    floor-echo|floor-digest)
      python3 "$HERE/mkusers.py" --csv "$OUT/users.csv" --count "$USERS"
      start_floor "${v#floor-}" ;;
  esac
  sleep 1
  if [ "$need_fill" -eq 1 ]; then
    # 1. fill: every user once (first registrations); memory before, right after, settled.
    #    softswitch: census of the live Python heap (bench_util.py heap_census, in the idle
    #    server) before the fill and after settling, + PSS of the process;
    #    kamailio: shared memory "used" (allocator view) + PSS of all its processes.
    local pss0 pss1 pss2 live0=0 live1=0 live2 c0 c1 what top=""
    pss0=$(mem_kb)
    if [ "$SERVER" = kamailio ]; then live0=$(kam_shm used)
    else $U probe "$OUT/probe" heap --timeout 120 > "$OUT/heap-before.json" || log "  heap census failed"; fi
    measure fill "$v" "$FILL_RATE" "$USERS"
    pss1=$(mem_kb)
    [ "$SERVER" = kamailio ] && live1=$(( $(kam_shm used) - live0 ))
    if [ "$v" != softswitch-warning ]; then
      c0=$($U cpu "$SPID"); sleep "$SETTLE"; c1=$($U cpu "$SPID")
      pss2=$(mem_kb)
      if [ "$SERVER" = kamailio ]; then
        live2=$(( $(kam_shm used) - live0 )); what="kamailio shm used (allocator)"
      else
        $U probe "$OUT/probe" heap --timeout 120 > "$OUT/heap-after.json" || log "  heap census failed"
        $U heap-delta "$OUT/heap-before.json" "$OUT/heap-after.json" --top 15 > "$OUT/heap-delta.json"
        live2=$(json_get bytes < "$OUT/heap-delta.json"); live1=""
        what="softswitch Python heap census"
        top=$($U heap-delta "$OUT/heap-before.json" "$OUT/heap-after.json" --short)
      fi
      $U record "$RES" kind=mem variant="$v" users="$USERS" what="$what" \
        ${live1:+live_after_bytes=$live1} live_settled_bytes="$live2" bytes_per_binding=$(( live2 / USERS )) \
        pss_before_kb="$pss0" pss_after_kb="$pss1" pss_settled_kb="$pss2" \
        pss_bytes_per_binding=$(( (pss2 - pss0) * 1024 / USERS )) \
        mb_per_10k="$(python3 -c "print(round($live2 / 1048576 * 10000 / $USERS, 2))")" \
        "top=$top" > /dev/null
      $U record "$RES" kind=idle variant="$v" seconds="$SETTLE" \
        cpu_core_pct="$(python3 -c "print(round(100 * ($c1 - $c0) / $SETTLE, 2))")" > /dev/null
      log "  memory: $what +$(( live2 / 1024 )) kB after ${SETTLE} s = $(( live2 / USERS )) B per binding; PSS $pss0 -> $pss1 -> $pss2 kB = $(( (pss2 - pss0) * 1024 / USERS )) B per binding"
      [ -n "$top" ] && log "  heap growth by type: $top"
    fi
  fi
  # 2. load: every rate, REPEATS times, rates interleaved
  local rep rate
  for rep in $(seq 1 "$REPEATS"); do
    for rate in $RATES; do
      if [ "$rate" != "${RATES%% *}" ] && $U hopeless "$RES" "$v" "$rate"; then
        log "  skip $rate/s (repeat $rep): not even half of it or of a lower rate was reached"; continue
      fi
      measure load "$v" "$rate" $(( rate * DUR )) "$rep"
    done
  done
  # 3. saturation search above what the load runs proved
  local plan
  plan=$($U plan-sat "$RES" "$v" "$SAT_RATES")
  log "  saturation search: ${plan:-nothing to try}"
  for rate in $plan; do
    measure sat "$v" "$rate" $(( rate * DUR ))
    if ! tail -1 "$RES" | grep -q '"sustained": true'; then
      log "  retry $rate/s once"
      measure sat "$v" "$rate" $(( rate * DUR ))
      tail -1 "$RES" | grep -q '"sustained": true' || break
    fi
  done
  # 4. overload: OVERLOAD_RATE for 2 s, unless the variant sustained it (graceful or not?)
  if ! $U ran "$RES" sustained "$v" "$OVERLOAD_RATE"; then
    measure overload "$v" "$OVERLOAD_RATE" $(( OVERLOAD_RATE * 2 ))
  fi
  # 5. optional profile (not counted in the results)
  if [ "$PROFILE" -eq 1 ] && [ "$v" = softswitch ]; then
    local prate=${PROFILE_RATE:-${RATES%% *}}
    log "  py-spy profile at $prate/s"
    "$PYSPY" record --pid "$SPID" --duration "$DUR" --rate 250 --nonblocking --format raw --threads \
      -o "$OUT/profile.raw" > "$OUT/py-spy.log" 2>&1 &
    local pp=$!
    sleep 0.5
    RUN_NO=$((RUN_NO + 1))
    local pdir=$OUT/runs/$(printf '%03d' $RUN_NO)-profile
    mkdir -p "$pdir"
    ( cd "$pdir" && nice -n "$NICE" sipp "127.0.0.1:$PORT" -sf "$HERE/sipp/reg_auth.xml" -inf "$OUT/users.csv" $COMMON \
        -p "$SIPP_PORT" -r "$prate" -m $(( prate * DUR )) -l $(( prate * 2 )) -timeout $(( DUR + 10 )) \
        > sipp.stdout 2>&1 )
    wait "$pp"
    $U profile "$OUT/profile.raw" --top 30 > "$OUT/profile.txt" && log "  profile: $OUT/profile.txt"
    $U wait-idle "$SPID" --max 30 > /dev/null
  fi
  stop_server
}

log "bench_register: out $OUT"
log "host: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(free -m | awk '/^Mem:/ {print $2}') MB RAM"
log "$(sipp -v 2>&1 | grep -o 'SIPp v[^ ]*'); $(kamailio -v 2>/dev/null | head -1); $("$PYTHON" --version 2>&1)"
log "users $USERS, rates '$RATES' x $REPEATS, ${DUR} s per run, fill at $FILL_RATE/s, settle $SETTLE s, variants '$VARIANTS'${FLOOR_ARGS:+, FLOOR_ARGS: $FLOOR_ARGS}"
GIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)
[ -n "$(git -C "$ROOT" status --porcelain -- softswitch dialplan 2>/dev/null)" ] && GIT="$GIT+uncommitted"
log "softswitch at commit ${GIT:-unknown}; nice $NICE; loadavg $(cat /proc/loadavg)"
$U record "$RES" kind=meta commit="${GIT:-unknown}" nice="$NICE" cpu_rate="${RATES%% *}" users="$USERS" settle="$SETTLE" date="$(date -u +%Y-%m-%dT%H:%M:%SZ)" > /dev/null
T_START=$SECONDS
for v in $VARIANTS; do
  case $v in softswitch|kamailio|softswitch-warning|floor-echo|floor-digest) bench_variant "$v" ;;
    *) die "unknown variant $v" ;; esac
done
log "done in $((SECONDS - T_START)) s; loadavg $(cat /proc/loadavg)"
$U report "$RES" > "$OUT/report.md"
echo
cat "$OUT/report.md"
echo
echo "results: $RES, report: $OUT/report.md, log: $OUT/bench.log"
