"""The CPU backend (calibrl_verl.cpu) for verl 0.9.1: platform, seams, hf rollout server, loading switch.

Fast unit tests (no Ray, no trainer). Every verl seam in calibrl_verl/cpu/seams.py is exercised twice: in
process, function by function, and in a fresh interpreter through verl's own lookups (get_platform,
initialize_global_process_group_ray, get_rollout_class, get_rollout_replica_class, EngineRegistry). The
fresh interpreter starts with the first test so its verl import overlaps the in-process tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import calibrl_verl.cpu as cpu
from calibrl_verl.cpu import seams
from calibrl_verl.cpu.hf_server import VISION_SPECIAL_TOKENS, GenerationLimits, HFRolloutServer
from calibrl_verl.cpu.platform import PlatformCPU

TEMPERATURE = 0.7
LOGPROB_TOL = 1e-5

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
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import get_rollout_replica_class
out["adapter"] = get_rollout_class("hf", "async").__name__
out["replica"] = get_rollout_replica_class("hf").__name__
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
# tiny assets (calibrl_verl.tiny builders: ~1 s, no downloads)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A random tiny Qwen2 and Qwen2.5-VL sharing one tokenizer, saved as verl would load them."""
    from calibrl_verl.tiny.models import build_processor, build_text_model, build_tokenizer, build_vl_model
    from calibrl_verl.tiny.task import chat_messages, make_items, tokenizer_corpus

    root = tmp_path_factory.mktemp("cpu_backend")
    tokenizer = build_tokenizer(tokenizer_corpus(0, n=40))
    processor = build_processor(tokenizer)
    text_dir, vl_dir = root / "text", root / "vl"
    build_text_model(tokenizer, seed=0).save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    build_vl_model(tokenizer, seed=0).save_pretrained(vl_dir)
    processor.save_pretrained(vl_dir)
    item = make_items(1, 0, "test")[0]
    return SimpleNamespace(
        text_dir=text_dir, vl_dir=vl_dir, tokenizer=tokenizer, processor=processor, item=item, chat=chat_messages
    )


def _server(model_dir: Path, response_length: int = 16) -> HFRolloutServer:
    """The Ray actor class, built in process with the config fields it reads from verl's RolloutConfig."""
    config = SimpleNamespace(prompt_length=256, response_length=response_length, max_model_len=None, seed=0)
    model_config = SimpleNamespace(path=str(model_dir), override_config={}, trust_remote_code=False)
    return HFRolloutServer(config, model_config)


def _text_prompt(tiny: SimpleNamespace) -> list[int]:
    text = tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": tiny.item.question}], add_generation_prompt=True, tokenize=False
    )
    return tiny.tokenizer(text)["input_ids"]


def _sampling(**overrides: Any) -> dict[str, Any]:
    """What verl's agent loop sends (agent_loop_tq.py), plus overrides."""
    params = {"temperature": TEMPERATURE, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    params.update(overrides)
    return params


def _reference_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int], **inputs: Any) -> torch.Tensor:
    """log p(response | prompt) from one full forward pass, at the sampling temperature (what verl's actor does)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1] / TEMPERATURE, dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0]


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


def test_hf_rollout_resolves_through_verl_registries() -> None:
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    from calibrl_verl.cpu.rollout import HFReplica, HFServerAdapter

    seams.register_hf_rollout()
    assert get_rollout_class("hf", "async") is HFServerAdapter
    assert get_rollout_replica_class("hf") is HFReplica


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
        "hf",
        "async",
        1,
        1,
    )
    assert (cfg.actor_rollout_ref.actor.strategy, cfg.actor_rollout_ref.ref.strategy) == ("fsdp2", "fsdp2")
    assert model.override_config.attn_implementation == "sdpa" and model.use_remove_padding is False
    assert cfg.actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype == "fp32"
    assert (cfg.trainer.device, cfg.trainer.n_gpus_per_node, cfg.ray_kwargs.ray_init.num_gpus) == ("cpu", 2, 2)
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.CALIBRL_DEVICE == "cpu"
    assert cfg.transfer_queue.backend.SimpleStorage.num_data_storage_units == 2
    assert (cfg.data.dataloader_num_workers, cfg.reward.num_workers) == (0, 1)
    env = cpu.cpu_env()
    assert env["CALIBRL_DEVICE"] == "cpu" and env["VERL_PLATFORM"] == "cpu" and "CUDA_VISIBLE_DEVICES" not in env


# ---------------------------------------------------------------------------------------------------------
# hf rollout server
# ---------------------------------------------------------------------------------------------------------
def test_generation_limits_follow_verls_vllm_server() -> None:
    limits = GenerationLimits(prompt_length=8, response_length=4)
    assert limits.max_new_tokens(6, {}) == 4
    assert limits.max_new_tokens(10, {}) == 2  # remaining budget
    assert limits.max_new_tokens(6, {"max_tokens": 100}) == 6  # capped by the context
    assert limits.max_new_tokens(6, {"max_new_tokens": 0}) == 1
    with pytest.raises(ValueError, match="no room"):
        limits.max_new_tokens(12, {})


def test_text_generate_logprobs_match_a_forward_pass(tiny: SimpleNamespace) -> None:
    server, prompt = _server(tiny.text_dir), _text_prompt(tiny)
    out = asyncio.run(server.generate(prompt, _sampling(ignore_eos=True), request_id="r0"))
    assert len(out.token_ids) == len(out.log_probs) == 16 and out.stop_reason == "completed"
    ref = _reference_logprobs(server.generator.model, prompt, out.token_ids)
    assert (ref - torch.tensor(out.log_probs)).abs().max().item() < LOGPROB_TOL


def test_vl_generate_logprobs_match_a_forward_pass_with_mrope(tiny: SimpleNamespace) -> None:
    server, processor = _server(tiny.vl_dir), tiny.processor
    text = processor.apply_chat_template(tiny.chat(tiny.item), add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[tiny.item.image], return_tensors="pt")
    prompt = enc["input_ids"][0].tolist()
    out = asyncio.run(
        server.generate(prompt, _sampling(ignore_eos=True), request_id="r1", image_data=[tiny.item.image])
    )
    full = prompt + out.token_ids
    # verl's actor builds M-RoPE positions from every image token of the full sequence
    types = torch.tensor(processor.create_mm_token_type_ids([full]))
    vision = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"], "mm_token_type_ids": types}
    ref = _reference_logprobs(server.generator.model, prompt, out.token_ids, **vision)
    assert (ref - torch.tensor(out.log_probs)).abs().max().item() < LOGPROB_TOL


def test_max_tokens_is_honoured(tiny: SimpleNamespace) -> None:
    server, prompt = _server(tiny.text_dir), _text_prompt(tiny)

    async def run() -> list:
        return [
            await server.generate(prompt, _sampling(max_tokens=3, ignore_eos=True), request_id="a"),
            await server.generate(prompt, _sampling(max_tokens=5), request_id="b"),
            await server.generate(prompt, _sampling(temperature=0, max_tokens=4, logprobs=False), request_id="c"),
        ]

    exact, capped, greedy = asyncio.run(run())
    assert len(exact.token_ids) == 3 and exact.extra_fields["finish_reason"] == "length"
    assert 1 <= len(capped.token_ids) <= 5 and len(capped.log_probs) == len(capped.token_ids)
    assert len(greedy.token_ids) <= 4 and greedy.log_probs is None


def test_vision_special_tokens_are_never_sampled(tiny: SimpleNamespace) -> None:
    server, prompt = _server(tiny.text_dir), _text_prompt(tiny)
    model, generator = server.generator.model, server.generator
    vision_ids = [tiny.tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    assert sorted(generator.suppress_ids) == sorted(vision_ids)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[vision_ids] = 50.0  # vision tokens now dominate every step
    model.lm_head = head
    model.generation_config.suppress_tokens = None  # only the server's own suppression remains
    sampled = generator.generate(prompt, {"temperature": 1.0, "max_tokens": 12, "ignore_eos": True}).token_ids
    assert len(sampled) == 12 and not set(sampled) & set(vision_ids)
    generator.suppress_ids = []  # control: without suppression the same model emits them at once
    assert generator.generate(prompt, {"temperature": 0, "max_tokens": 2}).token_ids[0] in vision_ids


class _RemoteMethod:
    """Stands in for a Ray actor method: ``.remote(...)`` returns an awaitable, as on an async actor."""

    def __init__(self, method: Any) -> None:
        self._method = method

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._method(*args, **kwargs)


def test_update_weights_pushes_actor_weights_into_the_server(tiny: SimpleNamespace) -> None:
    from calibrl_verl.cpu.rollout import HFServerAdapter

    server = _server(tiny.text_dir)
    rollout_cfg = SimpleNamespace(tensor_model_parallel_size=1, data_parallel_size=1, pipeline_model_parallel_size=1)
    adapter = HFServerAdapter(rollout_cfg, SimpleNamespace(path=str(tiny.text_dir)), device_mesh=None)
    adapter._server = SimpleNamespace(update_weights=_RemoteMethod(server.update_weights))
    torch.manual_seed(1)
    pushed = {k: torch.randn_like(v) for k, v in server.generator.model.state_dict().items()}

    async def run() -> dict:
        await adapter.resume(tags=["weights"])
        await adapter.update_weights(iter(pushed.items()), peft_config=None, base_sync_done=True, global_steps=7)
        await adapter.release()
        return await server.named_parameters()

    served = asyncio.run(run())
    assert served.keys() == pushed.keys()
    assert all(torch.equal(served[k], pushed[k]) for k in pushed)
    assert server.global_steps == 7
    with pytest.raises(KeyError, match="not in the model"):
        server.generator.load_weights({"no.such.weight": torch.zeros(1)})


class _FakeActorClass:
    """``ray.remote(cls)`` stand-in: ``.options(...).remote(...)`` builds the actor in process."""

    def __init__(self, cls: type) -> None:
        self.cls, self.options_seen = cls, {}

    def options(self, **options: Any) -> _FakeActorClass:
        self.options_seen.update(options)
        return self

    def remote(self, **kwargs: Any) -> SimpleNamespace:
        instance = self.cls(**kwargs)
        return SimpleNamespace(
            instance=instance,
            **{name: _RemoteMethod(getattr(instance, name)) for name in ("set_global_steps", "sleep", "wake_up")},
        )


def test_replica_launches_the_server_the_adapter_looks_up(
    tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import calibrl_verl.cpu.rollout as rollout

    created: list[_FakeActorClass] = []
    monkeypatch.setattr(rollout.ray, "remote", lambda cls: created.append(_FakeActorClass(cls)) or created[-1])
    config = SimpleNamespace(
        tensor_model_parallel_size=1,
        data_parallel_size=1,
        pipeline_model_parallel_size=1,
        max_num_seqs=8,
        prompt_length=256,
        response_length=8,
        max_model_len=None,
        seed=0,
    )
    model_config = SimpleNamespace(path=str(tiny.text_dir), override_config={}, trust_remote_code=False)
    replica = rollout.HFReplica(replica_rank=1, config=config, model_config=model_config, gpus_per_node=1)

    async def run() -> None:
        await replica.launch_servers()
        await replica.sleep()  # verl's base replica fans lifecycle calls out over `servers`
        await replica.wake_up()

    asyncio.run(run())
    (actor_cls,) = created
    assert actor_cls.cls is HFRolloutServer
    assert actor_cls.options_seen["name"] == rollout.server_actor_name(1) == "hf_server_1_0"
    assert replica.server_handle is replica.servers[0] and replica.server_address == "ray://hf_server_1_0"
    assert isinstance(replica.server_handle.instance, HFRolloutServer)


def test_lifecycle_calls_are_noops(tiny: SimpleNamespace) -> None:
    server = _server(tiny.text_dir)

    async def run() -> dict:
        for call in (server.sleep(), server.wake_up(tags=["weights"]), server.clear_kv_cache()):
            assert await call is None
        await server.release_kv_cache()
        await server.resume_kv_cache()
        await server.resume_generation()
        await server.wait_for_requests_to_drain()
        await server.set_global_steps(3)
        return await server.abort_all_requests(reject_request=True)

    assert asyncio.run(run()) == {"aborted_count": 0, "request_ids": []}
    assert server.global_steps == 3


def test_sampling_is_reproducible_per_request_whatever_the_arrival_order(tiny: SimpleNamespace) -> None:
    """A resumed run must sample what the uninterrupted run sampled: seeds follow the request, not the order."""
    prompt_a = _text_prompt(tiny)
    prompt_b = prompt_a[:-1] + [prompt_a[-2]]  # a different request

    async def serve(order: list[list[int]], version: int) -> list[tuple[int, ...]]:
        server = _server(tiny.text_dir, response_length=12)
        await server.set_global_steps(version)
        outs = [await server.generate(p, _sampling(), request_id=str(i)) for i, p in enumerate(order)]
        return [tuple(o.token_ids) for o in outs]

    first = asyncio.run(serve([prompt_a, prompt_a, prompt_b, prompt_a], version=2))
    shuffled = asyncio.run(serve([prompt_b, prompt_a, prompt_a, prompt_a], version=2))
    # the k-th copy of a request gets the same sample in both orders; different copies differ
    assert first[0:2] + [first[3]] == shuffled[1:4]
    assert first[2] == shuffled[0]
    assert len({first[0], first[1], first[3]}) > 1
    # new weights (the next step) draw new samples for the same request
    assert asyncio.run(serve([prompt_a, prompt_a, prompt_b, prompt_a], version=3)) != first


def test_request_digest_tells_images_apart() -> None:
    from PIL import Image

    from calibrl_verl.cpu.hf_server import request_digest, request_seed

    red, blue = Image.new("RGB", (28, 28), (255, 0, 0)), Image.new("RGB", (28, 28), (0, 0, 255))
    assert request_digest([1, 2, 3], [red]) != request_digest([1, 2, 3], [blue])
    assert request_digest([1, 2, 3], [red]) == request_digest([1, 2, 3], [red.copy()])
    digest = request_digest([1, 2, 3], None)
    seeds = {request_seed(0, 1, digest, 0), request_seed(1, 1, digest, 0), request_seed(0, 2, digest, 0),
             request_seed(0, 1, digest, 1)}
    assert len(seeds) == 4 and request_seed(0, 1, digest, 0) == request_seed(0, 1, digest, 0)


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
        "adapter": "HFServerAdapter",
        "replica": "HFReplica",
        "engine": "FSDPEngineWithLMHead",
        "pin_memory": False,
    }
