#!/usr/bin/env bash
# CalibRL on Qwen2.5-Math-7B, text-only math reasoning: the paper's setting (docs/algorithm.md §7: 480
# prompts/step, PPO mini-batch 120 prompts, lr 1e-6 constant, 10 samples at T = 1.0 + 1 expert row per prompt, no
# KL, no entropy bonus, grad clip 1.0, 1 epoch, 8 GPUs) on OpenR1-Math with DeepSeek-R1 traces as the experts;
# prompts up to 1024 and responses up to 3072 tokens (the model's 4096-token context), vLLM TP 1.
# Data: TRAIN_FILES / VAL_FILES default to the recipe's text data (<repo>/data/openr1_math/train.parquet,
# <repo>/data/math500/test.parquet); README "Text-only reasoning" prepares them.
#
#   bash recipes/run_calibrl_qwen2_5_math_7b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/calibrl_qwen2_5_math_7b.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name calibrl_qwen2_5_math_7b "$@"
calibrl_launch calibrl_qwen2_5_math_7b "$@"
