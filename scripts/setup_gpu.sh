#!/usr/bin/env bash
# GPU install for real runs, into the current Python environment (a fresh venv or conda env is advised).
#   bash scripts/setup_gpu.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -r "$ROOT/requirements.txt"
# flash-attn compiles against the installed torch: no build isolation (verl 0.9.1 pins 2.8.3).
"$PYTHON" -m pip install --no-build-isolation flash-attn==2.8.3
"$PYTHON" -m pip install --no-deps -e "$ROOT"
"$PYTHON" -c "import torch, vllm, verl, flash_attn, calibrl_verl; print('ok', torch.__version__, vllm.__version__, verl.__version__)"
