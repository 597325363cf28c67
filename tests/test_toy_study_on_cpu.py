"""The toy study's grid and report, without training (the end-to-end fast study is in the smoke tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from calibrl_verl.main_calibrl import prepare_config
from calibrl_verl.reward import compute_score
from calibrl_verl.study import grid, report
from calibrl_verl.tiny.task import make_items, write_parquet

VAL = "val-core/calibrl_tiny/acc/mean@1"


def _write_launch(rdir: Path, n: int, records: list[tuple[int, dict]]) -> None:
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / f"launch{n}.jsonl").write_text("".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in records))


@pytest.mark.parametrize("method", list(grid.METHODS))
def test_every_method_composes_and_validates_as_a_run(method: str, tmp_path: Path) -> None:
    """Each arm's overrides are real keys with allowed values (a typo would only show up an hour into the grid)."""
    cfg = grid.PRESETS["full"]
    overrides = grid.run_overrides(tmp_path, grid.METHODS[method], seed=2, cfg=cfg)
    with initialize_config_module(config_module="calibrl_verl.config", version_base=None):
        config = compose("calibrl_trainer", overrides=overrides)
    calibrl = prepare_config(config)
    assert calibrl.loss_mode == grid.METHODS[method].loss_mode and calibrl.seed == 2
    assert config.data.seed == 2 and config.actor_rollout_ref.rollout.seed == 2 and config.data.shuffle
    assert config.trainer.total_training_steps == cfg.steps and config.trainer.test_freq == cfg.test_freq
    assert config.trainer.default_local_dir == str(grid.run_dir(tmp_path, method, 2) / "checkpoints")
    assert config.data.train_files.endswith("train_weak_expert.parquet") == grid.METHODS[method].weak_expert
    if method == "grpo_entropy":
        assert config.actor_rollout_ref.actor.entropy_coeff == grid.ENTROPY_COEFF
    if method.startswith("calibrl_a"):
        assert calibrl.alpha == float(method.removeprefix("calibrl_a"))
    if method == "calibrl_seqgap":
        assert calibrl.gap == "sequence"


def test_weak_expert_file_makes_half_the_experts_wrong_and_well_formed(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    src = write_parquet(make_items(40, 0, "train"), "train", tmp_path / "train.parquet")
    dst = grid.weak_expert_file(src, tmp_path / "weak.parquet")
    before, after = pq.read_table(src).to_pylist(), pq.read_table(dst).to_pylist()
    graded = [compute_score(r["data_source"], r["solution"], r["reward_model"]["ground_truth"]) for r in after]
    assert sum(g["acc"] for g in graded) == 20  # exactly half still right
    assert all(g["format"] == 1.0 for g in graded)  # the wrong half keeps the think/answer template
    changed = [a["solution"] != b["solution"] for a, b in zip(after, before, strict=True)]
    assert sum(changed) == 20
    assert all({k: v for k, v in a.items() if k != "solution"} == {k: v for k, v in b.items() if k != "solution"}
               for a, b in zip(after, before, strict=True))
    again = grid.weak_expert_file(src, tmp_path / "weak2.parquet")
    assert pq.read_table(again).to_pylist() == after  # the same weak expert for every method and seed
    assert "4" not in grid.wrong_solution("count", "4", random.Random(0)).split("<answer>")[1]


def test_read_run_merges_launches_later_launch_wins(tmp_path: Path) -> None:
    rdir = tmp_path / "runs" / "grpo" / "seed0"
    _write_launch(rdir, 1, [(0, {VAL: 0.3}), (1, {"a": 1.0}), (2, {"a": 2.0})])
    _write_launch(rdir, 2, [(2, {"a": 20.0, VAL: 0.5}), (3, {"a": 3.0})])  # resumed from the step-1 checkpoint
    _write_launch(rdir, 10, [(4, {"a": 4.0})])  # numeric order, not lexicographic
    merged = grid.read_run(rdir)
    assert merged == {0: {VAL: 0.3}, 1: {"a": 1.0}, 2: {"a": 20.0, VAL: 0.5}, 3: {"a": 3.0}, 4: {"a": 4.0}}
    (rdir / "launch3.jsonl").write_text('{"step": 5, "data": {}}\nnot json\n')
    with pytest.raises(ValueError, match=r"launch3.jsonl:2"):
        grid.read_run(rdir)


def test_a_finished_run_is_not_launched_again(tmp_path: Path) -> None:
    cfg = grid.PRESETS["fast"]
    rdir = grid.run_dir(tmp_path, "grpo", 0)
    rdir.mkdir(parents=True)
    done = {"method": "grpo", "seed": 0, "steps": cfg.steps, "launches": 1, "seconds": 12.0}
    (rdir / "done.json").write_text(json.dumps(done))
    assert grid.run_one(tmp_path, grid.METHODS["grpo"], 0, cfg) == done
    assert not list(rdir.glob("launch*"))


def test_cli_presets_overrides_and_passthrough() -> None:
    out, cfg = grid.parse_args(["--out", "x", "--preset", "fast", "--seeds", "3", "4", "--jobs", "2",
                                "actor_rollout_ref.actor.optim.lr=1e-4"])
    assert out == Path("x") and cfg.seeds == (3, 4) and cfg.jobs == 2 and cfg.steps == grid.PRESETS["fast"].steps
    assert cfg.extra == ("actor_rollout_ref.actor.optim.lr=1e-4",)
    with pytest.raises(ValueError, match="unknown method"):
        grid.prepare(Path("unused"), grid.StudyConfig(methods=("grpo", "ppo")))


def _fake_study(root: Path) -> None:
    """Two methods x two seeds with hand-picked numbers."""
    acc = {("grpo", 0): [0.40, 0.45, 0.50], ("grpo", 1): [0.40, 0.40, 0.60],
           ("calibrl_a0.5", 0): [0.40, 0.55, 0.70], ("calibrl_a0.5", 1): [0.40, 0.50, 0.50]}
    for (method, seed), values in acc.items():
        records = []
        for i, value in enumerate(values):
            step = 5 * i
            data = {VAL: value}
            if step:
                data.update({"actor/entropy": 0.1 * seed + 0.01 * step, "critic/score/mean": value})
                if method != "grpo":
                    data.update({"calibrl/guide_loss": 0.01, "calibrl/gate_full_frac": 0.3})
            records.append((step, data))
        rdir = grid.run_dir(root, method, seed)
        _write_launch(rdir, 1, records)
        (rdir / "done.json").write_text(json.dumps({"steps": 10, "seconds": 100.0 + seed}))


def test_report_tabulates_and_plots_mean_and_spread(tmp_path: Path) -> None:
    _fake_study(tmp_path)
    summary = report.write_report(tmp_path, tmp_path / "out", target=0.5)
    grpo, cal = summary["grpo"], summary["calibrl_a0.5"]
    assert grpo["acc_end"] == pytest.approx((0.55, 0.0707106), abs=1e-6)
    assert cal["acc_end"] == pytest.approx((0.60, 0.1414213), abs=1e-6)
    assert cal["acc_best"][0] == pytest.approx(0.60)
    # steps to 50%: grpo seeds reach it at 10 and 10; calibrl at 5 and 5
    assert (grpo["steps_to_target"], grpo["reached_target"]) == (10, 2)
    assert (cal["steps_to_target"], cal["reached_target"]) == (5, 2)
    # entropy at the end: mean of the last END_WINDOW logged steps (5 and 10 here) per seed, then over seeds
    assert grpo["entropy_end"][0] == pytest.approx(((0.05 + 0.10) / 2 + (0.15 + 0.20) / 2) / 2)
    assert grpo["guide_loss_end"] == (None, None) and cal["guide_loss_end"][0] == pytest.approx(0.01)
    assert grpo["seconds_per_run"] == pytest.approx(100.5)
    # paired with GRPO seed by seed: (0.70 - 0.50 + 0.50 - 0.60) / 2 = 0.05
    assert cal["acc_end_vs_baseline"] == pytest.approx((0.05, 0.2121320), abs=1e-6)
    assert grpo["acc_end_vs_baseline"] == (0.0, 0.0)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| GRPO | 2 | 40.0 ± 0.0 | 55.0 ± 7.1 |" in table and "| 10 (2/2) |" in table
    figures = json.loads((tmp_path / "out" / "results.json").read_text())["figures"]
    assert figures == ["accuracy.png", "entropy.png", "guide_loss.png", "gate_fraction.png", "train_reward.png"]
    assert all((tmp_path / "out" / f).stat().st_size > 10_000 for f in figures)


def test_report_default_target_and_clear_errors(tmp_path: Path) -> None:
    _fake_study(tmp_path)
    summary = report.write_report(tmp_path, tmp_path / "out")  # target = step-0 mean (0.40) + 0.10
    assert json.loads((tmp_path / "out" / "results.json").read_text())["target"] == pytest.approx(0.5)
    assert summary["grpo"]["steps_to_target"] == 10
    with pytest.raises(FileNotFoundError, match="no run logged"):
        report.write_report(tmp_path / "empty", tmp_path / "out2")
    _write_launch(grid.run_dir(tmp_path / "noval", "grpo", 0), 1, [(1, {"actor/entropy": 0.2})])
    with pytest.raises(ValueError, match="no validation accuracy"):
        report.write_report(tmp_path / "noval", tmp_path / "out3")
