#!/usr/bin/env bash
# RL-PLUS baseline (docs/algorithm.md §3) on Qwen2.5-VL-7B-Instruct: expert tokens trained with
# -A p/(0.75 p_old + 0.25) (1 - p)^0.5; same data and budget as the CalibRL 7B recipe.
#
#   bash recipes/run_rlplus_qwen2_5vl_7b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/rlplus_qwen2_5vl_7b.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name rlplus_qwen2_5vl_7b "$@"
calibrl_launch rlplus_qwen2_5vl_7b "$@"
