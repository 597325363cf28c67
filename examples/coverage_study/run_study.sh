#!/usr/bin/env bash
# The coverage study: GRPO, GRPO + entropy bonus, CalibRL (alpha 0.5, sequence gap), LUFFY and SFT-then-GRPO on the
# navigation task of arXiv 2505.22756 (calibrl_verl.tiny.wall_task), 3 seeds each, with the real recipe on the CPU
# backend; then the report (docs/coverage_study/).
#
#   bash examples/coverage_study/run_study.sh [hydra overrides for every run...]
#
# Resumable: re-run the same command after an interruption; measured runs are skipped, an unfinished run resumes
# from its last verl checkpoint. The SFT warm-start (200k problems, one epoch) is built once into $OUT/assets.
# Env: OUT (outputs/coverage_study), REPORT (docs/coverage_study), PRESET (full | fast), SEEDS ("" = the preset's),
# ARMS ("" = the preset's), STEPS ("" = the preset's), VENV (.venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
OUT="${OUT:-$ROOT/outputs/coverage_study}"
REPORT="${REPORT:-$ROOT/docs/coverage_study}"
PRESET="${PRESET:-full}"
SEEDS="${SEEDS:-}"
ARMS="${ARMS:-}"
STEPS="${STEPS:-}"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import calibrl_verl, verl" 2>/dev/null; then
  VENV="$VENV" bash "$ROOT/scripts/setup_cpu.sh"
fi
args=(--out "$OUT" --preset "$PRESET")
[ -n "$SEEDS" ] && args+=(--seeds $SEEDS)
[ -n "$ARMS" ] && args+=(--arms $ARMS)
[ -n "$STEPS" ] && args+=(--steps "$STEPS")
status=0
"$VENV/bin/python" -m calibrl_verl.study.coverage "${args[@]}" "$@" || status=$?
# the report covers whatever was measured, so a partly failed grid still shows its runs
"$VENV/bin/python" -m calibrl_verl.study.coverage_report --study "$OUT" --out "$REPORT"
exit "$status"
