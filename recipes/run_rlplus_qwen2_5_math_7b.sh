#!/usr/bin/env bash
# RL-PLUS baseline (docs/algorithm.md §3) on Qwen2.5-Math-7B, text-only math reasoning: expert tokens trained
# off-policy with RL-PLUS's weighting; same data, reward, batch sizes, optimiser and rollout budget as the CalibRL
# text recipe.
# Data: TRAIN_FILES / VAL_FILES default to the recipe's text data (<repo>/data/openr1_math/train.parquet,
# <repo>/data/math500/test.parquet); README "Text-only reasoning" prepares them.
#
#   bash recipes/run_rlplus_qwen2_5_math_7b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/rlplus_qwen2_5_math_7b.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name rlplus_qwen2_5_math_7b "$@"
calibrl_launch rlplus_qwen2_5_math_7b "$@"
