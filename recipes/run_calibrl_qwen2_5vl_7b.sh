#!/usr/bin/env bash
# CalibRL on Qwen2.5-VL-7B-Instruct: the authors' 7B setting (SPEC section 7). 480 prompts/step, PPO
# mini-batch 120 prompts, lr 1e-6 constant, 10 samples at T = 1.0 + 1 expert row per prompt, prompts up to
# 20480 and responses up to 4096 tokens, no KL, no entropy bonus, grad clip 1.0, 1 epoch, 8 GPUs, vLLM TP 2,
# validation every 5 steps.
#
#   bash recipes/run_calibrl_qwen2_5vl_7b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The shared settings (data, batch sizes, optimiser, rollout, calibrl.* keys, logging, multi-node) are in
# recipes/common.sh; this file only picks the model size, the loss mode and the group size.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODEL_SIZE=7b
LOSS_MODE=calibrl
ROLLOUT_N=11                 # 10 on-policy samples + 1 expert row per prompt
calibrl_run "$@"
