#!/usr/bin/env bash
# GRPO baseline (docs/algorithm.md §3) on Qwen2.5-Math-7B, text-only math reasoning: verl's own GRPO path, no
# expert rows and no guide term; same data, reward, batch sizes, optimiser and rollout budget (10 samples per
# prompt) as the CalibRL text recipe.
# Data: TRAIN_FILES / VAL_FILES default to the recipe's text data (<repo>/data/openr1_math/train.parquet,
# <repo>/data/math500/test.parquet); README "Text-only reasoning" prepares them.
#
#   bash recipes/run_grpo_qwen2_5_math_7b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/grpo_qwen2_5_math_7b.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name grpo_qwen2_5_math_7b "$@"
calibrl_launch grpo_qwen2_5_math_7b "$@"
