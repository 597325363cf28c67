#!/usr/bin/env bash
# CalibRL on Qwen2.5-VL-7B-Instruct: the authors' 7B setting (docs/algorithm.md §7). 480 prompts/step, PPO
# mini-batch 120 prompts, lr 1e-6 constant, 10 samples at T = 1.0 + 1 expert row per prompt, prompts up to
# 20480 and responses up to 4096 tokens, no KL, no entropy bonus, grad clip 1.0, 1 epoch, 8 GPUs, vLLM TP 2,
# validation every 5 steps.
#
#   bash recipes/run_calibrl_qwen2_5vl_7b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/calibrl_qwen2_5vl_7b.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name calibrl_qwen2_5vl_7b "$@"
calibrl_launch calibrl_qwen2_5vl_7b "$@"
