"""A ``cpu`` platform for verl's platform abstraction (written against verl 0.9.1).

verl asks its platform singleton for the device name, the ``torch.<device>`` namespace, the collective
backend and the Ray resource name. With no accelerator, verl 0.9.1 falls back to ``nvidia`` and fails on the
first CUDA call, so a CPU run needs a platform of its own. Registration with verl's ``PlatformRegistry`` lives
in :mod:`calibrl_verl.cpu.seams`; this module only defines the class.

Design choices, each forced by how verl 0.9.1 uses the platform:

* ``current_device()`` returns the string ``"cpu"`` instead of an index: verl passes ``get_device_id()`` to
  ``tensor.to(...)`` / ``torch.device(...)`` / FSDP2, and an integer there means "accelerator N".
* ``ray_resource_name()`` stays ``"GPU"``: verl's placement groups ask for one accelerator bundle per worker,
  and Ray is given logical GPUs (``ray_init.num_gpus``) to satisfy them on a CPU-only host.
* ``is_platform_available()`` is ``False`` unless ``VERL_PLATFORM=cpu``: the platform is never auto-detected,
  so it cannot be picked on a GPU host by accident.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from verl.plugin.platform import PlatformBase

PLATFORM_NAME = "cpu"


def _host_memory() -> tuple[int, int]:
    """(free, total) host RAM in bytes, standing in for ``torch.cuda.mem_get_info`` in verl's memory logs."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:  # pragma: no cover - psutil ships with ray
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, pages * size


def _zero(*_args: Any, **_kwargs: Any) -> int:
    """Allocator statistics do not exist for host memory; verl only logs them."""
    return 0


def _noop(*_args: Any, **_kwargs: Any) -> None:
    """Cache/IPC/allocator controls have no CPU meaning; verl calls them unconditionally."""


class CpuDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the ``torch.cuda``-style functions verl calls through ``get_torch_device()``.

    ``torch.cpu`` lacks ``empty_cache``, ``mem_get_info``, the memory statistics and the RNG-state helpers
    that verl 0.9.1 calls on the device module; everything else is delegated to ``torch.cpu``.
    """

    empty_cache = staticmethod(_noop)
    ipc_collect = staticmethod(_noop)
    reset_peak_memory_stats = staticmethod(_noop)
    set_per_process_memory_fraction = staticmethod(_noop)
    memory_allocated = staticmethod(_zero)
    memory_reserved = staticmethod(_zero)
    max_memory_allocated = staticmethod(_zero)
    max_memory_reserved = staticmethod(_zero)
    mem_get_info = staticmethod(lambda *_a, **_k: _host_memory())
    get_rng_state = staticmethod(lambda *_a, **_k: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *_a, **_k: torch.set_rng_state(state))
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))
    manual_seed_all = staticmethod(lambda seed: torch.manual_seed(seed))
    get_device_name = staticmethod(lambda *_a, **_k: "cpu")

    def __init__(self) -> None:
        super().__init__("calibrl_verl.cpu.device_module", "torch.cpu with no-op accelerator helpers")

    def __getattr__(self, name: str) -> Any:
        """Anything not overridden above comes from ``torch.cpu`` (is_available, synchronize, Stream...)."""
        return getattr(torch.cpu, name)


DEVICE_MODULE = CpuDeviceModule()


class PlatformCPU(PlatformBase):
    """verl platform for a host without accelerators: torch CPU tensors and gloo collectives."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        """Only an explicit ``VERL_PLATFORM=cpu`` selects this platform; never auto-detected."""
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

    def current_device(self) -> str:  # type: ignore[override]  # see module docstring: a device, not an index
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int | str) -> None:
        """There is one CPU device; verl calls this with the local rank, which is meaningless here."""

    def synchronize(self, device_index: int | None = None) -> None:
        """CPU ops are synchronous."""

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        """verl toggles CUDA ``expandable_segments`` around weight sync; the CPU allocator has no such knob."""

    def empty_cache(self) -> None:
        """Nothing to release: host memory is returned by the allocator itself."""

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        """Ray sets CUDA_VISIBLE_DEVICES for actors holding a logical GPU; verl only reads/logs it."""
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        """No device profiler on CPU."""

    def profiler_stop(self) -> None:
        """No device profiler on CPU."""

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
