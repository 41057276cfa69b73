#!/usr/bin/env bash
# The main job of the README: installs what it needs (idempotent), then runs the embedded default, the fair test
# of the claim (every arm of headsparse/recipes/experiment.py on capitals-in-a-mix; report with verdict) on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${HEADSPARSE_VENV:-$ROOT/.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/headsparse" run "$@"
