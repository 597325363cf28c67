#!/usr/bin/env bash
# LUFFY baseline (SPEC section 3) on Qwen2.5-VL-7B-Instruct: the expert row is trained on off-policy
# (per expert token -A_e p/(p + 0.1), no clipping); same data and budget as the CalibRL 7B recipe.
#
#   bash recipes/run_luffy_qwen2_5vl_7b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The shared settings (data, batch sizes, optimiser, rollout, calibrl.* keys, logging, multi-node) are in
# recipes/common.sh; this file only picks the model size, the loss mode and the group size.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_SIZE=7b
LOSS_MODE=luffy
ROLLOUT_N=11                 # 10 on-policy samples + 1 expert row per prompt
calibrl_run "$@"
