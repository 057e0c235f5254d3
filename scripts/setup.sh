#!/usr/bin/env bash
# Set up (or refresh) the development environment; safe to run again and again.
#
# Usage: scripts/setup.sh [--peers]
#   --peers   also make sure the real SIP peers the e2e tests drive are installed
#             (Debian packages sip-tester = sipp, baresip-core = baresip). Installed with
#             apt-get only when running as root; otherwise the missing ones are listed.
#
# What it does, from the repository root:
#   1. (--peers, root, missing) apt-get install --no-install-recommends sip-tester baresip-core
#      linphone-cli iproute2, and gcc python3-dev for the compiled build
#   2. creates .venv with `python3 -m venv` if it is absent or broken (as root on Debian it
#      installs python3-venv first when `python3 -m venv` cannot work);
#   3. `.venv/bin/pip install -e '.[test,media]'`, skipped when .venv/.setup-stamp matches
#      the sha256 of pyproject.toml, setup.py and the interpreter version (delete the stamp to
#      force);
#   4. compiles the hot modules with mypyc in place when they are missing or older than their
#      source (docs/decisions.md D17).
# Env: PYTHON (default python3) picks the interpreter for a new venv (needs >= 3.11);
#      SOFTSWITCH_PURE=1 skips step 4 and removes the compiled modules (pure Python).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PEERS=0
for arg in "$@"; do
  case $arg in
    --peers) PEERS=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
STAMP=$VENV/.setup-stamp
IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1
APT_UPDATED=0

log() { echo "setup.sh: $*" >&2; }

apt_install() {
  # apt-get install the given packages (root only); refresh the package lists once if needed
  if [ "$APT_UPDATED" -eq 0 ] && ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    APT_UPDATED=1
  fi
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; then
    [ "$APT_UPDATED" -eq 1 ] && return 1
    DEBIAN_FRONTEND=noninteractive apt-get update -q   # stale lists: refresh and retry once
    APT_UPDATED=1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
  fi
}

# 1. SIP peers for the e2e tests ----------------------------------------------------------------
if [ "$PEERS" -eq 1 ]; then
  missing=()
  command -v sipp >/dev/null 2>&1 || missing+=(sip-tester)
  command -v baresip >/dev/null 2>&1 || missing+=(baresip-core)
  command -v linphone-daemon >/dev/null 2>&1 || missing+=(linphone-cli)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev python3-dev)  # the native build
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$IS_ROOT" -eq 1 ] && command -v apt-get >/dev/null 2>&1; then
      log "installing ${missing[*]}"
      apt_install "${missing[@]}"
    else
      log "WARNING: missing ${missing[*]}; the e2e tests that need them will be skipped"
      log "         (failed under CI). Install: sudo apt-get install ${missing[*]}"
    fi
  fi
fi

# 2. the interpreter and the venv ---------------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  if [ "$IS_ROOT" -eq 1 ] && [ "$PYTHON" = python3 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing python3"
    apt_install python3 python3-venv
  else
    log "ERROR: $PYTHON not found (need Python >= 3.11)"; exit 1
  fi
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  log "ERROR: $("$PYTHON" --version 2>&1) is too old; need Python >= 3.11 (set PYTHON=...)"
  exit 1
fi

# (a failed `-m venv` leaves bin/python but no bin/pip; a moved venv has a dead interpreter)
venv_ok() { [ -x "$VENV/bin/pip" ] && "$VENV/bin/python" -c "" >/dev/null 2>&1; }

if ! venv_ok; then
  # a failed `python3 -m venv` (no ensurepip) leaves a venv without pip behind: start over
  [ -e "$VENV" ] && { log "removing incomplete $VENV"; rm -rf -- "$VENV"; }
  log "creating $VENV with $("$PYTHON" --version 2>&1)"
  if ! "$PYTHON" -m venv "$VENV"; then
    rm -rf -- "$VENV"
    if [ "$IS_ROOT" -eq 1 ] && command -v apt-get >/dev/null 2>&1; then
      pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      log "python3 -m venv failed; installing python3-venv"
      apt_install python3-venv || apt_install "python${pyver}-venv"
      "$PYTHON" -m venv "$VENV"
    else
      log "ERROR: '$PYTHON -m venv' failed; on Debian/Ubuntu: sudo apt-get install python3-venv"
      exit 1
    fi
  fi
  venv_ok || { log "ERROR: $VENV has no working pip"; exit 1; }
  rm -f -- "$STAMP"
fi

# 3. the project, editable, with test and media extras ------------------------------------------
want=$( { sha256sum pyproject.toml setup.py; "$VENV/bin/python" --version 2>&1; } \
        | sha256sum | cut -d' ' -f1)
# (installed = package metadata present; `import softswitch` would also find ./softswitch)
if ! { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c \
     'import importlib.metadata as m; m.version("softswitch")' >/dev/null 2>&1; }; then
  log "installing the project into $VENV (pip install -e '.[test,media]')"
  # pure here: step 4 compiles in place, where edits are seen (pip's copy would not be)
  SOFTSWITCH_PURE=1 "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -e '.[test,media]'
  echo "$want" > "$STAMP"
  log "ready: $VENV"
fi

# 4. the compiled build of the hot modules (mypyc, D17), in place -------------------------------
# Rebuilt when a compiled module's source is newer than its extension (about a minute on two
# cores). SOFTSWITCH_PURE=1 removes the extensions instead: pure Python, for quick edit loops.
if [ -n "${SOFTSWITCH_PURE:-}" ]; then
  find softswitch media -name '*.so' -delete
  rm -f -- ./*__mypyc.*.so
  log "SOFTSWITCH_PURE set: running pure Python"
elif ! "$VENV/bin/python" -m softswitch.native --check 2>/dev/null; then
  log "compiling the hot modules with mypyc (setup.py build_ext --inplace)"
  if ! "$VENV/bin/python" setup.py -q build_ext --inplace -j 2 >"$VENV/native-build.log" 2>&1 \
     || ! "$VENV/bin/python" -m softswitch.native --check; then
    log "WARNING: the native build failed (see $VENV/native-build.log): running pure Python"
  fi
fi
