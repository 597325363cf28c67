#!/usr/bin/env bash
# CalibRL on Qwen2.5-VL-3B-Instruct: the 7B recipe (SPEC section 7) with vLLM TP 1 and smaller static
# micro batches.
#
#   bash recipes/run_calibrl_qwen2_5vl_3b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The shared settings (data, batch sizes, optimiser, rollout, calibrl.* keys, logging, multi-node) are in
# recipes/common.sh; this file only picks the model size, the loss mode and the group size.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_SIZE=3b
LOSS_MODE=calibrl
ROLLOUT_N=11                 # 10 on-policy samples + 1 expert row per prompt
calibrl_run "$@"
