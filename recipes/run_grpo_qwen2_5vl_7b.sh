#!/usr/bin/env bash
# GRPO baseline (SPEC section 3) on Qwen2.5-VL-7B-Instruct: verl's own GRPO path, no expert rows and no
# guide term; same data, reward, batch sizes, optimiser and rollout budget (10 samples per prompt) as CalibRL.
#
#   bash recipes/run_grpo_qwen2_5vl_7b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The shared settings (data, batch sizes, optimiser, rollout, calibrl.* keys, logging, multi-node) are in
# recipes/common.sh; this file only picks the model size, the loss mode and the group size.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_SIZE=7b
LOSS_MODE=grpo
ROLLOUT_N=10                 # 10 on-policy samples, no expert row
calibrl_run "$@"
