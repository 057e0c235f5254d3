#!/bin/bash
# Stop the bench kamailio that start.sh started in RUN_DIR.
#
# Usage: stop.sh RUN_DIR
#
# Sends SIGTERM to the main PID from RUN_DIR/kamailio.pid, waits up to 10 s, then SIGKILLs
# only the PIDs it recorded before (the main PID and its direct children). Once a main
# process did not exit after SIGTERM and, after a SIGKILL of the main PID alone, three
# children stayed behind in futex_wait; recording the children first avoids that.
set -u
[ $# -ge 1 ] || { sed -n '2,9p' "$0"; exit 2; }
RUN=$1
PF=$RUN/kamailio.pid
[ -s "$PF" ] || { echo "no pid file in $RUN"; exit 0; }
P=$(cat "$PF")
case $P in ''|*[!0-9]*) echo "bad pid file $PF"; exit 1;; esac
if ! kill -0 "$P" 2>/dev/null; then echo "not running (stale pid $P)"; rm -f "$PF"; exit 0; fi
case $(cat "/proc/$P/comm" 2>/dev/null) in
  kamailio) ;;
  *) echo "pid $P is not kamailio; not touching it"; exit 1;;
esac
KIDS=$(ps -o pid= --ppid "$P" | tr -s ' \n' ' ')
kill -TERM "$P"
for _ in $(seq 1 100); do kill -0 "$P" 2>/dev/null || break; sleep 0.1; done
LEFT=""
for k in $P $KIDS; do   # still alive and still a kamailio (not a reused PID)
  [ "$(cat "/proc/$k/comm" 2>/dev/null)" = kamailio ] && LEFT="$LEFT $k"
done
if [ -n "$LEFT" ]; then echo "SIGKILL leftover:$LEFT"; kill -KILL $LEFT; fi
rm -f "$PF"
echo "stopped kamailio $P (children:${KIDS:- none})"
