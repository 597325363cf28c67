"""CI smoke tests: the real CalibRL recipe, end to end, on a tiny Qwen2.5-VL on CPU.

verl 0.9.1's real trainer runs here (Ray, TransferQueue, the FSDP2 engine worker, the agent loop with our
expert hook, verl's vLLM rollout server on vLLM's CPU build with weight sync every step, the reward loop,
checkpointing). Only CUDA kernels, NCCL and flash-attn are left to recipes/gpu_smoke.sh.
Select with `-m smoke`, skip with `-m "not smoke"`. About 1.5 minutes per launch on 2 cores; 5 launches
in the default run (the toy study's 2 are opt-in, ``-m studies``; RL-PLUS's is ``-m families``).
The dump checks those launches run (``calibrl_verl.dump_check``) are unit-tested here too, on hand-made dumps
(not marked smoke).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrl_verl import dump_check, launch, smoke, tiny
from calibrl_verl.study import grid, report

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


@pytest.mark.smoke
@pytest.mark.studies
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
    return (launch.recipe_overrides(assets, rdir, 3, "calibrl", "cpu", save_freq=save_freq) + RESUME_OVERRIDES
            + [f"trainer.rollout_data_dir={rdir / 'rollouts'}", f"calibrl.dump_dir={rdir / 'dump'}"])


def _dump(rdir: Path, step: int) -> pd.DataFrame:
    return pd.read_parquet(rdir / "dump" / f"step_{step:06d}.parquet")


def _assert_dumps_reproduce(dump_dir: Path, logged: list[dict], settings: dump_check.RunSettings) -> None:
    """Every logged step recomputed from its dump alone (dump_check): which groups use their expert, correctness,
    advantages, expert baseline, the tokens the update counts and the logged loss terms."""
    failed = [text for ok, text in dump_check.check_run(dump_dir, logged, settings) if not ok]
    assert not failed, failed


def _step(path: Path, step: int) -> dict[str, float]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next(r["data"] for r in records if r["step"] == step)


def _rollouts(rdir: Path, step: int) -> list[tuple]:
    """The step's dumped generations as a sorted multiset (uids are random per run, so row order is not)."""
    rows = [json.loads(line) for line in (rdir / "rollouts" / f"{step}.jsonl").read_text().splitlines()]
    return sorted((r["input"], r["output"], r["gts"], round(r["score"], 6)) for r in rows)


def _wait_for_checkpoint(job: launch.Launch, ckpt_dir: Path, step: int, timeout: float = 900) -> None:
    tracker = ckpt_dir / "latest_checkpointed_iteration.txt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if tracker.exists() and tracker.read_text().strip() == str(step):
            return
        if job.proc.poll() is not None:
            pytest.fail(f"the run ended before checkpointing step {step}: {job.log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    job.kill()
    pytest.fail(f"no checkpoint of step {step} within {timeout} s")


@pytest.mark.smoke
def test_killed_run_resumes_to_the_same_next_step(out: Path) -> None:
    """Kill a run after step 2's checkpoint, resume it: step 3 equals step 3 of an uninterrupted run."""
    assets = launch.ensure_assets(out / "assets")
    straight = out / "straight"
    launch.launch(straight, _resume_overrides(assets, straight, save_freq=3), "cpu", timeout=TIMEOUT)

    killed = out / "killed"
    first = launch.start(killed, _resume_overrides(assets, killed, save_freq=2), "cpu", name="launch1")
    _wait_for_checkpoint(first, killed / "checkpoints", 2)
    assert first.kill() > 3  # the driver and its Ray cluster (raylet, workers), all SIGKILLed
    assert launch.tagged_pids(first.tag) == []
    assert not (killed / "checkpoints" / "global_step_3").exists()
    # the resumed launch logs into the killed launch's metrics file (a copy: launch1.jsonl stays as it was)
    killed_steps = [json.loads(line)["step"] for line in (killed / "launch1.jsonl").read_text().splitlines()]
    shutil.copyfile(killed / "launch1.jsonl", killed / "launch2.jsonl")
    resumed = launch.launch(killed, _resume_overrides(assets, killed, save_freq=2), "cpu", name="launch2",
                            timeout=TIMEOUT)

    # nothing logged before the restart is lost (verl's file logger alone would leave [3]): the killed launch's
    # steps (step 2's line only if the kill came after it, not between step 2's checkpoint and its log line),
    # then the resumed step 3, each once, in order
    assert killed_steps in ([1], [1, 2])
    # the resumed run names the checkpoint it loads (checked complete first: integration/checkpoints.py)
    loaded = f"[calibrl] resuming from {killed / 'checkpoints' / 'global_step_2'}"
    assert loaded in resumed.with_suffix(".log").read_text()
    assert [json.loads(line)["step"] for line in resumed.read_text().splitlines() if line.strip()] == [*killed_steps, 3]
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
    # the per-step dumps reproduce each step (token gap; random mixing from the seeded draws; step 1 is the GRPO
    # warm-up: no expert row, no guided row), the resumed step 3 too
    settings = dump_check.RunSettings.from_overrides(_resume_overrides(assets, straight, save_freq=3))
    _assert_dumps_reproduce(straight / "dump", [_step(straight / "metrics.jsonl", k) for k in (1, 2, 3)], settings)
    _assert_dumps_reproduce(killed / "dump", [b], settings)
    guided = [int(dump_check.expected_rows(_dump(straight, k), k, settings).guided.sum()) for k in (1, 2, 3)]
    assert guided[0] == 0 and sum(guided) > 0


def _two_trace_train_file(assets: Path, path: Path) -> Path:
    """The tiny train set with a list of expert traces per problem: the original and a second, different one (its
    reasoning said twice); every 4th problem keeps one trace, so each step of 4 prompts has one group short of k."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(tiny.train_files(assets)).to_pylist()
    for i, row in enumerate(rows):
        think = re.search(r"<think>(.*)</think>", row["solution"]).group(1)
        second = row["solution"].replace(f"<think>{think}</think>", f"<think>{think} {think}</think>")
        row["solution"] = [row["solution"]] if i % 4 == 0 else [row["solution"], second]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.smoke
def test_two_data_parallel_ranks_train_calibrl_with_two_distinct_experts(out: Path) -> None:
    """dp = 2: two FSDP ranks on gloo and two vLLM rollout replicas, so verl's dp > 1 split, padding and balancing
    of the on-policy subset run end to end (about 2.5 minutes and 13 GB on 2 cores); with the sequence gap and
    calibrl.experts_per_group=2 drawn from a list column (groups of 4 + 2 rows, or 4 + 1 when a problem has one
    trace): the baseline is the mean over a group's experts, reproduced from the dump across both ranks' rows."""
    train = _two_trace_train_file(launch.ensure_assets(out / "assets"), out / "train_two_traces.parquet")
    two_ranks = ["trainer.n_gpus_per_node=2", "++ray_kwargs.ray_init.num_gpus=2", "trainer.resume_mode=disable",
                 "calibrl.gap=sequence", f"calibrl.dump_dir={out / 'dp2' / 'dump'}", f"data.train_files={train}",
                 "calibrl.experts_per_group=2"]
    metrics = launch.run(out / "dp2", 2, "calibrl", "cpu", two_ranks, name="dp2")
    results = smoke.check(metrics, 2, "calibrl", dump_dir=out / "dp2" / "dump", overrides=two_ranks)
    assert not [text for ok, text in results if not ok], results
    assert any("sequence gap" in text for _, text in results)
    assert [d["calibrl/groups_short_of_experts"] for d in launch.read_steps(metrics)] == [1.0, 1.0]
    for step in (1, 2):
        df = pd.read_parquet(out / "dp2" / "dump" / f"step_{step:06d}.parquet")
        experts = df[df.is_expert].groupby("uid").response_ids.agg(list)
        assert sorted(experts.map(len)) == [1, 2, 2, 2]  # one problem with a single trace, three with two
        assert all(len({tuple(r) for r in rows}) == len(rows) for rows in experts)  # the two experts differ
    log = metrics.with_suffix(".log").read_text()
    assert len(set(re.findall(r"WorkerDict pid=(\d+)", log))) == 2  # two FSDP ranks
    assert len(set(re.findall(r"vLLMHttpServer pid=(\d+)", log))) == 2  # one rollout replica per rank (tp 1)


@pytest.mark.smoke
# RL-PLUS is opt-in (-m families) to keep CI under 30 minutes: it shares LUFFY's path but for its weights, which the
# dump check's unit tests below recompute
@pytest.mark.parametrize("mode", ["luffy", pytest.param("rlplus", marks=pytest.mark.families)])
def test_offpolicy_baselines_train_on_expert_tokens_end_to_end(out: Path, mode: str) -> None:
    """LUFFY and RL-PLUS from the same recipe: expert rows stay in the update and train off-policy. LUFFY runs with
    pass_rate mixing (expert only for groups with at most 1 of 4 correct, about half of the groups at the tiny
    model's ~35% accuracy): the experts of the other groups must not reach the update."""
    dump = out / "baselines" / mode / "dump"
    extra = ["trainer.resume_mode=disable", f"calibrl.dump_dir={dump}"]
    if mode == "luffy":
        extra += ["calibrl.mix_policy=pass_rate", "calibrl.pass_rate_range=[0.0,0.25]"]
    metrics = launch.run(out / "baselines", 2, mode, "cpu", extra)
    # every step recomputed from its dump: which groups use their expert (pass rate), A_e on the active experts,
    # the tokens the update counts (inactive experts: none) and the logged expert-token loss, sign and denominator
    results = smoke.check(metrics, 2, mode, every_group_guided=mode != "luffy", dump_dir=dump, overrides=extra)
    assert not [text for ok, text in results if not ok], results
    assert any(f"calibrl/{mode}_expert_loss" in text and "recomputed" in text for _, text in results)
    settings = dump_check.RunSettings.from_overrides([f"calibrl.loss_mode={mode}", *extra])
    wants = [(df, dump_check.expected_rows(df, k, settings))
             for k, df in ((k, pd.read_parquet(dump / f"step_{k:06d}.parquet")) for k in (1, 2))]
    inactive = sum(int((df.is_expert & ~want.expert_active).sum()) for df, want in wants)
    if mode == "rlplus":
        assert inactive == 0  # mix_policy=always: every expert active
        return
    # both kinds of group were seen (P(no inactive group in 8) ~ 1%, P(no active one) ~ 0.1% at 35% accuracy)
    assert 0 < inactive < 2 * launch.PROMPTS_PER_STEP


# -- the dump checks on hand-made dumps (no launch) ------------------------------------------------------------------
# Expected values are worked out by hand below from the rules: A_i = r_i - group mean of on-policy rewards (0 when
# all equal), guide term |A| LeakyReLU_0.5(-s d), LUFFY -A_e p/(p + 0.1), RL-PLUS -A_e p/(0.75 p_old + 0.25) (1-p)^0.5.
LN_HALF, LN_09 = math.log(0.5), math.log(0.9)


def _row(uid: str, expert: bool, lps: list[float], score: float, acc: float, adv: float, *, guided: bool = False,
         baseline: float = 0.0, active: bool = False, tokens: int | None = None, step: int = 2) -> dict:
    return {"step": step, "uid": uid, "is_expert": expert, "response_ids": list(range(len(lps))),
            "old_log_probs": lps, "score": score, "acc": acc, "correct": acc > 0, "advantage": adv, "guided": guided,
            "expert_baseline": baseline, "expert_active": active,
            "update_tokens": len(lps) if tokens is None else tokens}


def _calibrl_dump(b_guided: bool = True) -> pd.DataFrame:
    """Group a: rewards 1.1 / 0.1 (mean 0.6: A = +-0.5), expert [-1.5, -0.5, -1.0] (sum -3). Group b: rewards 0 / 0
    (all equal: A = 0), expert [-2.0]. CalibRL's experts are out of the update: update_tokens 0."""
    return pd.DataFrame([
        _row("a", False, [-1.0, -2.0], 1.1, 1.0, 0.5, guided=True, baseline=-3.0),
        _row("a", False, [-0.5], 0.1, 0.0, -0.5, guided=True, baseline=-3.0),
        _row("a", True, [-1.5, -0.5, -1.0], 1.1, 1.0, 0.0, active=True, tokens=0),
        _row("b", False, [-0.3, -0.2], 0.0, 0.0, 0.0, guided=b_guided, baseline=-2.0 if b_guided else 0.0),
        _row("b", False, [-0.1], 0.0, 0.0, 0.0, guided=b_guided, baseline=-2.0 if b_guided else 0.0),
        _row("b", True, [-2.0], 0.0, 0.0, 0.0, active=True, tokens=0),
    ])


def _failed(results: list[tuple[bool, str]]) -> list[str]:
    return [text for ok, text in results if not ok]


# token gap, tail zero: a0 (s=+1) d = [-1 - -1.5, -2 - -0.5] = [0.5, -1.5], -s d = [-0.5, 1.5] -> 0.5 * (-0.25 + 1.5);
# a1 (s=-1) d = -0.5 - -1.5 = 1, -s d = 1 -> 0.5 * 1; group b: |A| = 0. Over all 6 on-policy tokens.
GUIDE_TOKEN = (0.5 * 1.25 + 0.5 * 1.0) / 6
# sequence gap: a0 d = -3 - -3 = 0; a1 (s=-1) d = -0.5 - -3 = 2.5 -> 0.5 * 2.5. Over the 4 on-policy responses.
GUIDE_SEQUENCE = 0.5 * 2.5 / 4


@pytest.mark.parametrize(("gap", "guide"), [("token", GUIDE_TOKEN), ("sequence", GUIDE_SEQUENCE)])
def test_dump_check_reproduces_a_calibrl_step_and_catches_a_wrong_guide_loss(gap: str, guide: float) -> None:
    settings = dump_check.RunSettings(gap=gap)
    logged = {"calibrl/guide_loss": guide, "calibrl/expert_groups_frac": 1.0, "calibrl/expert_reward_mean": 0.55}
    assert _failed(dump_check.check_step(_calibrl_dump(), logged, 2, settings)) == []
    for wrong in (-guide, guide * 6 / 4 if gap == "token" else guide * 4 / 6):  # sign flip, other denominator
        failed = _failed(dump_check.check_step(_calibrl_dump(), {**logged, "calibrl/guide_loss": wrong}, 2, settings))
        assert len(failed) == 1 and "calibrl/guide_loss" in failed[0]


# calibrl.all_wrong_weight=0.5 adds group b (all wrong, A = 0, s = -1, expert [-2.0]). Token: b0 d = [-0.3 - -2,
# -0.2 - 0 (tail zero)] = [1.7, -0.2] -> 0.5 * (1.7 - 0.1); b1 d = 1.9 -> 0.5 * 1.9. Sequence: b0 d = -0.5 - -2 = 1.5,
# b1 d = 1.9 -> 0.5 * (1.5 + 1.9).
GUIDE_TOKEN_ALL_WRONG = GUIDE_TOKEN + 0.5 * (1.6 + 1.9) / 6
GUIDE_SEQUENCE_ALL_WRONG = GUIDE_SEQUENCE + 0.5 * (1.5 + 1.9) / 4


@pytest.mark.parametrize(("gap", "guide"), [("token", GUIDE_TOKEN_ALL_WRONG), ("sequence", GUIDE_SEQUENCE_ALL_WRONG)])
def test_dump_check_weights_all_wrong_groups_by_all_wrong_weight(gap: str, guide: float) -> None:
    settings = dump_check.RunSettings.from_overrides([f"calibrl.gap={gap}", "calibrl.all_wrong_weight=5e-1"])
    logged = {"calibrl/guide_loss": guide, "calibrl/expert_groups_frac": 1.0, "calibrl/expert_reward_mean": 0.55}
    assert _failed(dump_check.check_step(_calibrl_dump(), logged, 2, settings)) == []
    paper = {**logged, "calibrl/guide_loss": GUIDE_TOKEN if gap == "token" else GUIDE_SEQUENCE}
    assert len(_failed(dump_check.check_step(_calibrl_dump(), paper, 2, settings))) == 1


@pytest.mark.parametrize("gap,guide,baseline", [("token", 0.25, -2.5), ("sequence", 0.625, -2.5)])
def test_dump_check_takes_the_mean_over_a_groups_experts_as_its_baseline(gap: str, guide: float,
                                                                         baseline: float) -> None:
    """experts_per_group=2: experts [-1.5, -0.5, -1.0] (sum -3) and [-0.5, -1.5] (sum -2). Token baseline: -1.0 at
    every position (t0: (-1.5 - 0.5) / 2, t1: (-0.5 - 1.5) / 2, t2: the first expert alone). Row 1 (A +0.5, correct):
    t1 gap -1 gives 0.5 x 1; row 2 (A -0.5, wrong): t0 gap +0.5 gives 0.5 x 0.5; 0.75 over 3 tokens = 0.25. Sequence:
    baseline -2.5; row 1 gap -0.5 -> 0.5 x 0.5, row 2 gap +2.0 -> 0.5 x 2.0; 1.25 over 2 responses = 0.625."""
    rows = pd.DataFrame([
        _row("a", False, [-1.0, -2.0], 1.1, 1.0, 0.5, guided=True, baseline=baseline),
        _row("a", False, [-0.5], 0.1, 0.0, -0.5, guided=True, baseline=baseline),
        _row("a", True, [-1.5, -0.5, -1.0], 1.1, 1.0, 0.0, active=True, tokens=0),
        _row("a", True, [-0.5, -1.5], 1.1, 1.0, 0.0, active=True, tokens=0),
    ])
    settings = dump_check.RunSettings(gap=gap)
    logged = {"calibrl/guide_loss": guide, "calibrl/expert_groups_frac": 1.0, "calibrl/expert_reward_mean": 1.1}
    assert _failed(dump_check.check_step(rows, logged, 2, settings)) == []
    first_only = rows.assign(expert_baseline=[-3.0, -3.0, 0.0, 0.0])  # the first expert alone is not the baseline
    assert any("expert_baseline" in t for t in _failed(dump_check.check_step(first_only, logged, 2, settings)))


def test_dump_check_decides_guided_groups_from_the_mixing_draws_not_from_the_dump() -> None:
    """random mixing, seed 3, step 2: the draws default_rng([3, 2]).random(2) < 0.5 give group a (first in the data
    batch) its expert and not group b. Group b's rewards vary (A = +-0.5), so guiding it would change the loss."""
    assert (np.random.default_rng([3, 2]).random(2) < 0.5).tolist() == [True, False]
    settings = dump_check.RunSettings(mix_policy="random", mix_ratio=0.5, seed=3)
    rows = [_row("a", False, [-1.0, -2.0], 1.1, 1.0, 0.5, guided=True, baseline=-3.0),
            _row("a", False, [-0.5], 0.1, 0.0, -0.5, guided=True, baseline=-3.0),
            _row("a", True, [-1.5, -0.5, -1.0], 1.1, 1.0, 0.0, active=True, tokens=0),
            _row("b", False, [-0.3, -0.2], 1.1, 1.0, 0.5),
            _row("b", False, [-0.1], 0.1, 0.0, -0.5)]
    logged = {"calibrl/guide_loss": GUIDE_TOKEN, "calibrl/expert_groups_frac": 0.5, "calibrl/expert_reward_mean": 1.1}
    assert _failed(dump_check.check_step(pd.DataFrame(rows), logged, 2, settings)) == []
    # a trainer that guided group b and said so in its own columns: caught by the recomputed decision
    lying = pd.DataFrame(rows)
    lying.loc[lying.uid == "b", "guided"] = True
    failed = _failed(dump_check.check_step(lying, logged, 2, settings))
    assert len(failed) == 1 and "guided" in failed[0]
    # the draws are per prompt in data-batch order: with b first, b draws the expert and a does not
    swapped = pd.DataFrame(rows[3:] + rows[:3])
    assert any("expert rows exactly in the groups that draw one" in t for t in _failed(
        dump_check.check_step(swapped, logged, 2, settings)))
    # during the warm-up no group gets its expert
    warm = dataclasses.replace(settings, warmup_grpo_steps=2)
    assert any("expert rows exactly" in t for t in _failed(dump_check.check_step(pd.DataFrame(rows), logged, 2, warm)))


def _offpolicy_dump(inactive_tokens: int = 0) -> pd.DataFrame:
    """pass_rate [0, 0.25], step 1. Group a: 1 of 2 correct (pass rate 0.5: expert inactive, A 0, no update tokens).
    Group b: 0 of 2 correct, rewards 0.1 / 0 (mean 0.05), expert reward 1.1: A_e = 1.05, p = 0.5 and 0.9. No row is
    guided (LUFFY / RL-PLUS have no guide term), so expert_baseline is 0 everywhere."""
    return pd.DataFrame([
        _row("a", False, [-0.2, -0.3], 1.1, 1.0, 0.55, step=1),
        _row("a", False, [-0.4], 0.0, 0.0, -0.55, step=1),
        _row("a", True, [-0.7, -0.1, -0.2], 1.1, 1.0, 0.0, tokens=inactive_tokens, step=1),
        _row("b", False, [-0.6, -0.9], 0.1, 0.0, 0.05, step=1),
        _row("b", False, [-1.2], 0.0, 0.0, -0.05, step=1),
        _row("b", True, [LN_HALF, LN_09], 1.1, 1.0, 1.05, active=True, step=1),
    ])


# the active expert's 2 tokens over every token the update counts: 3 on-policy rows' 2 + 1 + 2 + 1, the expert's 2
OFFPOLICY_LOSS = {"luffy": -1.05 * (0.5 / 0.6 + 0.9 / 1.0) / 8,
                  "rlplus": -1.05 * (0.5 / 0.625 * 0.5 ** 0.5 + 0.9 / 0.925 * 0.1 ** 0.5) / 8}


@pytest.mark.parametrize("mode", ["luffy", "rlplus"])
def test_dump_check_recomputes_the_offpolicy_expert_loss_sign_and_denominator(mode: str) -> None:
    settings = dump_check.RunSettings(loss_mode=mode, mix_policy="pass_rate", pass_rate_range=(0.0, 0.25))
    key, value = f"calibrl/{mode}_expert_loss", OFFPOLICY_LOSS[mode]
    logged = {key: value, "calibrl/expert_groups_frac": 0.5, "calibrl/expert_reward_mean": 1.1,
              "calibrl/inactive_expert_rows": 1.0}
    assert _failed(dump_check.check_step(_offpolicy_dump(), logged, 1, settings)) == []
    # a sign flip; the inactive expert's 3 tokens in the denominator; only the expert's tokens in it
    for wrong in (-value, value * 8 / 11, value * 8 / 2):
        failed = _failed(dump_check.check_step(_offpolicy_dump(), {**logged, key: wrong}, 1, settings))
        assert len(failed) == 1 and key in failed[0], failed
    # a dump that counts the inactive expert's tokens in the update: caught, whatever the logged value
    failed = _failed(dump_check.check_step(_offpolicy_dump(inactive_tokens=3), logged, 1, settings))
    assert any("update_tokens" in t for t in failed)


def test_smoke_check_fails_a_sign_flipped_luffy_loss_from_the_dump(tmp_path: Path) -> None:
    """smoke.check on a hand-made LUFFY run (one step): the logged expert loss must be the dump's, not merely finite
    and non-zero; without a dump the check cannot pass."""
    dump = tmp_path / "dump"
    dump.mkdir()
    _offpolicy_dump().to_parquet(dump / "step_000001.parquet")
    overrides = ["calibrl.mix_policy=pass_rate", "calibrl.pass_rate_range=[0.0,0.25]", f"calibrl.dump_dir={dump}"]
    step = {"training/global_step": 1, "actor/grad_norm": 1.0, "training/rollout_probs_diff_mean": 1e-4,
            "calibrl/expert_groups_frac": 0.5, "calibrl/expert_reward_mean": 1.1, "calibrl/inactive_expert_rows": 1.0}

    def check(loss: float, **kwargs) -> list[str]:
        path = tmp_path / "metrics.jsonl"
        path.write_text(json.dumps({"step": 1, "data": {**step, "calibrl/luffy_expert_loss": loss}}) + "\n")
        return _failed(smoke.check(path, 1, "luffy", every_group_guided=False, **kwargs))

    assert check(OFFPOLICY_LOSS["luffy"], dump_dir=dump, overrides=overrides) == []
    failed = check(-OFFPOLICY_LOSS["luffy"], dump_dir=dump, overrides=overrides)
    assert len(failed) == 1 and "calibrl/luffy_expert_loss" in failed[0]
    assert check(OFFPOLICY_LOSS["luffy"]) != []  # no dump: no recomputation, no pass


def test_smoke_check_counts_the_update_rows_of_the_launchs_batch(tmp_path: Path) -> None:
    """The update trains on prompts x on-policy samples (expert rows excluded): 4 x 4 for calibrl_verl.launch's
    batch, the overrides' when a user changes it (6 prompts x 3 samples = 18)."""
    path = tmp_path / "metrics.jsonl"

    def failed(rows: int, overrides: list[str]) -> list[str]:
        step = {"training/global_step": 1, "actor/grad_norm": 1.0, "training/rollout_probs_diff_mean": 1e-4,
                "calibrl/expert_groups_frac": 1.0,
                "calibrl/expert_reward_mean": 1.0, "calibrl/guide_loss": 0.1, "calibrl/gate_full_frac": 0.5,
                "calibrl/update_rows": rows}
        path.write_text(json.dumps({"step": 1, "data": step}) + "\n")
        return _failed(smoke.check(path, 1, "calibrl", overrides=overrides))

    assert failed(16, []) == []
    assert failed(18, ["data.train_batch_size=6", "calibrl.n_onpolicy=3"]) == []
    wrong = failed(24, ["data.train_batch_size=6", "calibrl.n_onpolicy=3"])  # the expert rows counted too
    assert len(wrong) == 1 and "(= 6 prompts x 3 samples)" in wrong[0], wrong
    assert len(failed(18, [])) == 1


def test_run_settings_come_from_the_launch_overrides() -> None:
    settings = dump_check.RunSettings.from_overrides([
        "calibrl.loss_mode=luffy", "calibrl.mix_policy=pass_rate", "calibrl.pass_rate_range=[0.0,0.25]",
        "calibrl.seed=7", "calibrl.warmup_grpo_steps=1", "calibrl.gap=sequence", "calibrl.dump_dir=/x",
        "trainer.n_gpus_per_node=2", "++ray_kwargs.ray_init.num_gpus=2", "calibrl.seed=8"])
    assert settings == dump_check.RunSettings(loss_mode="luffy", mix_policy="pass_rate", pass_rate_range=(0.0, 0.25),
                                              seed=8, warmup_grpo_steps=1, gap="sequence", dp_ranks=2)
    # random mixing needs the data-batch order, which two ranks' rows do not keep
    with pytest.raises(ValueError, match="prompt_index"):
        dump_check.expected_rows(_calibrl_dump(), 2, dataclasses.replace(settings, mix_policy="random"))
