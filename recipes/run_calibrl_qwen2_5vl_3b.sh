#!/usr/bin/env bash
# CalibRL on Qwen2.5-VL-3B-Instruct: the 7B recipe (docs/algorithm.md §7) with vLLM TP 1 and smaller static
# micro batches.
#
#   bash recipes/run_calibrl_qwen2_5vl_3b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/calibrl_qwen2_5vl_3b.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name calibrl_qwen2_5vl_3b "$@"
calibrl_launch calibrl_qwen2_5vl_3b "$@"
