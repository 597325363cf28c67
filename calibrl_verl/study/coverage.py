"""The coverage study: does expert guidance get past the coverage wall that GRPO hits on the navigation task?

    python -m calibrl_verl.study.coverage --out outputs/coverage_study [--preset full|fast] [--arms ...]
                                          [--seeds ...] [--steps N] [hydra overrides for every run]

The task, model and SFT warm-start are ``calibrl_verl.tiny.wall_task`` (arXiv 2505.22756's synthetic v5 task).
Every arm starts from the same SFT model and trains with verl's real trainer on the CPU backend
(``calibrl_verl.launch``), with the same rollout budget per prompt (``rows_per_prompt``: GRPO samples
them all, the guided arms sample one fewer and add the gold completion as the expert row). After a run, its last
checkpoint is merged to a Hugging Face model with ``verl.model_merger`` and measured.

Measure: the task has one correct completion per problem, so the probability that a sample at temperature T is
correct is the model's probability of that completion, ``p_T`` (``wall_task.gold_logprobs``). pass@k is then
1 - (1 - p_T)^k exactly (``eval_metrics.expected_pass_at_k``), for every k at once and without sampling noise:
pass@1 is the mean of p_T, coverage@K the mean of pass@K. ``measure.json`` keeps every problem's log p_T, so any
figure can be recomputed. Token entropy over training is verl's ``actor/entropy``.

Layout under ``--out``::

    assets/                       the task, the SFT model (built once, ``tiny.build --family wall``)
    start.json                    the SFT model's measure
    sft_rl/seed<k>/model          the SFT-then-RL arm's start: the SFT model fine-tuned on the RL split's gold
    runs/<arm>/seed<k>/           launch logs, checkpoints, done.json, final_model/, measure.json

Resumable like the toy study: a run with ``done.json`` and ``measure.json`` is skipped, an unfinished one resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from calibrl_verl import launch, tiny
from calibrl_verl.eval_metrics import expected_pass_at_k
from calibrl_verl.study.grid import resumable_launch


@dataclass(frozen=True)
class Arm:
    """One arm: a loss mode and its overrides; ``sft_on_rl`` starts from the SFT model fine-tuned on the RL split's
    gold completions (the SFT-then-RL paradigm)."""

    name: str
    label: str
    loss_mode: str
    overrides: tuple[str, ...] = ()
    sft_on_rl: bool = False


ENTROPY_BONUS = 0.01
ALL_WRONG_WEIGHT = 1.0  # the largest |A| the paper's weighting gives (a lone correct or wrong answer)
ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("grpo", "GRPO", "grpo"),
    Arm("grpo_entropy", f"GRPO + entropy bonus {ENTROPY_BONUS}", "grpo",
        (f"actor_rollout_ref.actor.entropy_coeff={ENTROPY_BONUS}",)),
    Arm("calibrl_a0.5", "CalibRL alpha=0.5", "calibrl", ("calibrl.alpha=0.5",)),
    Arm("calibrl_a0.3", "CalibRL alpha=0.3", "calibrl", ("calibrl.alpha=0.3",)),
    Arm("calibrl_a0.8", "CalibRL alpha=0.8", "calibrl", ("calibrl.alpha=0.8",)),
    Arm("calibrl_seqgap", "CalibRL sequence gap", "calibrl", ("calibrl.gap=sequence",)),
    Arm("luffy", "LUFFY", "luffy"),
    # the hypothesis arm: CalibRL with guidance on all-wrong groups, where the paper's |A| = 0 switches it off
    Arm("calibrl_allwrong", f"CalibRL alpha=0.5, all-wrong weight {ALL_WRONG_WEIGHT}", "calibrl",
        ("calibrl.alpha=0.5", f"calibrl.all_wrong_weight={ALL_WRONG_WEIGHT}")),
    Arm("sft_then_grpo", "SFT on the RL split, then GRPO", "grpo", sft_on_rl=True),
)}
BASELINE = "grpo"


@dataclass(frozen=True)
class CoverageConfig:
    """The grid, the shared RL recipe and the measure. The RL recipe is the paper's (clip 0.2, entropy 0.001, KL
    0.001 low-var, grad clip 0.2, T = 1) sized for 2 cores: fewer prompts per step, fewer PPO epochs, a larger lr."""

    steps: int = 60
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ("grpo", "grpo_entropy", "calibrl_a0.5", "calibrl_seqgap", "luffy", "sft_then_grpo")
    rows_per_prompt: int = 8  # the paper's n = 8; guided arms: 7 samples + the expert row
    prompts_per_step: int = 16
    lr: float = 1e-4
    ppo_epochs: int = 2
    n_train: int = 128  # the paper's RL split
    n_val: int = 256  # held-out test problems
    n_sft: int = 200_000  # the paper's SFT split (one epoch at batch 64)
    sft_rl_epochs: int = 4  # the SFT-then-RL arm: epochs over the RL split's gold completions
    sft_rl_lr: float = 1e-4
    temperatures: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5)
    ks: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)
    test_freq: int = 10
    jobs: int = 1
    timeout: int = 3600
    extra: tuple[str, ...] = field(default=())


PRESETS: dict[str, CoverageConfig] = {
    "full": CoverageConfig(),
    # the CI version: the pipeline end to end (build, a guided launch, merge, measure, report), not the science; one
    # launch (~2 minutes) to keep CI short. The hypothesis arm: its all-wrong groups (nearly all, at this SFT size)
    # exercise calibrl.all_wrong_weight through verl's trainer
    "fast": CoverageConfig(steps=2, seeds=(0,), arms=("calibrl_allwrong",), prompts_per_step=4,
                           rows_per_prompt=4, n_train=8, n_val=8, n_sft=640, sft_rl_epochs=1, test_freq=2,
                           ks=(1, 4, 64)),
}


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / arm / f"seed{seed}"


def assets_dir(out: Path) -> Path:
    return out / "assets"


def start_model(out: Path, arm: Arm, seed: int) -> Path:
    """The model a run starts from: the shared SFT model, or this seed's SFT-on-RL model."""
    return out / "sft_rl" / f"seed{seed}" / "model" if arm.sft_on_rl else tiny.text_model_dir(assets_dir(out))


def run_overrides(out: Path, arm: Arm, seed: int, cfg: CoverageConfig) -> list[str]:
    """The tiny recipe on the wall family, then the study's RL recipe, budget and seed, then the arm."""
    rdir = run_dir(out, arm.name, seed)
    args = launch.recipe_overrides(assets_dir(out), rdir, cfg.steps, arm.loss_mode, "cpu", family="wall")
    on_policy = cfg.rows_per_prompt - (0 if arm.loss_mode == "grpo" else 1)
    rows = cfg.prompts_per_step * cfg.rows_per_prompt
    # one micro-batch per update: the rows the update sees (CalibRL leaves its expert rows out of it, LUFFY and
    # RL-PLUS train on them), which verl requires to be a multiple of the micro-batch
    updated = cfg.prompts_per_step * (cfg.rows_per_prompt if arm.loss_mode in ("luffy", "rlplus") else on_policy)
    args += [
        f"actor_rollout_ref.model.path={start_model(out, arm, seed)}",
        f"data.train_batch_size={cfg.prompts_per_step}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={cfg.prompts_per_step}",
        f"calibrl.n_onpolicy={on_policy}", f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={updated}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={rows}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={rows}",
        f"actor_rollout_ref.actor.optim.lr={cfg.lr}", f"actor_rollout_ref.actor.ppo_epochs={cfg.ppo_epochs}",
        "actor_rollout_ref.actor.clip_ratio_low=0.2", "actor_rollout_ref.actor.clip_ratio_high=0.2",
        "actor_rollout_ref.actor.entropy_coeff=0.001", "actor_rollout_ref.actor.use_kl_loss=true",
        "actor_rollout_ref.actor.kl_loss_coef=0.001", "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        "actor_rollout_ref.actor.grad_clip=0.2",
        "data.shuffle=true", f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}", f"calibrl.seed={seed}",
        f"trainer.experiment_name={arm.name}_seed{seed}", "trainer.project_name=calibrl_coverage_study",
        f"trainer.test_freq={cfg.test_freq}", "trainer.val_before_train=true",
    ]
    return args + list(arm.overrides) + list(cfg.extra)


# ------------------------------------------------------------------------------------------------------ measure


def problems_of(assets: Path, split: str) -> tuple[list[str], list[str]]:
    """(prompts, gold completions) of a built split, read back from its parquet (what the runs trained on)."""
    import pyarrow.parquet as pq

    path = tiny.train_files(assets) if split == "train" else tiny.val_files(assets)
    rows = pq.read_table(path, columns=["prompt", "reward_model"]).to_pylist()
    return [r["prompt"][0]["content"] for r in rows], [r["reward_model"]["ground_truth"] for r in rows]


def measure(model_dir: Path, assets: Path, cfg: CoverageConfig) -> dict[str, Any]:
    """Per split and temperature: every problem's log p_T(gold), and pass@k for ``cfg.ks`` (percent)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrl_verl.tiny import wall_task
    from calibrl_verl.tiny.warmstart import torch_threads

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result: dict[str, Any] = {"model": str(model_dir)}
    with torch_threads(2):
        for split in ("train", "val"):
            prompts, golds = problems_of(assets, split)
            problems = [wall_task.TextProblem(p, g) for p, g in zip(prompts, golds, strict=True)]
            result[split] = {}
            for t in cfg.temperatures:
                logp = wall_task.gold_logprobs(model, tokenizer, problems, t).tolist()
                result[split][str(t)] = {"logp": logp, "pass@k": pass_at_ks(logp, cfg.ks)}
    return result


def pass_at_ks(logp: list[float], ks: tuple[int, ...]) -> dict[str, float]:
    """Mean over problems of 1 - (1 - p)^k, in percent, for each k."""
    import math

    probs = [math.exp(v) for v in logp]
    return {str(k): 100.0 * sum(expected_pass_at_k(p, k) for p in probs) / max(1, len(probs)) for k in ks}


def merge_checkpoint(rdir: Path, steps: int) -> Path:
    """``verl.model_merger``: the run's last FSDP checkpoint as a Hugging Face model in ``rdir/final_model``."""
    target = rdir / "final_model"
    if not (target / "config.json").exists():
        actor = rdir / "checkpoints" / f"global_step_{steps}" / "actor"
        subprocess.run([sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir",
                        str(actor), "--target_dir", str(target)], check=True, stdout=subprocess.DEVNULL)
    return target


# ---------------------------------------------------------------------------------------------------------- grid


def prepare(out: Path, cfg: CoverageConfig) -> None:
    """Build the task and SFT model once, measure the SFT model, and build each seed's SFT-on-RL model."""
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; known: {sorted(ARMS)}")
    # 2 torch threads: the SFT is 3125 steps (~30 minutes on 2 cores); the weights depend on the seed and the
    # thread count, both fixed here
    launch.ensure_assets(assets_dir(out), family="wall", n_train=cfg.n_train, n_val=cfg.n_val,
                         warmstart_items=cfg.n_sft, eval_samples=0, threads=2)
    if not (out / "start.json").exists():
        (out / "start.json").write_text(json.dumps(measure(tiny.text_model_dir(assets_dir(out)), assets_dir(out),
                                                           cfg)))
    if any(ARMS[a].sft_on_rl for a in cfg.arms):
        for seed in cfg.seeds:
            sft_on_rl(out, seed, cfg)
    record_config(out / "study.json", cfg)


def record_config(path: Path, cfg: CoverageConfig) -> None:
    """Write the study's config; arms and seeds accumulate over invocations (``--arms``/``--seeds`` run a part)."""
    record = asdict(cfg)
    if path.exists():
        earlier = json.loads(path.read_text())
        for key in ("arms", "seeds"):
            record[key] = [*earlier.get(key, []), *(v for v in record[key] if v not in earlier.get(key, []))]
    path.write_text(json.dumps(record, indent=2))


def sft_on_rl(out: Path, seed: int, cfg: CoverageConfig) -> Path:
    """The SFT model fine-tuned on the RL split's gold completions (``cfg.sft_rl_epochs`` epochs, the SFT recipe
    at ``cfg.sft_rl_lr``, batch 16), saved once per seed."""
    target = out / "sft_rl" / f"seed{seed}" / "model"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrl_verl.tiny import wall_task
    from calibrl_verl.tiny.warmstart import torch_threads

    source = tiny.text_model_dir(assets_dir(out))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    prompts, golds = problems_of(assets_dir(out), "train")
    problems = [wall_task.TextProblem(p, g) for p, g in zip(prompts, golds, strict=True)] * cfg.sft_rl_epochs
    with torch_threads(2):
        wall_task.sft(model, tokenizer, problems, seed, batch_size=16, lr=cfg.sft_rl_lr)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def run_arm(out: Path, arm: Arm, seed: int, cfg: CoverageConfig) -> dict[str, Any]:
    """Train, merge, measure one (arm, seed); returns its record (``error`` on a failure)."""
    rdir = run_dir(out, arm.name, seed)
    record = resumable_launch(rdir, run_overrides(out, arm, seed, cfg), {"arm": arm.name, "seed": seed},
                              cfg.steps, cfg.timeout)
    if "error" in record:
        return record
    path = rdir / "measure.json"
    if not path.exists():
        try:
            path.write_text(json.dumps(measure(merge_checkpoint(rdir, cfg.steps), assets_dir(out), cfg)))
        except Exception as err:  # noqa: BLE001 - recorded; the grid goes on
            return {**record, "error": f"measure: {type(err).__name__}: {err}"}
    return record


def run_grid(out: Path, cfg: CoverageConfig) -> list[dict[str, Any]]:
    """Every (seed, arm), seed-major, one launch at a time (a launch peaks near 13.5 GB on CPU)."""
    out = out.resolve()
    prepare(out, cfg)
    return [run_arm(out, ARMS[a], seed, cfg) for seed in cfg.seeds for a in cfg.arms]


def parse_args(argv: list[str] | None = None) -> tuple[Path, CoverageConfig]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/coverage_study"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--arms", nargs="+", help=f"subset of {list(ARMS)}")
    args, extra = parser.parse_known_args(argv)
    cfg = PRESETS[args.preset]
    changes = {"steps": args.steps, "seeds": tuple(args.seeds or ()) or None, "arms": tuple(args.arms or ()) or None}
    return args.out, replace(cfg, **{k: v for k, v in changes.items() if v is not None}, extra=tuple(extra))


def main(argv: list[str] | None = None) -> int:
    out, cfg = parse_args(argv)
    records = run_grid(out, cfg)
    failed = [r for r in records if "error" in r]
    print(f"[coverage] {len(records) - len(failed)}/{len(records)} runs measured", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
