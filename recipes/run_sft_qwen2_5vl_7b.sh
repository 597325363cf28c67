#!/usr/bin/env bash
# SFT on the expert traces, step 1 of the SFT-then-RL baseline (docs/recipes.md, "SFT then RL"): verl's own SFT
# trainer (python -m verl.trainer.sft_trainer under torchrun, config verl/trainer/config/sft_trainer_engine.yaml)
# on Qwen2.5-VL-7B-Instruct, images included. Step 2 is GRPO from the merged checkpoint:
#     python -m verl.model_merger merge --backend fsdp --local_dir <OUTPUT_DIR>/global_step_N --target_dir merged/sft
#     MODEL_PATH=merged/sft EXP=sft_grpo_qwen2_5vl_7b bash recipes/run_grpo_qwen2_5vl_7b.sh
#
#   bash recipes/run_sft_qwen2_5vl_7b.sh [--dry-run] [key=value ...]     (verl's SFT config keys; yours win)
#
# The data: python -m calibrl_verl.data.sft --input data/virl39k/train.parquet --output data/virl39k/sft.parquet
# (the prompt's messages + the expert trace as the assistant turn, and the images; rows without an expert dropped).
# Settings below are ours, not the paper's (it has no SFT run): lr 1e-5 cosine with 5% warm-up, global batch 64,
# one epoch, sequences up to 24576 tokens (the RL recipes' 20480 prompt + 4096 response; a longer one stops the run:
# data.truncation=error, as the RL side never cuts a sequence either).
#
# Environment (defaults in brackets; relative paths are taken from the current directory):
#   MODEL_PATH       HF model id or local dir          [Qwen/Qwen2.5-VL-7B-Instruct]
#   TRAIN_FILES      SFT parquet(s), comma- or space-separated  [<repo>/data/virl39k/sft.parquet]
#   VAL_FILES        SFT parquet(s) for the validation loss     [none]
#   N_GPUS_PER_NODE  GPUs (torchrun processes) on this node      [8]; one node (multi-node: run torchrun yourself)
#   PROJECT, EXP     trainer.project_name / trainer.experiment_name  [calibrl, sft_qwen2_5vl_7b]
#   OUTPUT_DIR       checkpoints (global_step_N/), tensorboard/ under it  [<repo>/checkpoints/<PROJECT>/<EXP>]
#   PYTHON           interpreter                        [python3]
#   DRY_RUN=1        (or --dry-run) print the command and the composed config (YAML, on stdout), launch nothing;
#                    missing data files are listed instead of stopping it
#   WANDB_API_KEY    when set, or after `wandb login`, wandb joins the console + tensorboard loggers

set -euo pipefail
# the recipes' launcher, for CALIBRL_ROOT and calibrl_quote only; it launches main_calibrl, not this. verl's SFT
# trainer does not load calibrl_verl.config's resolvers, so this script turns the environment into overrides itself.
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

sft_die() {
  echo "error: $*" >&2
  exit 1
}

sft_abspath() {
  case "$1" in
    /* | *://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

# "a,b c" -> the Hydra list [/abs/a,/abs/b,/abs/c] (commas, spaces and Hydra-style brackets/quotes separate).
sft_files_list() (
  set -f  # no globbing of the words
  local item out=()
  for item in $(printf '%s' "$1" | tr ',[]"' "    " | tr "'" " "); do
    out+=("$(sft_abspath "$item")")
  done
  local IFS=,
  printf '[%s]' "${out[*]}"
)

# wandb can log: a key in the environment, or `wandb login`'s entry for api.wandb.ai in the netrc file
sft_wandb_ready() {
  [[ -n "${WANDB_API_KEY:-}" ]] || grep -qs "api.wandb.ai" "${NETRC:-$HOME/.netrc}"
}

sft_help() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

case "${1:-}" in -h | --help) sft_help; exit 0 ;; esac
USER_ARGS=()
for arg in "$@"; do  # --dry-run anywhere among the overrides
  if [[ "$arg" == --dry-run ]]; then DRY_RUN=1; else USER_ARGS+=("$arg"); fi
done

: "${MODEL_PATH:=Qwen/Qwen2.5-VL-7B-Instruct}"
: "${TRAIN_FILES:=$CALIBRL_ROOT/data/virl39k/sft.parquet}"
: "${N_GPUS_PER_NODE:=8}"
: "${PROJECT:=calibrl}"
: "${EXP:=sft_qwen2_5vl_7b}"
: "${OUTPUT_DIR:=$CALIBRL_ROOT/checkpoints/$PROJECT/$EXP}"
[[ "$N_GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || sft_die "N_GPUS_PER_NODE='$N_GPUS_PER_NODE' must be a positive integer"
OUTPUT_DIR="$(sft_abspath "$OUTPUT_DIR")"
if [[ -n "${VAL_FILES:-}" ]]; then VAL="$(sft_files_list "$VAL_FILES")"; else VAL=null; fi
LOGGER="[console,tensorboard]"
if sft_wandb_ready; then LOGGER="[console,tensorboard,wandb]"; fi

ARGS=(
  "data.train_files=$(sft_files_list "$TRAIN_FILES")"
  "data.val_files=$VAL"
  data.messages_key=messages
  data.max_length=24576
  data.truncation=error
  data.train_batch_size=64
  data.micro_batch_size_per_gpu=1
  data.use_dynamic_bsz=true
  data.max_token_len_per_gpu=24576
  "model.path=$MODEL_PATH"
  model.enable_gradient_checkpointing=true
  optim.lr=1e-5
  optim.lr_warmup_steps_ratio=0.05
  optim.lr_scheduler_type=cosine
  trainer.total_epochs=1
  trainer.save_freq=after_each_epoch
  "trainer.project_name=$PROJECT"
  "trainer.experiment_name=$EXP"
  "trainer.default_local_dir=$OUTPUT_DIR"
  "trainer.logger=$LOGGER"
  trainer.nnodes=1
  "trainer.n_gpus_per_node=$N_GPUS_PER_NODE"
)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  cmd=(env PYTHONUNBUFFERED=1 "${PYTHON:-python3}" -m calibrl_verl.sft_dry_run "${ARGS[@]}" ${USER_ARGS[@]+"${USER_ARGS[@]}"})
else
  cmd=(
    env PYTHONUNBUFFERED=1 "TENSORBOARD_DIR=$OUTPUT_DIR/tensorboard"
    "${PYTHON:-python3}" -m torch.distributed.run --standalone --nnodes=1 "--nproc_per_node=$N_GPUS_PER_NODE"
    -m verl.trainer.sft_trainer "${ARGS[@]}" ${USER_ARGS[@]+"${USER_ARGS[@]}"}
  )
fi
# the launcher on the first line, then one override per line (pasteable)
sep='' wrap=0
for arg in "${cmd[@]}"; do
  printf '%s' "$sep"
  calibrl_quote "$arg"
  [[ "$arg" == verl.trainer.sft_trainer || "$arg" == calibrl_verl.sft_dry_run ]] && wrap=1
  if [[ $wrap == 1 ]]; then sep=$' \\\n    '; else sep=' '; fi
done >&2
printf '\n' >&2
exec "${cmd[@]}"
