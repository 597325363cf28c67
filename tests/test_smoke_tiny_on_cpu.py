"""CI smoke tests: the real CalibRL recipe, end to end, on a tiny Qwen2.5-VL on CPU.

verl 0.9.1's real trainer runs here (Ray, TransferQueue, the FSDP2 engine worker, the agent loop with our
expert hook, verl's vLLM rollout server on vLLM's CPU build with weight sync every step, the reward loop,
checkpointing). Only CUDA kernels, NCCL and flash-attn are left to recipes/gpu_smoke.sh.
Select with `-m smoke`, skip with `-m "not smoke"`. About 1.5 minutes per launch on 2 cores; 8 launches.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

from calibrl_verl import smoke
from calibrl_verl.study import grid, report

pytestmark = pytest.mark.smoke
TIMEOUT = 1200
# the resume scenario exercises every piece of CalibRL state: shuffled data order, random expert mixing
# (seeded draws), a GRPO warm-up step, seeded rollouts (calibrl.seeded_rollouts, set by the tiny recipe)
RESUME_OVERRIDES = ["data.shuffle=true", "data.seed=7", "actor_rollout_ref.rollout.seed=7", "calibrl.seed=7",
                    "calibrl.mix_policy=random", "calibrl.mix_ratio=0.5", "calibrl.warmup_grpo_steps=1"]
# metrics that measure time or memory, not the step's computation
UNTIMED = ("timing_s/", "timing_per_token_ms/", "perf/", "actor/perf/")
# rollout-vs-actor diagnostics compare vLLM's log-probs with the actor's: vLLM's numbers depend on which requests
# share a batch, which follows request timing, so they get an absolute tolerance at float-noise scale (values ~1e-7
# to 1e-5, e.g. rollout_corr/chi2_seq -9.2e-6 vs -9.5e-6; stale or unsynced weights give 1e-2 and more)
NOISE_PREFIXES = ("rollout_corr/", "training/rollout_")
NOISE_ABS_TOL = 1e-4
# Everything else must repeat: the trainer sorts each step's rows (trainer.canonical_row_order) before verl balances
# them, so the resumed step has the same micro-batches, summed in the same order. Measured: every step-3 metric
# equal to the last bit. Before the sort, rows followed rollout completion order and Adam amplified the float-order
# noise (actor/grad_norm up to 1.6e-3 relative); a wrong restore (parameters, data order) moves far more.
METRIC_REL_TOL = 1e-6


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


def _assert_checks(metrics, steps, loss_mode):
    results = smoke.check(metrics, steps, loss_mode)
    failed = [text for ok, text in results if not ok]
    assert not failed, failed


def test_fast_toy_study_runs_logs_plots_and_tabulates(out: Path, capfd: pytest.CaptureFixture) -> None:
    """The study's fast preset (GRPO and CalibRL, 2 steps, 1 seed) through the grid, then the report."""
    cfg = grid.PRESETS["fast"]
    records = grid.run_grid(out / "study", cfg)
    assert [r.get("error") for r in records] == [None, None]
    runs = out / "study" / "runs"
    _assert_checks(runs / "grpo" / "seed0" / "launch1.jsonl", 2, "grpo")
    _assert_checks(runs / "calibrl_a0.5" / "seed0" / "launch1.jsonl", 2, "calibrl")
    steps = grid.read_run(runs / "calibrl_a0.5" / "seed0")
    assert sorted(steps) == [0, 1, 2]  # validation before training, then 2 steps (validated at the last)
    assert all(d["calibrl/reward_faults"] == 0 and d["calibrl/skipped_update"] == 0
               for s, d in steps.items() if s > 0)
    summary = report.write_report(out / "study", out / "report")
    for name in ("accuracy", "entropy", "guide_loss", "gate_fraction", "train_reward"):
        assert (out / "report" / f"{name}.png").stat().st_size > 10_000, name
    table = (out / "report" / "results.md").read_text()
    assert "| GRPO | 1 |" in table and "| CalibRL alpha=0.5 | 1 |" in table
    for method in ("grpo", "calibrl_a0.5"):
        assert 0.0 <= summary[method]["acc_end"][0] <= 1.0 and math.isfinite(summary[method]["entropy_end"][0])
    # a second invocation finds the grid finished and launches nothing
    before = (runs / "grpo" / "seed0" / "attempts.json").read_text()
    capfd.readouterr()
    assert grid.run_grid(out / "study", cfg) == records
    # progress in a log (stderr is no terminal here): one plain line per finished run, failures counted
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("[study] ")]
    assert [line.split(" run")[0] for line in lines] == ["[study] 1/2", "[study] 2/2"]
    assert all(line.endswith("failed=0") for line in lines)
    assert (runs / "grpo" / "seed0" / "attempts.json").read_text() == before


def _resume_overrides(assets: Path, rdir: Path, save_freq: int) -> list[str]:
    return (smoke.recipe_overrides(assets, rdir, 3, "calibrl", "cpu", save_freq=save_freq) + RESUME_OVERRIDES
            + [f"trainer.rollout_data_dir={rdir / 'rollouts'}", f"calibrl.dump_dir={rdir / 'dump'}"])


def _leaky(x: float, alpha: float = 0.5) -> float:
    return x if x > 0 else alpha * x


def _check_dump_reproduces_the_step(dump: Path, logged: dict, gap: str) -> int:
    """The step's dump, from its own columns alone, reproduces the advantages and correctness the trainer used
    and the logged guide loss (one mini-batch and one epoch per step: the update's log-probs are the old ones).
    SPEC §1.5-1.7 with the tiny recipe's settings: Dr.GRPO advantages, alpha 0.5, tail zero, sum norm.
    Returns the number of guided rows checked."""
    import pandas as pd

    df = pd.read_parquet(dump)
    assert not df.empty and (df.step == int(dump.stem.split("_")[1])).all()
    onpolicy = df[~df.is_expert]
    for _, group in onpolicy.groupby("uid"):
        spread = group.score.max() > group.score.min()
        want = group.score - group.score.mean() if spread else 0.0 * group.score
        assert group.advantage.to_numpy() == pytest.approx(want.to_numpy(), abs=1e-5)
    assert (df[df.is_expert].advantage == 0).all()
    want_correct = [a > 0 if a == a and a is not None else sc > 0.1 for a, sc in zip(df.acc, df.score, strict=True)]
    assert df.correct.tolist() == want_correct
    experts = {uid: np.asarray(lp, dtype=np.float64) for uid, lp in
               df[df.is_expert].groupby("uid").old_log_probs.first().items()}
    terms, n_tokens = [], 0
    for row in onpolicy.itertuples():
        own = np.maximum(np.asarray(row.old_log_probs, dtype=np.float64), -20.0)
        n_tokens += len(own)
        if not row.guided:
            continue
        expert = np.maximum(experts[row.uid], -20.0)
        sign = 1.0 if row.correct else -1.0
        if gap == "token":  # the expert token at the same position; log-prob 0 past its end (tail zero)
            aligned = np.zeros_like(own)
            aligned[: min(len(own), len(expert))] = expert[: len(own)]
            terms.append(sum(abs(row.advantage) * _leaky(-sign * d) for d in own - aligned))
        else:  # the whole expert, whatever the response's length
            assert row.expert_baseline == pytest.approx(expert.sum(), rel=1e-5)
            terms.append(abs(row.advantage) * _leaky(-sign * (own.sum() - expert.sum())))
    denominator = n_tokens if gap == "token" else len(onpolicy)
    assert logged["calibrl/guide_loss"] == pytest.approx(sum(terms) / denominator, rel=2e-3, abs=1e-5)
    return len(terms)


def _step(path: Path, step: int) -> dict[str, float]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next(r["data"] for r in records if r["step"] == step)


def _rollouts(rdir: Path, step: int) -> list[tuple]:
    """The step's dumped generations as a sorted multiset (uids are random per run, so row order is not)."""
    rows = [json.loads(line) for line in (rdir / "rollouts" / f"{step}.jsonl").read_text().splitlines()]
    return sorted((r["input"], r["output"], r["gts"], round(r["score"], 6)) for r in rows)


def _wait_for_checkpoint(launch: smoke.Launch, ckpt_dir: Path, step: int, timeout: float = 900) -> None:
    tracker = ckpt_dir / "latest_checkpointed_iteration.txt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if tracker.exists() and tracker.read_text().strip() == str(step):
            return
        if launch.proc.poll() is not None:
            pytest.fail(f"the run ended before checkpointing step {step}: {launch.log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    launch.kill()
    pytest.fail(f"no checkpoint of step {step} within {timeout} s")


def test_killed_run_resumes_to_the_same_next_step(out: Path) -> None:
    """Kill a run after step 2's checkpoint, resume it: step 3 equals step 3 of an uninterrupted run."""
    assets = smoke.ensure_assets(out / "assets")
    straight = out / "straight"
    smoke.launch(straight, _resume_overrides(assets, straight, save_freq=3), "cpu", timeout=TIMEOUT)

    killed = out / "killed"
    first = smoke.start(killed, _resume_overrides(assets, killed, save_freq=2), "cpu", name="launch1")
    _wait_for_checkpoint(first, killed / "checkpoints", 2)
    assert first.kill() > 3  # the driver and its Ray cluster (raylet, workers), all SIGKILLed
    assert smoke.tagged_pids(first.tag) == []
    assert not (killed / "checkpoints" / "global_step_3").exists()
    resumed = smoke.launch(killed, _resume_overrides(assets, killed, save_freq=2), "cpu", name="launch2",
                           timeout=TIMEOUT)

    assert [json.loads(line)["step"] for line in resumed.read_text().splitlines() if line.strip()] == [3]
    a, b = _step(straight / "metrics.jsonl", 3), _step(resumed, 3)
    # the CalibRL state: past the warm-up in both, and the same seeded mixing draw
    assert a["calibrl/expert_groups_frac"] == b["calibrl/expert_groups_frac"]
    assert _step(straight / "metrics.jsonl", 1)["calibrl/expert_groups_frac"] == 0.0  # warm-up step
    # the data order and the sampled responses: the same prompts, answers, responses and rewards
    assert _rollouts(killed, 3) == _rollouts(straight, 3)
    # the update itself: loss, guide term, gradient norm, entropy, rewards, lengths, clip fractions, ...
    keys = sorted(k for k in a if not k.startswith(UNTIMED))
    assert keys == sorted(k for k in b if not k.startswith(UNTIMED))
    assert {"actor/pg_loss", "calibrl/guide_loss", "actor/grad_norm", "actor/entropy"} <= set(keys)
    def same(key: str) -> bool:
        return a[key] == pytest.approx(b[key], rel=METRIC_REL_TOL,
                                       abs=NOISE_ABS_TOL if key.startswith(NOISE_PREFIXES) else 1e-6)

    mismatched = {k: (a[k], b[k]) for k in keys if not same(k)}
    assert not mismatched, mismatched
    assert any(k.startswith(NOISE_PREFIXES) for k in keys)  # the diagnostics exist (compared, not skipped)
    assert (killed / "checkpoints" / "global_step_3").is_dir()
    # the per-step dump reproduces each step (token gap; step 1 is the GRPO warm-up: no guided row)
    guided = [_check_dump_reproduces_the_step(straight / "dump" / f"step_{k:06d}.parquet",
                                              _step(straight / "metrics.jsonl", k), "token") for k in (1, 2, 3)]
    assert guided[0] == 0 and sum(guided) > 0


def test_two_data_parallel_ranks_train_calibrl(out: Path) -> None:
    """dp = 2: two FSDP ranks on gloo and two vLLM rollout replicas, so verl's dp > 1 split, padding and balancing
    of the on-policy subset run end to end (about 2.5 minutes and 13 GB on 2 cores); with the sequence gap."""
    two_ranks = ["trainer.n_gpus_per_node=2", "++ray_kwargs.ray_init.num_gpus=2", "trainer.resume_mode=disable",
                 "calibrl.gap=sequence", f"calibrl.dump_dir={out / 'dp2' / 'dump'}"]
    metrics = smoke.run(out / "dp2", 2, "calibrl", "cpu", two_ranks, name="dp2")
    _assert_checks(metrics, 2, "calibrl")
    # the paper's sequence gap against the whole expert, reproduced from the dump across both ranks' rows
    for step in (1, 2):
        assert _check_dump_reproduces_the_step(out / "dp2" / "dump" / f"step_{step:06d}.parquet",
                                               smoke.read_steps(metrics)[step - 1], "sequence") > 0
    log = metrics.with_suffix(".log").read_text()
    assert len(set(re.findall(r"WorkerDict pid=(\d+)", log))) == 2  # two FSDP ranks
    assert len(set(re.findall(r"vLLMHttpServer pid=(\d+)", log))) == 2  # one rollout replica per rank (tp 1)


def _check_inactive_experts(dump_dir: Path, logged: list[dict], lo: float, hi: float) -> int:
    """pass_rate mixing, from the dumps alone: a group uses its expert iff its on-policy pass rate is in [lo, hi];
    an active expert row has LUFFY's A_e, an inactive one A = 0 and is counted in calibrl/inactive_expert_rows (its
    update mask was zeroed: a no-op in the update). Returns the number of inactive expert rows."""
    import pandas as pd

    total = 0
    for step, metrics in enumerate(logged, start=1):
        df = pd.read_parquet(dump_dir / f"step_{step:06d}.parquet")
        inactive = 0
        for _, group in df.groupby("uid"):
            onpolicy, expert = group[~group.is_expert], group[group.is_expert]
            active = lo <= onpolicy.correct.mean() <= hi
            assert len(expert) == 1 and bool(expert.expert_active.iloc[0]) == active
            assert not onpolicy.guided.any() and not onpolicy.expert_active.any()  # no guide term in LUFFY
            if active:  # LUFFY's expert advantage: r_e - mean of the on-policy rewards (Dr.GRPO, no std)
                want = expert.score.iloc[0] - onpolicy.score.mean()
                assert expert.advantage.iloc[0] == pytest.approx(want, abs=1e-5)
            else:
                assert expert.advantage.iloc[0] == 0.0
                inactive += 1
        assert metrics["calibrl/inactive_expert_rows"] == inactive
        total += inactive
    return total


@pytest.mark.parametrize("mode", ["luffy", "rlplus"])
def test_offpolicy_baselines_train_on_expert_tokens_end_to_end(out: Path, mode: str) -> None:
    """LUFFY and RL-PLUS from the same recipe: expert rows stay in the update and train off-policy. LUFFY runs with
    pass_rate mixing (expert only for groups with at most 1 of 4 correct, about half of the groups at the tiny
    model's ~35% accuracy): the experts of the other groups must not reach the update."""
    extra = ["trainer.resume_mode=disable"]
    if mode == "luffy":
        extra += ["calibrl.mix_policy=pass_rate", "calibrl.pass_rate_range=[0.0,0.25]",
                  f"calibrl.dump_dir={out / 'baselines' / 'luffy_dump'}"]
    metrics = smoke.run(out / "baselines", 2, mode, "cpu", extra)
    results = smoke.check(metrics, 2, mode, every_group_guided=mode != "luffy")
    assert not [text for ok, text in results if not ok], results
    steps = smoke.read_steps(metrics)
    if mode == "rlplus":
        assert all(d["calibrl/inactive_expert_rows"] == 0.0 for d in steps)  # mix_policy=always: all active
        return
    inactive = _check_inactive_experts(out / "baselines" / "luffy_dump", steps, 0.0, 0.25)
    # both kinds of group were seen (P(no inactive group in 8) ~ 1%, P(no active one) ~ 0.1% at 35% accuracy)
    assert 0 < inactive < 2 * smoke.PROMPTS_PER_STEP
