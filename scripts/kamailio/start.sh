#!/bin/bash
# Start the bench kamailio (a registrar only) on 127.0.0.1:$KAM_PORT in the background.
#
# Usage: start.sh RUN_DIR [-A NO_QOP] [-A NO_NC] [-A WITH_DEBUG]
#   RUN_DIR   created if missing; receives the rendered kamailio.cfg, kamailio.pid,
#             kamailio.log and the control socket kamailio_ctl. Keep it short (unix socket
#             paths are limited to 107 bytes), e.g. RUN=$(mktemp -d).
#   env       KAM_PORT   SIP port on 127.0.0.1, udp+tcp (default 5070)
#             KAM_SHM_MB shared memory in MB (default 512)
#             KAM_PKG_MB private memory per process in MB (default 8)
# Stop with: stop.sh RUN_DIR.  Query: kamcmd -s unix:RUN_DIR/kamailio_ctl core.shmmem
# Prints the main PID on the last line of its output ("kamailio started ... pid N ...").
# Adapted from the interop reference setup (registrar + proxy); this one never relays.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] || { sed -n '2,13p' "$0"; exit 2; }
RUN=$1; shift
PORT=${KAM_PORT:-5070}
case $PORT in ''|*[!0-9]*) echo "KAM_PORT must be a number"; exit 2;; esac
mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)
case $RUN in *'|'*|*'"'*|*' '*) echo "RUN_DIR must not contain '|', '\"' or spaces"; exit 2;; esac
command -v kamailio >/dev/null || { echo "kamailio not found (apt-get install kamailio)"; exit 1; }

if [ -s "$RUN/kamailio.pid" ] && kill -0 "$(cat "$RUN/kamailio.pid")" 2>/dev/null; then
  echo "already running in $RUN: pid $(cat "$RUN/kamailio.pid")"; exit 1
fi
if ss -Hlun "sport = :$PORT" | grep -q . || ss -Hltn "sport = :$PORT" | grep -q .; then
  echo "port $PORT is already in use:"; ss -Hlunpt "sport = :$PORT"; exit 1
fi
rm -f "$RUN/kamailio.pid"
[ -f "$RUN/kamailio.log" ] && mv -f "$RUN/kamailio.log" "$RUN/kamailio.log.prev"

sed -e "s|@RUN_DIR@|$RUN|g" -e "s|@PORT@|$PORT|g" "$HERE/kamailio.cfg" > "$RUN/kamailio.cfg"

# -DD: stay in the foreground (children still forked), -E: log to stderr,
# -m/-M: shared/private memory in MB, -Y: runtime dir, -P: pid file
nohup kamailio -DD -E -f "$RUN/kamailio.cfg" -m "${KAM_SHM_MB:-512}" -M "${KAM_PKG_MB:-8}" \
  -Y "$RUN" -P "$RUN/kamailio.pid" "$@" > "$RUN/kamailio.log" 2>&1 < /dev/null &
KPID=$!

for _ in $(seq 1 50); do   # up to 5 s for the pid file, the UDP socket and the control socket
  [ -s "$RUN/kamailio.pid" ] && [ -S "$RUN/kamailio_ctl" ] \
    && ss -Hlun "sport = :$PORT" | grep -q '127.0.0.1' && break
  kill -0 "$KPID" 2>/dev/null || break
  sleep 0.1
done
if ! [ -s "$RUN/kamailio.pid" ] || ! kill -0 "$KPID" 2>/dev/null; then
  echo "kamailio failed to start; last log lines:"; tail -20 "$RUN/kamailio.log"; exit 1
fi
echo "kamailio started on udp+tcp 127.0.0.1:$PORT, pid $(cat "$RUN/kamailio.pid"), log $RUN/kamailio.log"
