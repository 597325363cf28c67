"""Every place where the CPU backend touches verl internals, pinned to verl 0.9.1.

The rest of ``calibrl_verl.cpu`` only subclasses verl's documented extension classes (``PlatformBase``,
``RolloutReplica``, ``BaseRollout``; the attributes and server methods they must provide are marked "verl 0.9.1"
where they are set) and returns verl's ``TokenOutput``. The hooks below reach further: the platform and rollout
registries (one of them a module-level dict), environment variables read by verl's platform and engine lookups,
a backend string built inside ``verl.utils.distributed``, and an offload policy verl hard-codes for the
reference model. Each is a small function, commented with the verl version it was written for, and covered by
``tests/test_cpu_backend_on_cpu.py``. When upgrading verl, re-check this file first.

:func:`activate` applies all of them; it is idempotent and only called when ``CALIBRL_DEVICE=cpu``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

HF_ROLLOUT_NAME = "hf"
HF_ADAPTER_FQN = "calibrl_verl.cpu.rollout.HFServerAdapter"
_FIX_MARKER = "__calibrl_cpu_backend_fix__"


def set_platform_env() -> None:
    """Select the CPU platform and the FSDP engine through the environment (inherited by Ray workers).

    verl 0.9.1: ``verl/plugin/platform/platform_manager.py::_detect_platform_name`` honours ``VERL_PLATFORM``;
    ``verl/workers/engine/base.py::EngineRegistry.get_engine_cls`` honours ``VERL_ENGINE_DEVICE``. The FSDP
    engine registers for ``cuda``/``npu`` only (blocker 4), so the lookup key is forced to ``cuda`` while the
    engine still takes its real device ("cpu") from the platform.
    """
    os.environ["VERL_PLATFORM"] = "cpu"
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"


def register_platform() -> type:
    """Register :class:`~calibrl_verl.cpu.platform.PlatformCPU` as verl platform ``cpu``.

    verl 0.9.1: ``verl.plugin.platform.PlatformRegistry.register(platform=...)`` is a class decorator; the
    singleton is resolved lazily on the first ``get_platform()``, which in every verl process happens after
    the ``verl.plugins`` entry points ran, so registering from the plugin is early enough.
    """
    from verl.plugin.platform import PlatformRegistry

    from calibrl_verl.cpu.platform import PLATFORM_NAME, PlatformCPU

    if PlatformRegistry.get(PLATFORM_NAME) is not PlatformCPU:
        PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
    return PlatformCPU


def dedupe_backend_string(backend: str | None) -> str | None:
    """Drop repeated device entries from a ``"device:backend,..."`` string, keeping the first of each device.

    verl 0.9.1 ``verl/utils/distributed.py::initialize_global_process_group_ray`` (and
    ``initialize_global_process_group``) build ``f"cpu:gloo,{device}:{backend}"``; on the CPU platform that
    is ``"cpu:gloo,cpu:gloo"`` and torch raises ``Duplicate device type cpu`` (blocker 3). Plain backend
    names (``"gloo"``) and ``None`` pass through unchanged.
    """
    if not isinstance(backend, str) or ":" not in backend:
        return backend
    seen: dict[str, str] = {}
    for entry in backend.split(","):
        device, _, name = entry.strip().partition(":")
        seen.setdefault(device.strip(), name.strip())
    return ",".join(f"{device}:{name}" for device, name in seen.items())


def install_process_group_backend_fix() -> None:
    """Wrap ``torch.distributed.init_process_group`` so it de-duplicates the backend string (see above).

    This is the ONE place the blocker-3 fix lives. It wraps torch rather than verl because verl 0.9.1's
    callers import ``initialize_global_process_group_ray`` by name (``verl/workers/engine_workers.py``,
    ``verl/checkpoint_engine/base.py``) but always reach torch through the ``torch.distributed`` attribute,
    so this catches every call site. Only installed when ``CALIBRL_DEVICE=cpu``; idempotent.
    """
    import torch.distributed as dist

    original = dist.init_process_group
    if getattr(original, _FIX_MARKER, False):
        return

    @functools.wraps(original)
    def init_process_group(backend: str | None = None, *args: Any, **kwargs: Any) -> Any:
        return original(dedupe_backend_string(backend), *args, **kwargs)

    setattr(init_process_group, _FIX_MARKER, True)
    dist.init_process_group = init_process_group


def disable_fsdp2_offload_pinning() -> None:
    """Make ``torch.distributed.fsdp.CPUOffloadPolicy`` never pin memory.

    verl 0.9.1 ``verl/workers/engine/fsdp/transformer_impl.py::_build_fsdp_module`` gives every forward-only
    FSDP2 engine (the reference policy) ``CPUOffloadPolicy(pin_memory=True)``. Pinned memory only serves
    host-to-accelerator DMA, and a CUDA build of torch raises "Found no NVIDIA driver" when asked to pin
    without one, so the ref model cannot be built on CPU. Offloading itself is harmless here (the "device"
    is the CPU). The dataclass' ``__init__`` is wrapped because verl binds the class by name at import.
    Only installed when ``CALIBRL_DEVICE=cpu``; idempotent.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy

    original = CPUOffloadPolicy.__init__
    if getattr(original, _FIX_MARKER, False):
        return

    @functools.wraps(original)
    def __init__(self: Any, pin_memory: bool = True) -> None:  # noqa: N807 - replaces the dataclass __init__
        original(self, pin_memory=False)

    setattr(__init__, _FIX_MARKER, True)
    CPUOffloadPolicy.__init__ = __init__


def _load_hf_replica() -> type:
    """Loader for verl's replica registry: import lazily, as verl's built-in loaders do."""
    from calibrl_verl.cpu.rollout import HFReplica

    return HFReplica


def register_hf_rollout(loader: Callable[[], type] = _load_hf_replica) -> None:
    """Make ``actor_rollout_ref.rollout.name=hf`` resolve on both sides of verl's rollout split.

    verl 0.9.1:
    * replica side (TaskRunner: ``LLMServerManager`` -> ``get_rollout_replica_class``):
      ``verl.workers.rollout.replica.RolloutReplicaRegistry.register(name, loader)`` - public API.
    * adapter side (actor worker: ``engine_workers.py`` -> ``get_rollout_class(name, mode)``): the
      module-level dict ``verl.workers.rollout.base._ROLLOUT_REGISTRY`` maps ``(name, mode)`` to a class FQN.
      It has no register function in 0.9.1, so the entry is written directly.
    """
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(HF_ROLLOUT_NAME, loader)
    rollout_base._ROLLOUT_REGISTRY[(HF_ROLLOUT_NAME, "async")] = HF_ADAPTER_FQN


def activate() -> None:
    """Apply every seam above, in dependency order (platform first: later imports may ask for the device)."""
    set_platform_env()
    register_platform()
    install_process_group_backend_fix()
    disable_fsdp2_offload_pinning()
    register_hf_rollout()
    logger.info("calibrl_verl.cpu: CPU backend active (platform=cpu, backend=gloo, rollout=%s)", HF_ROLLOUT_NAME)
