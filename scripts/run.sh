#!/usr/bin/env bash
# Start the softswitch from this checkout: set up .venv if needed, then `softswitch run`.
#
# Usage: scripts/run.sh [--config FILE] [other `softswitch run` options]
#   Without --config the embedded default config is used (listens on 127.0.0.1:5060).
# The current directory is kept, so a relative --config path works as typed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/softswitch" run "$@"
