"""The shipped GPU recipes train: the 7B CalibRL recipe, the text recipe and the Qwen3-VL recipe each run one step on
CPU through their own YAML (``--config-dir recipes --config-name <recipe>``, as their run scripts compose it), with
only the model, the data, the batch sizes and the CPU placement swapped for the tiny ones, so every key that only the
real recipes set (fsdp2, dynamic batching, gradient checkpointing, validation settings, tensorboard, the model file's
image patch size...) reaches verl's real trainer. The LoRA recipe trains two steps the same way, through verl's LoRA
path on vLLM's CPU build (adapter sync into vLLM's LoRA request path, served by its PunicaWrapperCPU). Opt-in
(``-m families``): four launches, ~10 minutes on 2 cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from calibrl_verl import launch, smoke, tiny

pytestmark = [pytest.mark.smoke, pytest.mark.families]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TIMEOUT = 1200
PROMPTS, ON_POLICY = 4, 4  # the tiny recipe's sizes (smoke.check expects them)

# recipe -> the tiny model family standing in for its model
REAL = {"calibrl_qwen2_5vl_7b": "qwen2_5_vl", "calibrl_qwen2_5_math_7b": "text", "calibrl_qwen3vl_8b": "qwen3_vl"}


def tiny_swaps(assets: Path, run_dir: Path, family: str) -> list[str]:
    """Model, data, sizes and output: nothing else of the recipe changes."""
    model = tiny.text_model_dir(assets) if family == "text" else tiny.model_dir(assets)
    return [
        f"data.train_files=[{tiny.train_files(assets)}]", f"data.val_files=[{tiny.val_files(assets)}]",
        f"actor_rollout_ref.model.path={model}",
        f"data.train_batch_size={PROMPTS}", "data.max_prompt_length=512", "data.max_response_length=48",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS}", f"calibrl.n_onpolicy={ON_POLICY}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=2048",
        "trainer.total_training_steps=1", "trainer.logger=[console,tensorboard,file]",
        f"trainer.experiment_name={run_dir.name}", f"trainer.default_local_dir={run_dir / 'checkpoints'}",
    ]


@pytest.mark.parametrize("recipe", sorted(REAL))
def test_the_real_recipe_trains_one_step_on_the_tiny_model(recipe: str, tmp_path: Path) -> None:
    family = REAL[recipe]
    assets = launch.ensure_assets(tmp_path / "assets", **({} if family == "qwen2_5_vl" else {"family": family}))
    run_dir = tmp_path / recipe
    metrics = launch.start(run_dir, tiny_swaps(assets, run_dir, family), "cpu",
                           recipe=RECIPES / f"{recipe}.yaml").wait(TIMEOUT)
    failed = [text for ok, text in smoke.check(metrics, 1, "calibrl") if not ok]
    assert not failed, failed
    step = launch.read_steps(metrics)[0]
    assert all(math.isfinite(step[k]) for k in ("actor/pg_loss", "calibrl/guide_loss"))
    log = metrics.with_suffix(".log").read_text()
    assert "val-core/" in log  # validation before training ran with the recipe's val_kwargs (greedy)
    assert any((run_dir / "tensorboard_log").rglob("events.out.tfevents.*")) or any(run_dir.rglob("events.out.*"))
    if family == "qwen3_vl":
        assert "'image_patch_size': 16" in log  # the model file's key, which only the Qwen3-VL recipes set


# -- LoRA (recipes/calibrl_qwen2_5vl_7b_lora.yaml) -------------------------------------------------------------------
LORA_RECIPE = "calibrl_qwen2_5vl_7b_lora"
# The recipe's lr (1e-5) moves a fresh adapter (lora_B starts at 0) so little that vLLM serving the bare base model
# would still match the actor; 1e-2 makes the first update move the model far enough for the rollout check to fail.
# Measured on the tiny model (seed-0 assets), step 2's mean |p_rollout - p_actor|: 7.4e-7 and 1.4e-6 in two runs with
# the adapter served, 1.5e-2 (max 0.26) in a control run whose vLLM server generated without the LoRA request (the
# adapter synced but unused; step 1, with lora_B still 0, gave 4e-7 there too). smoke.MAX_ROLLOUT_PROB_DIFF (0.02,
# made for vLLM's random dummy weights) would not tell the two apart; this bound does.
LORA_LR = 1e-2
MAX_LORA_ROLLOUT_DIFF = 1e-3


def _actor_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The actor's model state at a checkpoint (one FSDP2 rank: its DTensors hold the whole tensors)."""
    path = run_dir / "checkpoints" / f"global_step_{step}" / "actor" / "model_world_size_1_rank_0.pt"
    return {k: v.to_local() if hasattr(v, "to_local") else v for k, v in torch.load(path, weights_only=False).items()}


def test_the_lora_recipe_trains_the_adapter_and_vllm_serves_it(tmp_path: Path) -> None:
    """Two steps of the LoRA recipe: vLLM loads the base from the checkpoint files (``load_format=safetensors``) and
    serves the adapter verl syncs after each update. The adapter trains, the base does not move, and the rollout's
    log-probs after the first update agree with the actor's (adapter included)."""
    from transformers import AutoModelForImageTextToText

    assets = launch.ensure_assets(tmp_path / "assets")
    run_dir = tmp_path / LORA_RECIPE
    overrides = tiny_swaps(assets, run_dir, "qwen2_5_vl") + [
        "trainer.total_training_steps=2", "trainer.save_freq=1", f"actor_rollout_ref.actor.optim.lr={LORA_LR}",
        f"calibrl.dump_dir={run_dir / 'dump'}"]
    metrics = launch.start(run_dir, overrides, "cpu", recipe=RECIPES / f"{LORA_RECIPE}.yaml").wait(TIMEOUT)
    failed = [text for ok, text in smoke.check(metrics, 2, "calibrl", dump_dir=run_dir / "dump",
                                               overrides=overrides) if not ok]
    assert not failed, failed
    log = metrics.with_suffix(".log").read_text()
    assert "'lora_rank': 32" in log and "--enable_lora" in log  # the recipe's adapter, and vLLM started with LoRA
    steps = launch.read_steps(metrics)
    # step 2 is rolled out by vLLM after one update of the adapter: only the synced, served adapter matches the actor
    diff = steps[1]["training/rollout_probs_diff_mean"]
    assert diff < MAX_LORA_ROLLOUT_DIFF, f"vLLM's rollout does not follow the updated adapter: {diff}"

    base = AutoModelForImageTextToText.from_pretrained(tiny.model_dir(assets), dtype=torch.float32).state_dict()
    states = [_actor_state(run_dir, step) for step in (1, 2)]
    for state in states:
        frozen = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in state.items()
                  if ".lora_" not in k}
        assert frozen.keys() == base.keys()
        moved = [k for k, v in frozen.items() if not torch.equal(v, base[k])]
        assert not moved, f"base weights changed: {moved}"
    lora_b = sorted(k for k in states[0] if ".lora_B." in k)
    # one adapter pair per linear layer of the 2 language-model layers (q, k, v, o, gate, up, down); none in the ViT
    assert len(lora_b) == 14 and not any("visual" in k for k in states[0] if ".lora_" in k)
    # lora_B starts at zero: non-zero after step 1, and changed again by step 2 (A and B both train)
    assert all(states[0][k].abs().max() > 0 for k in lora_b)
    assert all(not torch.equal(states[0][k], states[1][k]) for k in states[0] if ".lora_" in k)
