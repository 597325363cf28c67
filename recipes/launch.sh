#!/usr/bin/env bash
# The launcher of the recipes' run scripts (recipes/run_*.sh source it; it is not run on its own).
#
# A recipe is one Hydra config, recipes/<recipe>.yaml (read it for the settings; paper.yaml holds the shared
# part, models/ and methods/ what differs). `calibrl_launch <recipe> "$@"` prints the command, then runs
#     python -m calibrl_verl.main_calibrl --config-dir recipes --config-name <recipe> <environment> <your overrides>
# where <environment> are the overrides the variables below ask for. Your overrides come last, so they win
# (Hydra keeps the last value of a key).
#
#   bash recipes/run_calibrl_qwen2_5vl_7b.sh [--dry-run] [key=value ...]
#
# main_calibrl checks the composed config before Ray starts: the calibrl: keys, that a PPO mini-batch's rows
# (expert rows included) split over all GPUs, and that the data files and a local model directory exist.
#
# Environment (defaults in brackets; relative paths are taken from the current directory):
#   MODEL_PATH       HF model id or local dir          [the recipe's: Qwen/Qwen2.5-VL-7B-Instruct, 3B for the 3B recipe]
#                    (Qwen/Qwen3-VL-8B-Instruct for the *_qwen3vl_8b recipes, 4B for calibrl_qwen3vl_4b)
#   TRAIN_FILES      training parquet(s), comma- or space-separated  [<repo>/data/virl39k/train.parquet]
#   VAL_FILES        validation parquet(s)  [<repo>/data/geometry3k/test.parquet,<repo>/data/geoqa/test.parquet]
#                    (a text recipe, one whose defaults list names `text`: the files in recipes/text.yaml, under
#                    <repo>/: data/openr1_math/train.parquet and data/math500/test.parquet)
#   NNODES           nodes in the Ray cluster          [the recipe's: 1]
#   N_GPUS_PER_NODE  GPUs per node                     [the recipe's: 8]
#   PROJECT, EXP     trainer.project_name / trainer.experiment_name  [calibrl, <loss_mode>_<model>: a swapped
#                    method or model (methods=grpo) is a run of its own; give a variant of a run its own EXP]
#   OUTPUT_DIR       checkpoints (and tensorboard/ under it)  [<repo>/checkpoints/<project_name>/<experiment_name>,
#                    the composed names, as a Hydra interpolation]
#   PYTHON           interpreter                        [python3]
#   DRY_RUN=1        (or --dry-run) print the command and the composed config (YAML, on stdout), launch nothing;
#                    missing data files are listed instead of stopping it
#   WANDB_API_KEY    when set, or after `wandb login` (its key in ~/.netrc, or $NETRC), wandb joins the console +
#                    tensorboard loggers
#
# Multi-node (NNODES > 1): verl runs on one Ray cluster that spans the nodes.
#   node 0:        ray start --head --port=6379 --num-gpus=8
#   other nodes:   ray start --address=<node-0 IP>:6379 --num-gpus=8
#   node 0:        NNODES=2 bash recipes/run_calibrl_qwen2_5vl_7b.sh actor_rollout_ref.actor.ppo_mini_batch_size=96
# Every node needs the same Python environment (this package installed: its verl plugin registers CalibRL in
# each Ray worker) and the same model and data paths (shared file system or identical copies). verl splits each
# PPO mini-batch (prompts x rollout.n rows) evenly over all GPUs: the paper's 120 x 11 rows do not split over 16
# GPUs, so without the override main_calibrl stops and names a size that does for both 11 and 10 rows (96); give
# the GRPO / LUFFY / RL-PLUS runs of a comparison the same value.

CALIBRL_RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALIBRL_ROOT="$(dirname "$CALIBRL_RECIPES_DIR")"

calibrl_die() {
  echo "error: $*" >&2
  exit 1
}

calibrl_abspath() {
  case "$1" in
    /* | *://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

# "a,b c" -> the Hydra list [/abs/a,/abs/b,/abs/c] (commas, spaces and Hydra-style brackets/quotes separate).
# Absolute, because verl opens the files in Ray workers whose working directory may not be this one.
calibrl_files_list() (
  set -f  # no globbing of the words
  local item out=()
  for item in $(printf '%s' "$1" | tr ',[]"' "    " | tr "'" " "); do
    out+=("$(calibrl_abspath "$item")")
  done
  local IFS=,
  printf '[%s]' "${out[*]}"
)

calibrl_positive_int() {
  [[ "${!1}" =~ ^[1-9][0-9]*$ ]] || calibrl_die "$1='${!1}' must be a positive integer"
}

# A text recipe's default data files: recipes/text.yaml's `  <key>: [a, b]` line as "<repo>/a,<repo>/b".
calibrl_text_files() {
  sed -n "s/^  $1: *\[\(.*\)\]\$/\1/p" "$CALIBRL_RECIPES_DIR/text.yaml" | tr ',' '\n' \
    | sed "s|^ *|$CALIBRL_ROOT/|" | paste -sd, -
}

# The overrides the environment asks for, into CALIBRL_ENV_ARGS (a variable left unset keeps the recipe's value;
# data files and OUTPUT_DIR always have a value, as they did before the recipes were YAML: <repo>/...).
calibrl_env_overrides() {
  local recipe="$1"
  if grep -qx '  - text' "$CALIBRL_RECIPES_DIR/$recipe.yaml" 2>/dev/null; then  # text data (recipes/text.yaml)
    : "${TRAIN_FILES:=$(calibrl_text_files train_files)}"
    : "${VAL_FILES:=$(calibrl_text_files val_files)}"
  fi
  : "${TRAIN_FILES:=$CALIBRL_ROOT/data/virl39k/train.parquet}"
  : "${VAL_FILES:=$CALIBRL_ROOT/data/geometry3k/test.parquet,$CALIBRL_ROOT/data/geoqa/test.parquet}"
  # the default follows the composed run name (an interpolation Hydra resolves), so methods=grpo on a CalibRL
  # recipe writes its own folder instead of resuming CalibRL's checkpoints
  local run_dir='${trainer.project_name}/${trainer.experiment_name}'
  : "${OUTPUT_DIR:=$CALIBRL_ROOT/checkpoints/$run_dir}"
  OUTPUT_DIR="$(calibrl_abspath "$OUTPUT_DIR")"
  CALIBRL_ENV_ARGS=(
    "data.train_files=$(calibrl_files_list "$TRAIN_FILES")"
    "data.val_files=$(calibrl_files_list "$VAL_FILES")"
  )
  [[ -z "${MODEL_PATH:-}" ]] || CALIBRL_ENV_ARGS+=("actor_rollout_ref.model.path=$MODEL_PATH")
  if calibrl_wandb_ready; then CALIBRL_ENV_ARGS+=("trainer.logger=[console,tensorboard,wandb]"); fi
  [[ -z "${PROJECT:-}" ]] || CALIBRL_ENV_ARGS+=("trainer.project_name=$PROJECT")
  [[ -z "${EXP:-}" ]] || CALIBRL_ENV_ARGS+=("trainer.experiment_name=$EXP")
  CALIBRL_ENV_ARGS+=("trainer.default_local_dir=$OUTPUT_DIR")
  if [[ -n "${NNODES:-}" ]]; then calibrl_positive_int NNODES; CALIBRL_ENV_ARGS+=("trainer.nnodes=$NNODES"); fi
  if [[ -n "${N_GPUS_PER_NODE:-}" ]]; then
    calibrl_positive_int N_GPUS_PER_NODE
    CALIBRL_ENV_ARGS+=("trainer.n_gpus_per_node=$N_GPUS_PER_NODE")
  fi
}

# wandb can log: a key in the environment, or `wandb login`'s entry for api.wandb.ai in the netrc file
calibrl_wandb_ready() {
  [[ -n "${WANDB_API_KEY:-}" ]] || grep -qs "api.wandb.ai" "${NETRC:-$HOME/.netrc}"
}

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
  local recipe="$1"
  shift
  case "${1:-}" in -h | --help) calibrl_help; exit 0 ;; esac
  calibrl_env_overrides "$recipe"
  local cmd=(
    env PYTHONUNBUFFERED=1
    "${PYTHON:-python3}" -m calibrl_verl.main_calibrl "--config-dir=$CALIBRL_RECIPES_DIR" "--config-name=$recipe"
    "${CALIBRL_ENV_ARGS[@]}"
  )
  if [[ "${DRY_RUN:-0}" == 1 ]]; then cmd+=(--dry-run); fi
  cmd+=("$@")
  calibrl_print_command "${cmd[@]}" >&2
  # main_calibrl checks the config and the input files and points TENSORBOARD_DIR at OUTPUT_DIR/tensorboard;
  # verl creates OUTPUT_DIR when it first writes there
  exec "${cmd[@]}"
}
