#!/usr/bin/env bash
# Shared part of the CalibRL recipes (recipes/run_*.sh source it; it is not run on its own).
#
# A recipe sets MODEL_SIZE (7b | 3b), LOSS_MODE (calibrl | grpo | luffy | rlplus) and ROLLOUT_N, then calls
# `calibrl_run "$@"`, which prints the fully resolved command and launches
#     python -m calibrl_verl.main_calibrl <recipe overrides> <your Hydra overrides>
# Your overrides come last, so they win (Hydra keeps the last value of a key).
#
#   bash recipes/run_calibrl_qwen2_5vl_7b.sh [--dry-run] [key=value ...]
#
# Environment (defaults in brackets; relative paths are taken from the current directory):
#   MODEL_PATH       HF model id or local dir          [Qwen/Qwen2.5-VL-7B-Instruct, 3B for the 3B recipe]
#   TRAIN_FILES      training parquet(s), comma- or space-separated  [<repo>/data/virl39k/train.parquet]
#   VAL_FILES        validation parquet(s)  [<repo>/data/geometry3k/test.parquet,<repo>/data/geoqa/test.parquet]
#   NNODES           nodes in the Ray cluster          [1]
#   N_GPUS_PER_NODE  GPUs per node                     [8]
#   PROJECT, EXP     trainer.project_name / trainer.experiment_name  [calibrl, <loss_mode>_qwen2_5vl_<size>]
#   OUTPUT_DIR       checkpoints (and tensorboard/ under it)  [<repo>/checkpoints/$PROJECT/$EXP]
#   PYTHON           interpreter                        [python3]
#   DRY_RUN=1        (or --dry-run as the first argument) print the command, launch nothing
#   WANDB_API_KEY    when set, wandb joins the console + tensorboard loggers
#
# Multi-node (NNODES > 1): verl runs on one Ray cluster that spans the nodes.
#   node 0:        ray start --head --port=6379 --num-gpus=8
#   other nodes:   ray start --address=<node-0 IP>:6379 --num-gpus=8
#   node 0:        NNODES=2 bash recipes/run_calibrl_qwen2_5vl_7b.sh
# Every node needs the same Python environment (this package installed: its verl plugin registers CalibRL in
# each Ray worker) and the same model and data paths (shared file system or identical copies). verl splits each
# PPO mini-batch (prompts x rollout.n rows) evenly over all GPUs: 120 x 11 rows do not split over 16 GPUs, so
# the recipe stops and names a mini-batch size that does (e.g. actor_rollout_ref.actor.ppo_mini_batch_size=96).

CALIBRL_RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALIBRL_ROOT="$(dirname "$CALIBRL_RECIPES_DIR")"
CALIBRL_TRAIN_BATCH=480   # prompts per step (SPEC section 7)
CALIBRL_PPO_MINI=120      # prompts per PPO mini-batch

calibrl_die() {
  echo "error: $*" >&2
  exit 1
}

# Model-size presets: the default model, vLLM tensor parallelism and the static micro batches (the latter are
# used only with actor_rollout_ref.actor.use_dynamic_bsz=false; they divide the per-GPU mini-batch of
# 120 prompts x n rows on 8 GPUs for n = 10 and n = 11).
calibrl_model_preset() {
  case "${MODEL_SIZE:-}" in
    7b)
      : "${MODEL_PATH:=Qwen/Qwen2.5-VL-7B-Instruct}"
      ROLLOUT_TP=2
      PPO_MICRO_BSZ=5
      LOGPROB_MICRO_BSZ=15
      ;;
    3b)
      : "${MODEL_PATH:=Qwen/Qwen2.5-VL-3B-Instruct}"
      ROLLOUT_TP=1
      PPO_MICRO_BSZ=3
      LOGPROB_MICRO_BSZ=5
      ;;
    *) calibrl_die "MODEL_SIZE='${MODEL_SIZE:-}' (set by the recipe) must be 7b or 3b" ;;
  esac
}

calibrl_env_defaults() {
  calibrl_model_preset
  : "${LOSS_MODE:?the recipe must set LOSS_MODE}" "${ROLLOUT_N:?the recipe must set ROLLOUT_N}"
  : "${TRAIN_FILES:=$CALIBRL_ROOT/data/virl39k/train.parquet}"
  : "${VAL_FILES:=$CALIBRL_ROOT/data/geometry3k/test.parquet,$CALIBRL_ROOT/data/geoqa/test.parquet}"
  : "${NNODES:=1}"
  : "${N_GPUS_PER_NODE:=8}"
  : "${PROJECT:=calibrl}"
  : "${EXP:=${LOSS_MODE}_qwen2_5vl_${MODEL_SIZE}}"
  : "${OUTPUT_DIR:=$CALIBRL_ROOT/checkpoints/$PROJECT/$EXP}"
  : "${PYTHON:=python3}"
  : "${DRY_RUN:=0}"
  OUTPUT_DIR="$(calibrl_abspath "$OUTPUT_DIR")"
  [[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || calibrl_die "NNODES='$NNODES' must be a positive integer"
  [[ "$N_GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || calibrl_die "N_GPUS_PER_NODE='$N_GPUS_PER_NODE' must be a positive integer"
}

# verl asserts that every PPO mini-batch (prompts x rollout.n rows) splits evenly over the GPUs: check it here,
# before a cluster spends minutes loading models (skipped when the user overrides any of the keys involved).
calibrl_check_batch_split() {
  local key gpus=$((NNODES * N_GPUS_PER_NODE)) m best=""
  for key in actor_rollout_ref.actor.ppo_mini_batch_size data.train_batch_size actor_rollout_ref.rollout.n \
    trainer.nnodes trainer.n_gpus_per_node; do
    [[ "$(calibrl_should_check "$key")" == 1 ]] || return 0
  done
  (( CALIBRL_PPO_MINI * ROLLOUT_N % gpus == 0 )) && return 0
  for ((m = 1; m <= CALIBRL_TRAIN_BATCH; m++)); do
    (( CALIBRL_TRAIN_BATCH % m == 0 && m * ROLLOUT_N % gpus == 0 )) || continue
    if [[ -z "$best" ]] || (( (m - CALIBRL_PPO_MINI) ** 2 < (best - CALIBRL_PPO_MINI) ** 2 )); then best=$m; fi
  done
  local what="the PPO mini-batch of $CALIBRL_PPO_MINI prompts x $ROLLOUT_N rows does not split over $gpus GPUs"
  [[ -n "$best" ]] || calibrl_die "$what; choose data.train_batch_size and actor_rollout_ref.actor.ppo_mini_batch_size so that prompts x $ROLLOUT_N is divisible by $gpus"
  calibrl_die "$what; pass actor_rollout_ref.actor.ppo_mini_batch_size=$best (it divides data.train_batch_size=$CALIBRL_TRAIN_BATCH)"
}

calibrl_abspath() {
  case "$1" in
    /* | *://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

# "a,b c" -> one path per line (commas, spaces and Hydra-style brackets/quotes accepted as separators).
calibrl_split_files() (
  set -f  # no globbing of the words
  for item in $(printf '%s' "$1" | tr ',[]"' "    " | tr "'" " "); do
    printf '%s\n' "$item"
  done
)

# The Hydra list of absolute paths for a file variable; dies naming the variable when a local file is missing.
calibrl_files_override() {
  local var="$1" check="$2" path out=()
  while IFS= read -r path; do
    [[ -n "$path" ]] || continue
    path="$(calibrl_abspath "$path")"
    if [[ "$check" == 1 && "$path" != *://* && ! -f "$path" ]]; then
      calibrl_die "$var: no such file: $path (set $var to your parquet file(s); see README 'Preparing data')"
    fi
    out+=("$path")
  done < <(calibrl_split_files "${!var}")
  [[ ${#out[@]} -gt 0 ]] || calibrl_die "$var is empty: set it to your parquet file(s)"
  local IFS=,
  printf '[%s]' "${out[*]}"
}

# 1 unless the user's arguments already set the key (then the recipe's file check is skipped).
calibrl_should_check() {
  local key="$1" arg
  for arg in "${CALIBRL_USER_ARGS[@]+"${CALIBRL_USER_ARGS[@]}"}"; do
    [[ "$arg" == "$key="* || "$arg" == "+$key="* || "$arg" == "++$key="* ]] && { echo 0; return; }
  done
  echo 1
}

calibrl_check_model() {
  case "$MODEL_PATH" in
    /* | ./* | ../* | "~"*)
      [[ -d "$MODEL_PATH" ]] || calibrl_die "MODEL_PATH: no such directory: $MODEL_PATH (a local model dir or a HF id)" ;;
  esac
}

calibrl_loggers() {
  if [[ -n "${WANDB_API_KEY:-}" ]]; then echo "[console,tensorboard,wandb]"; else echo "[console,tensorboard]"; fi
}

# The config, as bash arrays (the paper's 7B setting, SPEC section 7; see the recipes for what differs).
calibrl_build_config() {
  local train_files val_files max_prompt=20480 max_response=4096
  train_files="$(calibrl_files_override TRAIN_FILES "$(calibrl_should_check data.train_files)")"
  val_files="$(calibrl_files_override VAL_FILES "$(calibrl_should_check data.val_files)")"
  DATA_ARGS=(
    "data.train_files=$train_files"
    "data.val_files=$val_files"
    data.prompt_key=prompt
    data.image_key=images
    data.train_batch_size=$CALIBRL_TRAIN_BATCH
    data.max_prompt_length=$max_prompt
    data.max_response_length=$max_response
    data.filter_overlong_prompts=true
    data.truncation=error
  )
  MODEL_ARGS=(
    "actor_rollout_ref.model.path=$MODEL_PATH"
    actor_rollout_ref.model.use_remove_padding=true
    actor_rollout_ref.model.enable_gradient_checkpointing=true
  )
  ACTOR_ARGS=(
    actor_rollout_ref.actor.strategy=fsdp2
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.optim.lr_scheduler_type=constant
    actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0
    actor_rollout_ref.actor.grad_clip=1.0
    actor_rollout_ref.actor.ppo_mini_batch_size=$CALIBRL_PPO_MINI   # prompts (verl multiplies by rollout.n)
    actor_rollout_ref.actor.ppo_epochs=1
    actor_rollout_ref.actor.use_dynamic_bsz=true
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$((max_prompt + max_response))
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=$PPO_MICRO_BSZ
    actor_rollout_ref.actor.use_kl_loss=false
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.loss_agg_mode=token-mean
    actor_rollout_ref.actor.clip_ratio_low=0.2
    actor_rollout_ref.actor.clip_ratio_high=0.2
    actor_rollout_ref.actor.clip_ratio_c=3.0
    actor_rollout_ref.actor.fsdp_config.param_offload=false
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=false
  )
  ROLLOUT_ARGS=(
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.n=$ROLLOUT_N
    actor_rollout_ref.rollout.temperature=1.0
    actor_rollout_ref.rollout.top_p=1.0
    actor_rollout_ref.rollout.top_k=-1
    actor_rollout_ref.rollout.tensor_model_parallel_size=$ROLLOUT_TP
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=$LOGPROB_MICRO_BSZ
    actor_rollout_ref.rollout.val_kwargs.do_sample=false   # greedy validation, as calibrl_verl.evaluate
    actor_rollout_ref.rollout.val_kwargs.temperature=0
    actor_rollout_ref.rollout.val_kwargs.n=1
  )
  ALGO_ARGS=(
    algorithm.use_kl_in_reward=false
  )
  CALIBRL_ARGS=(                                # SPEC section 4 defaults, all explicit
    calibrl.loss_mode=$LOSS_MODE
    calibrl.expert_key=solution
    calibrl.experts_per_group=1
    calibrl.alpha=0.5
    calibrl.guide_coef=0.1
    calibrl.pass_threshold=0.1
    calibrl.gap=token
    calibrl.tail=zero
    calibrl.sequence_norm=sum
    calibrl.norm_adv_by_std=false
    calibrl.mix_policy=always
    calibrl.mix_ratio=1.0
    "calibrl.pass_rate_range=[0.0,1.0]"
    calibrl.warmup_grpo_steps=0
    calibrl.expert_overlong=truncate
    calibrl.seed=0
  )
  TRAINER_ARGS=(
    "trainer.logger=$(calibrl_loggers)"
    "trainer.project_name=$PROJECT"
    "trainer.experiment_name=$EXP"
    "trainer.default_local_dir=$OUTPUT_DIR"
    trainer.nnodes=$NNODES
    trainer.n_gpus_per_node=$N_GPUS_PER_NODE
    trainer.total_epochs=1
    trainer.val_before_train=true
    trainer.test_freq=5
    trainer.save_freq=10
    trainer.critic_warmup=0
  )
}

# Bare when shell-safe, else single-quoted: the printed command can be pasted back into a shell.
calibrl_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:@+=,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The launcher (env, python -m module) on the first line, then one override per line.
calibrl_print_command() {
  local arg sep='' wrap=0
  for arg in "${CALIBRL_CMD[@]}"; do
    printf '%s' "$sep"
    calibrl_quote "$arg"
    [[ "$arg" == calibrl_verl.main_calibrl ]] && wrap=1
    if [[ $wrap == 1 ]]; then sep=$' \\\n    '; else sep=' '; fi
  done
  printf '\n'
}

calibrl_parse_flags() {
  CALIBRL_USER_ARGS=()
  case "${1:-}" in
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  esac
  CALIBRL_USER_ARGS=("$@")
}

calibrl_run() {
  calibrl_parse_flags "$@"
  calibrl_env_defaults
  calibrl_check_model
  calibrl_check_batch_split
  calibrl_build_config
  CALIBRL_CMD=(
    env "TENSORBOARD_DIR=$OUTPUT_DIR/tensorboard" PYTHONUNBUFFERED=1
    "$PYTHON" -m calibrl_verl.main_calibrl
    "${DATA_ARGS[@]}" "${MODEL_ARGS[@]}" "${ACTOR_ARGS[@]}" "${ROLLOUT_ARGS[@]}"
    "${ALGO_ARGS[@]}" "${CALIBRL_ARGS[@]}" "${TRAINER_ARGS[@]}"
    "${CALIBRL_USER_ARGS[@]+"${CALIBRL_USER_ARGS[@]}"}"
  )
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# dry run ($(basename "$0")): nothing launched" >&2
    calibrl_print_command
    return 0
  fi
  calibrl_print_command >&2
  mkdir -p "$OUTPUT_DIR"
  exec "${CALIBRL_CMD[@]}"
}
