"""CI smoke test: the CalibRL recipe, end to end, on a tiny text-only model (no processor, no images) on CPU.

The text-only counterpart of tests/test_smoke_tiny_on_cpu.py: verl 0.9.1's real trainer (Ray, TransferQueue, FSDP2
engine worker, the agent loop with our expert hook, verl's vLLM rollout server on vLLM's CPU build with weight sync,
the reward loop) on the tiny Qwen2ForCausalLM and the synthetic arithmetic task of calibrl_verl.tiny.text_task,
with the smoke recipe pointed at the text model dir and the text rows (``--family text``). One launch of 2 steps,
about 2 minutes on 2 cores (measured 125 s, build included). Select with `-m smoke`, skip with `-m "not smoke"`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from calibrl_verl import launch, smoke, tiny

pytestmark = [pytest.mark.smoke, pytest.mark.families]
STEPS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(out dir, metrics JSONL) of one 2-step CalibRL run on the tiny text model, with the per-step dump."""
    out = tmp_path_factory.mktemp("smoke_text")
    extra = ["trainer.resume_mode=disable", f"calibrl.dump_dir={out / 'dump'}"]
    return out, launch.run(out, STEPS, "calibrl", "cpu", extra, family="text")


def test_calibrl_trains_the_text_model_end_to_end(run: tuple[Path, Path]) -> None:
    """What the VL smoke checks: steps logged, finite non-zero gradients, rollout-vs-actor probabilities within
    0.02 (vLLM starts from dummy weights: only a working weight sync matches), every group guided by its expert,
    guide loss finite and non-zero, gate fraction in (0, 1), expert rows kept out of the update."""
    results = smoke.check(run[1], STEPS, "calibrl")
    failed = [text for ok, text in results if not ok]
    assert not failed, failed


def test_rewards_vary_at_step_one(run: tuple[Path, Path]) -> None:
    """Our reward, from the warm-started model's own samples: some group has a spread of scores at step 1 (so
    GRPO's advantages and CalibRL's guided term are non-zero), and the experts' answers are graded correct."""
    import pandas as pd

    df = pd.read_parquet(run[0] / "dump" / "step_000001.parquet")
    onpolicy = df[~df.is_expert]
    assert len(onpolicy) == launch.PROMPTS_PER_STEP * launch.N_ONPOLICY
    assert (onpolicy.groupby("uid").score.agg(lambda s: s.max() - s.min()) > 0).any()
    assert 0.0 < onpolicy.acc.mean() < 1.0 and (onpolicy.advantage != 0).any()
    assert (df[df.is_expert].acc == 1.0).all() and len(df[df.is_expert]) == launch.PROMPTS_PER_STEP


def test_no_row_had_images(run: tuple[Path, Path]) -> None:
    """The rows were text-only through verl's dataset and agent loop: each step's logged prompt lengths are exactly
    the chat-template token counts of its 4 prompts (shuffle off: rows 4k..4k+3), which an image (vision start /
    pads / end tokens) would have lengthened; the data had no image column or placeholder to begin with, and the
    trainer trained and saved the text model with no processor."""
    from transformers import AutoTokenizer

    out, metrics = run
    assets = out / "assets_text"
    table = pq.read_table(tiny.train_files(assets))
    assert "images" not in table.column_names
    prompts = table.column("prompt").to_pylist()
    assert not any("<image>" in turn["content"] for prompt in prompts for turn in prompt)
    tokenizer = AutoTokenizer.from_pretrained(tiny.text_model_dir(assets))  # as verl loads it: no processor
    lengths = [len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)["input_ids"])
               for p in prompts]  # fmt: skip
    for step, logged in enumerate(launch.read_steps(metrics)):
        want = lengths[step * launch.PROMPTS_PER_STEP : (step + 1) * launch.PROMPTS_PER_STEP]
        got = (logged["prompt_length/min"], logged["prompt_length/max"], logged["prompt_length/mean"])
        assert got == (min(want), max(want), pytest.approx(sum(want) / len(want))), (step + 1, got, want)
    # the trainer's checkpoint: the text model, saved without a processor (verl saves one next to a VL model)
    saved = out / "calibrl" / "checkpoints" / f"global_step_{STEPS}" / "actor" / "huggingface"
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert not list(saved.glob("*processor*")), sorted(p.name for p in saved.iterdir())
