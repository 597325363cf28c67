"""The shipped GPU recipes train: the 7B CalibRL recipe, the text recipe and the Qwen3-VL recipe each run one step on
CPU through their own YAML (``--config-dir recipes --config-name <recipe>``, as their run scripts compose it), with
only the model, the data, the batch sizes and the CPU placement swapped for the tiny ones, so every key that only the
real recipes set (fsdp2, dynamic batching, gradient checkpointing, validation settings, tensorboard, the model file's
image patch size...) reaches verl's real trainer. Opt-in (``-m families``): three launches, ~8 minutes on 2 cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

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
