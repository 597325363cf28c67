#!/usr/bin/env bash
# The tiny CalibRL run on one GPU with the real GPU stack (vLLM rollout, FSDP, no CPU backend), with the same
# PASS/FAIL checks as the CPU smoke test. Needs the GPU install (scripts/setup_gpu.sh). Target: < 5 minutes.
#
#   bash recipes/gpu_smoke.sh [hydra overrides...]
#
# Env: OUT (outputs/gpu_smoke), STEPS (3), PYTHON (python3).
# Status: written against verl 0.9.1 + vLLM 0.24; not yet run on a GPU (see README "Status").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/outputs/gpu_smoke}"
STEPS="${STEPS:-3}"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'gpu_smoke.sh needs a CUDA GPU'"
start=$(date +%s)
"$PYTHON" -m calibrl_verl.smoke run --device gpu --out "$OUT" --steps "$STEPS" --loss-mode calibrl "$@"
"$PYTHON" -m calibrl_verl.smoke run --device gpu --out "$OUT" --steps 2 --loss-mode grpo "$@"
echo "gpu_smoke: total $(( $(date +%s) - start )) s"
