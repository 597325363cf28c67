#!/usr/bin/env bash
# CalibRL on Qwen3-VL-4B-Instruct: the paper's 7B setting (docs/algorithm.md §7) as in the Qwen3-VL-8B recipe, with
# vLLM TP 1 (8 rollout replicas) and the 7B's static micro batches.
#
#   bash recipes/run_calibrl_qwen3vl_4b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/calibrl_qwen3vl_4b.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name calibrl_qwen3vl_4b "$@"
calibrl_launch calibrl_qwen3vl_4b "$@"
