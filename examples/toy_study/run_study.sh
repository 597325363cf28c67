#!/usr/bin/env bash
# The toy-scale study: GRPO vs CalibRL (alpha 0.3/0.5/0.8, sequence gap, weak expert), GRPO + entropy bonus
# and LUFFY on the tiny multimodal task, 3 seeds each, with the real recipe on the CPU backend; then the report.
#
#   bash examples/toy_study/run_study.sh [hydra overrides for every run...]
#
# Resumable: re-run the same command after an interruption and finished runs are skipped, an unfinished run
# resumes from its last verl checkpoint. About 45 minutes on 2 idle cores (docs/toy_study/README.md).
# Env: OUT (outputs/toy_study), REPORT (docs/toy_study), PRESET (full | fast), JOBS ("" = the grid's 1: runs at
# a time, each holds ~13.5 GB), SEEDS ("" = the preset's), METHODS ("" = all), VENV (.venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
OUT="${OUT:-$ROOT/outputs/toy_study}"
REPORT="${REPORT:-$ROOT/docs/toy_study}"
PRESET="${PRESET:-full}"
JOBS="${JOBS:-}"
SEEDS="${SEEDS:-}"
METHODS="${METHODS:-}"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import calibrl_verl, verl" 2>/dev/null; then
  VENV="$VENV" bash "$ROOT/scripts/setup_cpu.sh"
fi
args=(--out "$OUT" --preset "$PRESET")
[ -n "$JOBS" ] && args+=(--jobs "$JOBS")
[ -n "$SEEDS" ] && args+=(--seeds $SEEDS)
[ -n "$METHODS" ] && args+=(--methods $METHODS)
status=0
"$VENV/bin/python" -m calibrl_verl.study.grid "${args[@]}" "$@" || status=$?
# the report covers whatever finished, so a partly failed grid still shows its runs
"$VENV/bin/python" -m calibrl_verl.study.report --study "$OUT" --out "$REPORT"
exit "$status"
