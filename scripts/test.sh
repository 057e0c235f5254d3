#!/usr/bin/env bash
# Run the test suite: set up .venv (and, as root, the SIP peers SIPp and baresip), then pytest.
#
# Usage: scripts/test.sh [PYTEST ARGS...]
#   scripts/test.sh                  # everything (unit + e2e)
#   scripts/test.sh tests/unit -q    # unit tests only
#   scripts/test.sh -m e2e           # end-to-end tests only (service from its CLI + SIPp/baresip)
# Runs from the repository root; pytest's exit code is the script's (5 = no tests collected).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
scripts/setup.sh --peers
exec .venv/bin/python -m pytest "$@"
