"""SFT-then-RL, steps 2 and 3 for real on CPU: recipes/run_sft_qwen2_5vl_7b.sh launches verl 0.9.1's SFT trainer
(torchrun, one process, gloo) on the tiny Qwen2.5-VL and the tiny task's expert traces, and verl's model merger turns
its checkpoint into the Hugging Face directory the GRPO recipe starts from (``actor_rollout_ref.model.path``).

The script runs as shipped, with the tiny model, data and sizes through its environment variables, then
``calibrl_verl.cpu.sft_cpu_overrides()`` and three size overrides appended (a user's overrides win). The merge is
docs/recipes.md's command with the paths swapped. Opt-in (``-m families``): one launch and one merge, ~1.5 minutes
on 2 busy cores (most of it imports).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibrl_verl.cpu import cpu_env, sft_cpu_overrides

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.smoke, pytest.mark.families]

N_ROWS, BATCH = 8, 4  # 2 steps of one epoch; the script saves after each epoch, so global_step_2
SIZES = (f"data.train_batch_size={BATCH}", "optim.lr=1e-3")  # 1e-5 would not show in the merger's bf16 weights
STEP_LINE = re.compile(r"^step:(\d+) - (.*)$", re.M)


def _console_metrics(stdout: str) -> dict[int, dict[str, float]]:
    """verl's console logger: ``step:N - key:value - key:value ...`` per step."""
    steps = {}
    for step, rest in STEP_LINE.findall(stdout):
        steps[int(step)] = {key: float(value) for key, value in (item.split(":", 1) for item in rest.split(" - "))}
    return steps


def _checkpoint_state(folder: Path) -> dict:
    """The FSDP2 checkpoint's full state dict (one rank: each DTensor's local shard is the whole tensor)."""
    import torch

    shard = torch.load(folder / "model_world_size_1_rank_0.pt", map_location="cpu", weights_only=False)
    return {key: (value.to_local() if hasattr(value, "to_local") else value).detach() for key, value in shard.items()}


def _hf_state(path: Path) -> dict:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    return {key: value.detach() for key, value in model.state_dict().items()}


def test_sft_script_trains_on_cpu_and_the_merged_model_is_what_grpo_starts_from(tmp_path: Path) -> None:
    import torch
    from verl.workers.config import HFModelConfig

    from calibrl_verl.data.sft import convert
    from calibrl_verl.plots import read_tensorboard
    from calibrl_verl.tiny.build import build

    build(tmp_path / "tiny", n_train=N_ROWS, n_val=2, warmstart_steps=0, eval_samples=0)
    start = tmp_path / "tiny" / "model"
    stats = convert(tmp_path / "tiny" / "data" / "train.parquet", tmp_path / "data" / "sft.parquet")
    assert stats["rows_written"] == N_ROWS

    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "EXP", "PROJECT", "VAL_FILES", "DRY_RUN")}
    env.update(cpu_env())
    env.update({"HOME": str(tmp_path), "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "N_GPUS_PER_NODE": "1",
                "MODEL_PATH": str(start), "TRAIN_FILES": "data/sft.parquet", "OUTPUT_DIR": "checkpoints/sft"})
    t0 = time.perf_counter()
    launch = subprocess.run(["bash", str(REPO / "recipes" / "run_sft_qwen2_5vl_7b.sh"), *sft_cpu_overrides(), *SIZES],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    launch_s = time.perf_counter() - t0
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-5000:]
    assert "-m verl.trainer.sft_trainer" in launch.stderr and "--nproc_per_node=1" in launch.stderr

    # the loss, logged for both steps on the console and in the script's tensorboard folder, finite
    output = tmp_path / "checkpoints" / "sft"
    console = _console_metrics(launch.stdout)
    assert sorted(console) == [1, 2], launch.stdout[-3000:]
    for metrics in console.values():
        assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
        assert math.isfinite(metrics["train/grad_norm"]) and metrics["train/grad_norm"] > 0
        assert metrics["train/global_tokens"] > 0
    board = read_tensorboard(output / "tensorboard")
    assert [step for step, _ in board["train/loss"]] == [1, 2]
    assert [value for _, value in board["train/loss"]] == pytest.approx([console[1]["train/loss"],
                                                                         console[2]["train/loss"]])

    # the checkpoint: verl's FSDP layout, the tracker, the HF config and processor next to it
    ckpt = output / "global_step_2"
    assert (output / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    for name in ("model_world_size_1_rank_0.pt", "optim_world_size_1_rank_0.pt", "extra_state_world_size_1_rank_0.pt",
                 "fsdp_config.json", "huggingface/config.json", "huggingface/tokenizer.json"):
        assert (ckpt / name).is_file(), name

    # the weights changed: every tensor of the fp32 checkpoint differs from the start model's
    trained, initial = _checkpoint_state(ckpt), _hf_state(start)
    assert trained.keys() == initial.keys() and len(trained) > 50
    assert all(value.dtype == torch.float32 for value in trained.values())
    unchanged = [key for key in trained if torch.equal(trained[key], initial[key])]
    assert unchanged == []

    # the merge, docs/recipes.md's command with the paths swapped (relative, from the working directory)
    t0 = time.perf_counter()
    merge = subprocess.run([sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir",
                            "checkpoints/sft/global_step_2", "--target_dir", "merged/sft"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    merge_s = time.perf_counter() - t0
    assert merge.returncode == 0, merge.stdout[-3000:] + merge.stderr[-3000:]
    merged_dir = tmp_path / "merged" / "sft"
    assert (merged_dir / "model.safetensors").is_file()

    # transformers loads it; its weights are the checkpoint's, in bf16 (verl's merger always writes bf16), and
    # differ from the start model's
    merged = _hf_state(merged_dir)
    assert merged.keys() == trained.keys()
    assert all(value.dtype == torch.bfloat16 for value in merged.values())
    assert all(torch.equal(merged[key], trained[key].bfloat16()) for key in merged)
    moved = [key for key in merged if not torch.equal(merged[key], initial[key].bfloat16())]
    assert len(moved) > len(merged) // 2, f"only {len(moved)} of {len(merged)} tensors differ from the start in bf16"
    assert {"lm_head.weight", "model.language_model.embed_tokens.weight"} <= set(moved)

    # what verl's trainer builds first from actor_rollout_ref.model.path: config, tokenizer, processor
    model = HFModelConfig(path=str(merged_dir), override_config={"attn_implementation": "sdpa"})
    assert model.hf_config.model_type == "qwen2_5_vl" and model.processor is not None
    base = HFModelConfig(path=str(start), override_config={"attn_implementation": "sdpa"})
    chat = [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>How many circles?"}]
    assert model.tokenizer.apply_chat_template(chat) == base.tokenizer.apply_chat_template(chat)
    print(f"\nSFT launch {launch_s:.1f} s, merge {merge_s:.1f} s; loss {console[1]['train/loss']:.4f} -> "
          f"{console[2]['train/loss']:.4f}; {len(moved)}/{len(merged)} tensors differ from the start in bf16")
