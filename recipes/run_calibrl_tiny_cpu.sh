#!/usr/bin/env bash
# The embedded default: CalibRL on a tiny Qwen2.5-VL on this machine's CPU, a few steps, nothing downloaded.
#
#   bash recipes/run_calibrl_tiny_cpu.sh [hydra overrides...]
#
# Sets up .venv (scripts/setup_cpu.sh) if needed, builds the tiny model + synthetic image task into
# $OUT/assets if missing, runs verl's real trainer with the CalibRL recipe on the CPU backend (Ray,
# TransferQueue, FSDP2, agent loop, verl's vLLM rollout on vLLM's CPU build with weight sync, reward loop),
# and leaves $OUT/$LOSS_MODE/{metrics.jsonl,metrics.log,curves.png,checkpoints/}. About 2-3 minutes on 2 cores.
# Env: OUT (outputs/tiny_cpu), STEPS (3), LOSS_MODE (calibrl | grpo | luffy | rlplus), VENV (.venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
OUT="${OUT:-$ROOT/outputs/tiny_cpu}"
STEPS="${STEPS:-3}"
LOSS_MODE="${LOSS_MODE:-calibrl}"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import calibrl_verl, verl" 2>/dev/null; then
  VENV="$VENV" bash "$ROOT/scripts/setup_cpu.sh"
fi
# A fresh run each time (a re-run would otherwise resume from the last checkpoint and train nothing);
# pass trainer.resume_mode=auto to continue a previous run instead.
exec "$VENV/bin/python" -m calibrl_verl.smoke run --device cpu --out "$OUT" --steps "$STEPS" \
  --loss-mode "$LOSS_MODE" trainer.resume_mode=disable "$@"
