"""CI smoke test of the coverage study: the README's command with its fast preset, end to end (build, a CalibRL
launch on the navigation task through verl's real trainer and vLLM rollout, checkpoint merge, measure, report).
About 2.5 minutes on 2 cores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calibrl_verl.study import coverage, grid

pytestmark = pytest.mark.smoke
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "coverage_study" / "run_study.sh"


def test_fast_coverage_study_trains_measures_and_reports(tmp_path: Path) -> None:
    out, report = tmp_path / "study", tmp_path / "report"
    env = {**os.environ, "PRESET": "fast", "OUT": str(out), "REPORT": str(report), "VENV": sys.prefix}
    subprocess.run(["bash", str(SCRIPT)], env=env, check=True, timeout=1500)
    cfg = coverage.PRESETS["fast"]
    rdir = coverage.run_dir(out, "calibrl_a0.5", 0)
    assert json.loads((rdir / "done.json").read_text())["steps"] == cfg.steps
    steps = grid.read_run(rdir)
    trained = [s for s, d in steps.items() if "actor/pg_loss" in d]
    assert trained == [1, 2]
    for step in trained:  # the gold completion is the expert, graded right by the exact-match reward
        assert steps[step]["calibrl/expert_acc_mean"] == 1.0 and steps[step]["calibrl/expert_groups_frac"] == 1.0
        assert 0 <= steps[step]["training/rollout_probs_diff_mean"] < 0.02  # vLLM got the trained weights
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
    assert set(results["arms"]) == {"calibrl_a0.5"} and results["arms"]["calibrl_a0.5"]["0"]["entropy"]
    assert "CalibRL alpha=0.5" in (report / "results.md").read_text()
