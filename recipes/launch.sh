#!/usr/bin/env bash
# The launcher of the recipes' run scripts (recipes/run_*.sh source it; it is not run on its own).
#
# A recipe is one Hydra config, recipes/<recipe>.yaml (read it for the settings; paper.yaml holds the shared
# part, models/ and methods/ what differs). `calibrl_launch <recipe> "$@"` prints the command, then runs
#     python -m calibrl_verl.main_calibrl --config-dir recipes --config-name <recipe> <your overrides>
# Your overrides are Hydra's (key=value) and win over the recipe. The recipe's YAML reads the environment variables
# below (${oc.env:...} and calibrl_verl/config/resolvers.py); main_calibrl resolves them on this machine, before
# Ray starts, and checks the composed config: the calibrl: keys, that a PPO mini-batch's rows (expert rows
# included) split over all GPUs, and that the data files and a local model directory exist.
#
#   bash recipes/run_calibrl_qwen2_5vl_7b.sh [--dry-run] [key=value ...]
#
# Environment (the key each sets, its default in brackets; relative paths are taken from the current directory;
# a variable left unset or empty keeps the default):
#   MODEL_PATH       actor_rollout_ref.model.path: HF model id or local dir  [the model file's (recipes/models/):
#                    Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct, ...]
#   TRAIN_FILES      data.train_files: training parquet(s), comma- or space-separated, made absolute
#                    [<repo>/data/virl39k/train.parquet]
#   VAL_FILES        data.val_files: validation parquet(s)  [<repo>/data/geometry3k/test.parquet,
#                    <repo>/data/geoqa/test.parquet]; a text recipe (recipes/text.yaml): <repo>/data/openr1_math/
#                    train.parquet and <repo>/data/math500/test.parquet
#   NNODES           trainer.nnodes: nodes in the Ray cluster, a positive integer  [1]
#   N_GPUS_PER_NODE  trainer.n_gpus_per_node: GPUs per node, a positive integer  [8; 4 for the LoRA recipe]
#   PROJECT          trainer.project_name  [calibrl]
#   EXP              trainer.experiment_name  [<loss_mode>_<model>: a swapped method or model (methods=grpo) is a
#                    run of its own; give a variant of a run its own EXP]
#   OUTPUT_DIR       trainer.default_local_dir: checkpoints (and tensorboard/ under it), made absolute
#                    [<repo>/checkpoints/<project_name>/<experiment_name>, the composed names]
#   WANDB_API_KEY    trainer.logger: when set, or after `wandb login` (its key in ~/.netrc, or $NETRC), wandb joins
#                    the console + tensorboard loggers
# and for the launch itself:
#   PYTHON           interpreter                        [python3]
#   DRY_RUN=1        (or --dry-run) print the command and the composed config (YAML, on stdout), launch nothing;
#                    missing data files are listed instead of stopping it
# <repo> is the folder above recipes/. The printed command names the variables that are set (not WANDB_API_KEY).
#
# Multi-node (NNODES > 1): verl runs on one Ray cluster that spans the nodes.
#   node 0:        ray start --head --port=6379 --num-gpus=8
#   other nodes:   ray start --address=<node-0 IP>:6379 --num-gpus=8
#   node 0:        NNODES=2 bash recipes/run_calibrl_qwen2_5vl_7b.sh actor_rollout_ref.actor.ppo_mini_batch_size=96
# Every node needs the same Python environment (this package installed: its verl plugin registers CalibRL in
# each Ray worker) and the same model and data paths (shared file system or identical copies); the variables are
# read on node 0 only. verl splits each PPO mini-batch (prompts x rollout.n rows) evenly over all GPUs: the
# paper's 120 x 11 rows do not split over 16 GPUs, so without the override main_calibrl stops and names a size
# that does for both 11 and 10 rows (96); give the GRPO / LUFFY / RL-PLUS runs of a comparison the same value.

CALIBRL_RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALIBRL_ROOT="$(dirname "$CALIBRL_RECIPES_DIR")"
# the variables the recipes read (paper.yaml, text.yaml, models/), named in the printed command
CALIBRL_ENV_VARS=(MODEL_PATH TRAIN_FILES VAL_FILES NNODES N_GPUS_PER_NODE PROJECT EXP OUTPUT_DIR)

# Bare when shell-safe, else single-quoted: the printed command can be pasted back into a shell.
calibrl_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:@+=,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The launcher (env, python -m module) on the first line, then one argument per line.
calibrl_print_command() {
  local arg sep='' wrap=0
  for arg in "$@"; do
    printf '%s' "$sep"
    calibrl_quote "$arg"
    [[ "$arg" == calibrl_verl.main_calibrl ]] && wrap=1
    if [[ $wrap == 1 ]]; then sep=$' \\\n    '; else sep=' '; fi
  done
  printf '\n'
}

calibrl_help() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  echo
  sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

# calibrl_launch <recipe> [--dry-run] [key=value ...]
calibrl_launch() {
  local recipe="$1" name set_vars=()
  shift
  case "${1:-}" in -h | --help) calibrl_help; exit 0 ;; esac
  for name in "${CALIBRL_ENV_VARS[@]}"; do  # empty is unset, as the help says (oc.env would read "")
    if [[ -n "${!name:-}" ]]; then set_vars+=("$name=${!name}"); else unset "$name"; fi
  done
  local cmd=(
    env PYTHONUNBUFFERED=1 ${set_vars[@]+"${set_vars[@]}"}
    "${PYTHON:-python3}" -m calibrl_verl.main_calibrl "--config-dir=$CALIBRL_RECIPES_DIR" "--config-name=$recipe"
  )
  if [[ "${DRY_RUN:-0}" == 1 ]]; then cmd+=(--dry-run); fi
  cmd+=("$@")
  calibrl_print_command "${cmd[@]}" >&2
  # main_calibrl resolves and checks the config and the input files and points TENSORBOARD_DIR at
  # OUTPUT_DIR/tensorboard; verl creates OUTPUT_DIR when it first writes there
  exec "${cmd[@]}"
}
