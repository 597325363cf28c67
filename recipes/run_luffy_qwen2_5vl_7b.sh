#!/usr/bin/env bash
# LUFFY baseline (docs/algorithm.md §3) on Qwen2.5-VL-7B-Instruct: the expert row is trained on off-policy
# (per expert token -A_e p/(p + 0.1), no clipping); same data and budget as the CalibRL 7B recipe.
#
#   bash recipes/run_luffy_qwen2_5vl_7b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/luffy_qwen2_5vl_7b.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name luffy_qwen2_5vl_7b "$@"
calibrl_launch luffy_qwen2_5vl_7b "$@"
