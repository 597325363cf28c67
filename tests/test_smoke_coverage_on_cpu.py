"""CI smoke test of the coverage study: the README's command with its fast preset, end to end (build, a CalibRL
launch on the navigation task through verl's real trainer and vLLM rollout, checkpoint merge, measure, report).
The launch is the hypothesis arm (calibrl.all_wrong_weight > 0); its per-step dumps are recomputed by the dump check.
About 2.5 minutes on 2 cores; opt-in with the toy study's (``-m studies``), to keep CI under 30 minutes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calibrl_verl import dump_check
from calibrl_verl.study import coverage, grid

pytestmark = [pytest.mark.smoke, pytest.mark.studies]
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "coverage_study" / "run_study.sh"


def test_fast_coverage_study_trains_measures_and_reports(tmp_path: Path) -> None:
    out, report = tmp_path / "study", tmp_path / "report"
    env = {**os.environ, "PRESET": "fast", "OUT": str(out), "REPORT": str(report), "VENV": sys.prefix}
    # one PPO epoch, so the dump's old log-probs are the update's (the dump check's premise)
    extra = [f"calibrl.dump_dir={tmp_path / 'dump'}", "actor_rollout_ref.actor.ppo_epochs=1"]
    subprocess.run(["bash", str(SCRIPT), *extra], env=env, check=True, timeout=1500)
    cfg = coverage.PRESETS["fast"]
    arm = coverage.ARMS["calibrl_allwrong"]
    rdir = coverage.run_dir(out, arm.name, 0)
    assert json.loads((rdir / "done.json").read_text())["steps"] == cfg.steps
    steps = grid.read_run(rdir)
    trained = [s for s, d in steps.items() if "actor/pg_loss" in d]
    assert trained == [1, 2]
    for step in trained:  # the gold completion is the expert, graded right by the exact-match reward
        assert steps[step]["calibrl/expert_acc_mean"] == 1.0 and steps[step]["calibrl/expert_groups_frac"] == 1.0
        assert 0 <= steps[step]["training/rollout_probs_diff_mean"] < 0.02  # vLLM got the trained weights
    # every step recomputed from its dump, with the arm's all-wrong weight; with the paper's weight (0) the logged
    # guide loss no longer matches: all-wrong groups were there and were guided
    overrides = ["calibrl.loss_mode=calibrl", *coverage.run_overrides(out, arm, 0, cfg), *extra]
    logged = [d for s, d in sorted(steps.items()) if s in trained]
    results = dump_check.check_run(tmp_path / "dump", logged, dump_check.RunSettings.from_overrides(overrides))
    assert results and not [text for ok, text in results if not ok], results
    paper = dump_check.RunSettings.from_overrides([*overrides, "calibrl.all_wrong_weight=0"])
    assert any("guide_loss" in text for ok, text in dump_check.check_run(tmp_path / "dump", logged, paper) if not ok)
    start, end = (json.loads(p.read_text()) for p in (out / "start.json", rdir / "measure.json"))
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        for t in map(str, cfg.temperatures):
            logp = end[split][t]["logp"]
            assert len(logp) == n and all(math.isfinite(v) and v < 0 for v in logp)
            assert end[split][t]["pass@k"] == coverage.pass_at_ks(logp, cfg.ks)
    # the merged checkpoint is the trained model, not the start: two updates moved every problem's log p
    assert all(a != b for a, b in zip(end["val"]["1.0"]["logp"], start["val"]["1.0"]["logp"], strict=True))
    assert coverage.main(["--out", str(out), "--preset", "fast"]) == 0  # resumable: nothing is launched again
    assert [p.name for p in rdir.glob("launch*.jsonl")] == ["launch1.jsonl"]
    results = json.loads((report / "results.json").read_text())
    assert set(results["arms"]) == {arm.name} and results["arms"][arm.name]["0"]["entropy"]
    assert arm.label in (report / "results.md").read_text()
