#!/usr/bin/env bash
# The main job of the README: installs what it needs (idempotent), then runs the embedded default pipeline
# (score heads, mine data, tune heads, evaluate against full fine-tuning; AER report) on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${HEADSPARSE_VENV:-$ROOT/.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/headsparse" run "$@"
