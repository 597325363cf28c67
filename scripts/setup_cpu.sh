#!/usr/bin/env bash
# CPU install (CI, laptops, the tiny demo): a venv with the pinned CPU stack and this package (editable).
#   bash scripts/setup_cpu.sh            # -> .venv/
#   VENV=/path/to/venv bash scripts/setup_cpu.sh
# Idempotent: re-running only installs what is missing. torch/torchvision are held by the constraints file
# (an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup_cpu] creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# A current pip: the resolver of Python 3.11's bundled pip 23.2 backtracks for minutes on verl's tree.
"$VENV/bin/python" -m pip install --disable-pip-version-check -q "pip>=25.1,<26.2"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$ROOT/requirements/constraints-cpu.txt")
# torch + torchvision first and alone: the CPU-usable pair is resolved before anything can ask for another.
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" -r "$ROOT/requirements/cpu.txt"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import torch, torchvision, verl, transfer_queue, calibrl_verl
from torchvision.ops import nms  # noqa: F401  (fails on a CUDA-linked torchvision without CUDA)
print(f"[setup_cpu] ok: torch {torch.__version__}, torchvision {torchvision.__version__}, verl {verl.__version__}")
PY
