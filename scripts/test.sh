#!/usr/bin/env bash
# The test command of the README: installs what it needs (idempotent), then runs the CPU test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${HEADSPARSE_VENV:-$ROOT/.venv}"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Exit code 5 (no tests collected) must fail the run, never pass silently.
set +e
"$VENV/bin/python" -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "[headsparse] pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
