"""The coverage study's grid, measure and report, without training (its fast preset end to end is a smoke test)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from calibrl_verl.main_calibrl import check_batch_split, prepare_config
from calibrl_verl.study import coverage, coverage_report


@pytest.mark.parametrize("arm", list(coverage.ARMS))
def test_every_arm_composes_validates_and_spends_the_same_budget(arm: str, tmp_path: Path) -> None:
    """Each arm's overrides are real keys; every arm draws ``rows_per_prompt`` rows per prompt (GRPO all on-policy,
    the guided arms one fewer plus the expert row) and passes the launcher's batch check with the CPU placement."""
    from calibrl_verl.cpu import cpu_overrides

    cfg = coverage.PRESETS["full"]
    with initialize_config_module(config_module="calibrl_verl.config", version_base=None):
        config = compose("calibrl_trainer", overrides=[*cpu_overrides(),
                                                       *coverage.run_overrides(tmp_path, coverage.ARMS[arm], 1, cfg)])
    calibrl = prepare_config(config)
    check_batch_split(config, calibrl)
    spec = coverage.ARMS[arm]
    assert calibrl.loss_mode == spec.loss_mode and calibrl.seed == 1 and config.data.seed == 1
    assert config.actor_rollout_ref.rollout.n == cfg.rows_per_prompt
    assert calibrl.n_onpolicy == cfg.rows_per_prompt - (spec.loss_mode != "grpo")
    assert config.data.train_batch_size == cfg.prompts_per_step and config.trainer.total_training_steps == cfg.steps
    # verl needs the rows an update sees to split into whole micro-batches (CalibRL drops its expert rows from it)
    updated = cfg.prompts_per_step * (cfg.rows_per_prompt if spec.loss_mode in ("luffy", "rlplus")
                                      else calibrl.n_onpolicy)
    assert updated % config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu == 0
    actor = config.actor_rollout_ref.actor
    assert (actor.optim.lr, actor.ppo_epochs, actor.kl_loss_type, actor.grad_clip) == (cfg.lr, cfg.ppo_epochs,
                                                                                      "low_var_kl", 0.2)
    assert actor.entropy_coeff == (coverage.ENTROPY_BONUS if arm == "grpo_entropy" else 0.001)
    model = config.actor_rollout_ref.model.path
    assert model.endswith("sft_rl/seed1/model") == spec.sft_on_rl and model.startswith(str(tmp_path))
    assert config.data.train_files == str(tmp_path / "assets" / "data" / "train.parquet")


def test_pass_at_ks_is_the_closed_form() -> None:
    """pass@k of two problems with p = 0.5 and p = 0.01, by hand: (1 - 0.5^k + 1 - 0.99^k) / 2."""
    logp = [math.log(0.5), math.log(0.01)]
    got = coverage.pass_at_ks(logp, (1, 4, 64))
    for k in (1, 4, 64):
        assert got[str(k)] == pytest.approx(100 * ((1 - 0.5**k) + (1 - 0.99**k)) / 2, rel=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.03, 0.5, 0.97, 1.0])
def test_closed_form_pass_at_k_is_what_the_unbiased_estimator_averages_to(p: float) -> None:
    """E over c ~ Binomial(n, p) of Chen et al.'s estimator 1 - C(n-c, k) / C(n, k) is 1 - (1 - p)^k: the closed
    form is the estimator's expectation, not another quantity."""
    from calibrl_verl.eval_metrics import expected_pass_at_k, pass_at_k

    n = 16
    for k in (1, 3, 16):
        mean = sum(math.comb(n, c) * p**c * (1 - p) ** (n - c) * pass_at_k(n, c, k) for c in range(n + 1))
        assert expected_pass_at_k(p, k) == pytest.approx(mean, abs=1e-12) == pytest.approx(1 - (1 - p) ** k)
    assert expected_pass_at_k(1e-20, 64) == pytest.approx(64e-20, rel=1e-9)  # no cancellation for tiny p
    with pytest.raises(ValueError, match="0 <= p <= 1"):
        expected_pass_at_k(1.5, 1)


def _measure(logp_val: list[float], logp_train: list[float], ks: tuple[int, ...]) -> dict:
    return {split: {t: {"logp": lp, "pass@k": coverage.pass_at_ks(lp, ks)} for t in ("0.5", "1.0")}
            for split, lp in (("train", logp_train), ("val", logp_val))}


def test_report_table_pairs_seeds_and_counts_newly_covered(tmp_path: Path) -> None:
    """A study folder written by hand: two arms, two seeds. Coverage at K = 64 is the 1/2 threshold on
    1 - (1 - p)^64, i.e. p >= 1 - 0.5^(1/64) = 0.0108."""
    ks = (1, 64)
    (tmp_path / "study.json").write_text(json.dumps({"ks": list(ks)}))
    start = _measure([math.log(0.001), math.log(0.05), math.log(0.3)], [math.log(0.1)], ks)
    (tmp_path / "start.json").write_text(json.dumps(start))
    ends = {("grpo", 0): [0.001, 0.2, 0.9], ("grpo", 1): [0.001, 0.001, 0.9],
            ("luffy", 0): [0.02, 0.2, 0.9], ("luffy", 1): [0.06, 0.3, 0.5]}
    for (arm, seed), probs in ends.items():
        rdir = coverage.run_dir(tmp_path, arm, seed)
        rdir.mkdir(parents=True)
        (rdir / "measure.json").write_text(json.dumps(_measure([math.log(p) for p in probs], [math.log(0.5)], ks)))
        def guide(step: int, arm: str = arm, seed: int = seed) -> dict:  # a guidance metric, logged by one arm
            return {"calibrl/guide_loss": -0.01 * step * (seed + 1)} if arm == "luffy" else {}

        (rdir / "launch1.jsonl").write_text("".join(
            json.dumps({"step": s, "data": {"actor/entropy": 1.0 / s, "val-core/calibrl_wall/acc/mean@1": 0.1 * s,
                                            **guide(s)}}) + "\n" for s in (1, 2)))
    results = coverage_report.collect(tmp_path)
    grpo, luffy = results["arms"]["grpo"], results["arms"]["luffy"]
    assert [grpo[s]["newly_covered"] for s in ("0", "1")] == [0, 0] and grpo["1"]["lost"] == 1
    assert [luffy[s]["newly_covered"] for s in ("0", "1")] == [1, 1]
    assert luffy["0"]["entropy"] == {1: 1.0, 2: 0.5} and luffy["0"]["val_greedy"] == {1: 0.1, 2: 0.2}
    text = coverage_report.table(results)
    row = next(line for line in text.splitlines() if line.startswith("| LUFFY"))
    # test pass@1 minus GRPO's, same seed: seed 0 (0.02 + 0.2 + 0.9 - 0.001 - 0.2 - 0.9) / 3, seed 1 likewise
    diffs = [100 * (0.02 - 0.001) / 3, 100 * (0.06 + 0.3 + 0.5 - 0.001 - 0.001 - 0.9) / 3]
    mean, spread = sum(diffs) / 2, abs(diffs[0] - diffs[1]) / math.sqrt(2)
    assert f"{mean:.1f} ± {spread:.1f}" in row
    assert "| 0.500 ± 0.000 |" in row  # entropy at the last step, both seeds
    assert "| 1.0 ± 0.0 (lost 0.0 ± 0.0) |" in row  # newly covered and lost test problems
    # guidance: guide loss, mean over steps 1-2, is -0.015 (seed 0) and -0.03 (seed 1); GRPO logged none
    guide = next(line for line in text.split("\n\n")[1].splitlines() if line.startswith("| LUFFY"))
    assert guide == f"| LUFFY | n/a | n/a | {(-0.015 - 0.03) / 2:.3f} ± {0.015 / math.sqrt(2):.3f} | n/a |"
    assert "| GRPO | n/a | n/a | n/a | n/a |" in text
    coverage_report.main(["--study", str(tmp_path), "--out", str(tmp_path / "report")])
    for name in ("results.json", "results.md", "pass_at_k.png", "temperature.png", "entropy.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name


def test_report_without_measured_runs_says_what_to_run(tmp_path: Path) -> None:
    (tmp_path / "study.json").write_text(json.dumps({"ks": [1]}))
    (tmp_path / "start.json").write_text(json.dumps(_measure([0.0], [0.0], (1,))))
    with pytest.raises(FileNotFoundError, match="calibrl_verl.study.coverage"):
        coverage_report.collect(tmp_path)


def test_cli_presets_and_passthrough() -> None:
    out, cfg = coverage.parse_args(["actor_rollout_ref.actor.optim.lr=3e-5", "--out", "x", "--preset", "fast",
                                    "--arms", "grpo", "luffy", "--seeds", "4"])
    assert out == Path("x") and cfg.arms == ("grpo", "luffy") and cfg.seeds == (4,)
    assert cfg.steps == coverage.PRESETS["fast"].steps and cfg.extra == ("actor_rollout_ref.actor.optim.lr=3e-5",)
    with pytest.raises(ValueError, match="unknown arm"):
        coverage.prepare(Path("x"), coverage.CoverageConfig(arms=("nope",)))


def test_sft_on_rl_fits_the_rl_splits_gold_completions(tmp_path: Path) -> None:
    """The SFT-then-RL arm's start model: fine-tuned on the RL split's gold completions, it gives them more
    probability than the shared SFT model did, and it is built once per seed."""
    from calibrl_verl import tiny
    from calibrl_verl.tiny.build import build

    cfg = coverage.CoverageConfig(n_train=8, n_val=4, n_sft=256, sft_rl_epochs=4, sft_rl_lr=1e-3, temperatures=(1.0,),
                                  ks=(1,))
    build(coverage.assets_dir(tmp_path), n_train=cfg.n_train, n_val=cfg.n_val, n_warmstart=cfg.n_sft, eval_samples=0,
          family="wall")
    target = coverage.sft_on_rl(tmp_path, 0, cfg)
    assert target == coverage.start_model(tmp_path, coverage.ARMS["sft_then_grpo"], 0)
    before = coverage.measure(tiny.text_model_dir(coverage.assets_dir(tmp_path)), coverage.assets_dir(tmp_path), cfg)
    after = coverage.measure(target, coverage.assets_dir(tmp_path), cfg)
    gain = [a - b for a, b in zip(after["train"]["1.0"]["logp"], before["train"]["1.0"]["logp"], strict=True)]
    assert min(gain) > 0, gain
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert coverage.sft_on_rl(tmp_path, 0, cfg) == target and (target / "model.safetensors").stat().st_mtime_ns == stamp


def test_study_json_accumulates_the_parts_that_were_run(tmp_path: Path) -> None:
    path = tmp_path / "study.json"
    coverage.record_config(path, coverage.CoverageConfig(arms=("grpo",), seeds=(0,)))
    coverage.record_config(path, coverage.CoverageConfig(arms=("calibrl_a0.5", "grpo"), seeds=(1,)))
    record = json.loads(path.read_text())
    assert record["arms"] == ["grpo", "calibrl_a0.5"] and record["seeds"] == [0, 1] and record["steps"] == 60
