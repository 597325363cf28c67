"""CI smoke test: CalibRL's recipe end to end on a tiny Qwen3-VL on CPU (the recipes/*_qwen3vl_* model family).

The same launch as tests/test_smoke_tiny_on_cpu.py (verl 0.9.1's real trainer, FSDP2 engine, agent loop with the
expert hook, verl's vLLM rollout server on vLLM's CPU build with weight sync, reward loop), with the tiny model of
``python -m calibrl_verl.tiny.build --family qwen3_vl``: verl's Qwen3-VL forward patch on the actor, vLLM's
``Qwen3VLForConditionalGeneration`` (16-px patches, interleaved M-RoPE, DeepStack) on the rollout.
Select with `-m smoke`. One launch, 2 steps: about 2 minutes on 2 cores (plus a 20 s build).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from calibrl_verl import launch, smoke

pytestmark = [pytest.mark.smoke, pytest.mark.families]
TIMEOUT = 1200
STEPS = 2


def test_calibrl_trains_a_tiny_qwen3_vl(tmp_path: Path) -> None:
    out = tmp_path / "qwen3vl"
    dump = out / "dump"
    metrics = launch.run(out, STEPS, "calibrl", "cpu", ["trainer.resume_mode=disable", f"calibrl.dump_dir={dump}"],
                         timeout=TIMEOUT, family="qwen3_vl")  # fmt: skip
    # steps logged, finite non-zero gradients, the guide term active with a gate inside (0, 1), expert rows out of
    # the update, and weight sync: vLLM starts from random weights, so its probabilities match the actor's only
    # if every step's sync of the Qwen3-VL weights (vision tower and DeepStack mergers included) reached it
    failed = [text for ok, text in smoke.check(metrics, STEPS, "calibrl") if not ok]
    assert not failed, failed
    steps = launch.read_steps(metrics)
    for key in ("actor/pg_loss", "calibrl/guide_loss", "actor/entropy"):
        assert all(math.isfinite(d[key]) for d in steps), key
    log = metrics.with_suffix(".log").read_text()
    assert "Monkey patch Qwen3VLForConditionalGeneration model forward" in log  # verl's Qwen3-VL path on the actor
    assert "'image_patch_size': 16" in log  # the dataset measures prompts with Qwen3-VL's patches (models/qwen3vl_*)
    # rewards vary within a group (GRPO's advantages are not all zero), read from the step dumps
    varied = 0
    for step in range(1, STEPS + 1):
        df = pd.read_parquet(dump / f"step_{step:06d}.parquet")
        onpolicy = df[~df.is_expert]
        assert df.is_expert.sum() == launch.PROMPTS_PER_STEP and onpolicy.guided.any()
        varied += int((onpolicy.groupby("uid").score.nunique() > 1).sum())
        assert (onpolicy.advantage != 0).any() == ((onpolicy.groupby("uid").score.nunique() > 1).any())
    assert varied > 0
