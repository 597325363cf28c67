#!/usr/bin/env bash
# GRPO baseline (docs/algorithm.md §3) on Qwen2.5-VL-3B-Instruct: verl's own GRPO path, no expert rows and no
# guide term; same data, reward, batch sizes, optimiser and rollout budget (10 samples per prompt) as CalibRL.
#
#   bash recipes/run_grpo_qwen2_5vl_3b.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/grpo_qwen2_5vl_3b.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name grpo_qwen2_5vl_3b "$@"
calibrl_launch grpo_qwen2_5vl_3b "$@"
