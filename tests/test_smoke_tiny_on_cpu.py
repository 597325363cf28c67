"""CI smoke test: the real CalibRL recipe, end to end, on a tiny Qwen2.5-VL on CPU.

verl 0.9.1's real trainer runs here (Ray, TransferQueue, the FSDP2 engine worker, the agent loop with our
expert hook, the reward loop, checkpointing). The rollout engine is transformers `generate` behind verl's
rollout-server interface (calibrl_verl.cpu), NOT vLLM: the vLLM path is covered by recipes/gpu_smoke.sh.
Select with `-m smoke`, skip with `-m "not smoke"`. About 2 minutes per launch on 2 cores.
"""

from __future__ import annotations

import json

import pytest

from calibrl_verl import smoke

pytestmark = pytest.mark.smoke
TIMEOUT = 1200


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


def _assert_checks(metrics, steps, loss_mode):
    results = smoke.check(metrics, steps, loss_mode)
    failed = [text for ok, text in results if not ok]
    assert not failed, failed


def _logged_steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_calibrl_recipe_trains_checkpoints_and_resumes(out):
    metrics = smoke.run(out, steps=2, loss_mode="calibrl", device="cpu", extra=[], timeout=TIMEOUT)
    _assert_checks(metrics, 2, "calibrl")
    assert (out / "calibrl" / "checkpoints" / "global_step_2").is_dir()
    assert (out / "calibrl" / "curves.png").stat().st_size > 10_000
    # a second launch with a longer run picks up verl's checkpoint: it trains step 3 only
    resumed = smoke.run(out, steps=3, loss_mode="calibrl", device="cpu", extra=[], timeout=TIMEOUT, name="resumed")
    assert _logged_steps(resumed) == [3]
    _assert_checks(resumed, 1, "calibrl")
    assert (out / "calibrl" / "checkpoints" / "global_step_3").is_dir()


def test_grpo_baseline_runs_from_the_same_recipe(out):
    metrics = smoke.run(out, steps=2, loss_mode="grpo", device="cpu", extra=[], timeout=TIMEOUT)
    _assert_checks(metrics, 2, "grpo")
