#!/usr/bin/env bash
# CalibRL on Qwen2.5-VL-7B-Instruct with LoRA on the actor, on 4 GPUs: the 7B recipe's algorithm settings
# (docs/algorithm.md §7: 480 prompts/step, PPO mini-batch 120 prompts, 10 samples at T = 1.0 + 1 expert row per
# prompt, prompts up to 20480 and responses up to 4096 tokens, no KL, grad clip 1.0, 1 epoch, vLLM TP 2) with
# rank-32 adapters on the language model's linear layers, lr 1e-5 (10x the full fine-tuning's, as verl's LoRA
# guide recommends) and its own run name, calibrl_qwen2_5vl_7b_lora.
#
#   bash recipes/run_calibrl_qwen2_5vl_7b_lora.sh [--dry-run] [hydra overrides...]     (--help: the environment variables)
#
# The settings are one Hydra config: recipes/calibrl_qwen2_5vl_7b_lora.yaml, which also reads the environment variables
# (--help lists them).

set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
# python -m calibrl_verl.main_calibrl --config-name calibrl_qwen2_5vl_7b_lora "$@"
calibrl_launch calibrl_qwen2_5vl_7b_lora "$@"
