#!/usr/bin/env bash
# LUFFY baseline (docs/algorithm.md §3) on Qwen2.5-Math-7B, text-only math reasoning: the expert row is trained
# on off-policy; same data, reward, batch sizes, optimiser and rollout budget as the CalibRL text recipe.
# Data: TRAIN_FILES / VAL_FILES default to the recipe's text data (<repo>/data/openr1_math/train.parquet,
# <repo>/data/math500/test.parquet); README "Text-only reasoning" prepares them.
#
#   bash recipes/run_luffy_qwen2_5_math_7b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/luffy_qwen2_5_math_7b.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name luffy_qwen2_5_math_7b "$@"
calibrl_launch luffy_qwen2_5_math_7b "$@"
