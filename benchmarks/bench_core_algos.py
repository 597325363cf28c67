"""Speed of the CalibRL math against verl's own GRPO path and against a per-row loop, side by side in one run.

    python benchmarks/bench_core_algos.py                 # paper scale: 480 prompts x (10 + 1) rows x 4096 tokens
    python benchmarks/bench_core_algos.py --sizes 64x10x512 --repeats 5

Per size it times (median of --repeats, forward + backward of the loss w.r.t. the policy log-probs):
  verl    : verl's ``compute_grpo_outcome_advantage`` + ``compute_policy_loss_vanilla`` on the n on-policy rows
  calibrl : ``compute_calibrl_advantage`` on n + 1 rows + verl's PPO surrogate + lambda * guide loss
  loop    : the same CalibRL advantage + guide math written as a straightforward Python loop over rows
and prints calibrl/verl (target <= 1.10) and loop/calibrl-math (target >= 50).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_policy_loss_vanilla
from verl.workers.config import FSDPActorConfig

from calibrl_verl import core_algos as ca


def make_batch(prompts: int, n: int, length: int, seed: int = 0) -> dict[str, torch.Tensor | np.ndarray]:
    """A synthetic step: n on-policy rows + 1 expert row per prompt, binary-ish rewards, ragged lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows = prompts * (n + 1)
    lengths = torch.randint(length // 4, length + 1, (rows,), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).float()
    scores = torch.randint(0, 2, (rows,), generator=gen).float() + 0.1
    rewards = torch.zeros(rows, length)
    rewards[torch.arange(rows), lengths - 1] = scores
    is_expert = (torch.arange(rows) % (n + 1)) == n
    return {
        "rewards": rewards, "mask": mask, "is_expert": is_expert,
        "index": np.array([f"p{i // (n + 1)}" for i in range(rows)], dtype=object),
        "old_log_prob": -torch.rand(rows, length, generator=gen) * 2,
        "log_prob": -torch.rand(rows, length, generator=gen) * 2,
    }


def expert_alignment(batch: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each on-policy row gets its group's expert old log-probs and token mask (what our trainer attaches)."""
    expert_rows = torch.nonzero(batch["is_expert"]).squeeze(-1)
    per_row = expert_rows.repeat_interleave(n)
    return batch["old_log_prob"][per_row], batch["mask"][per_row].bool()


def _actor_config() -> FSDPActorConfig:
    return FSDPActorConfig(strategy="fsdp2", rollout_n=10, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2)


def run_verl(batch: dict, n: int) -> None:
    on = ~batch["is_expert"]
    adv, _ = compute_grpo_outcome_advantage(batch["rewards"][on], batch["mask"][on], batch["index"][on.numpy()],
                                            norm_adv_by_std_in_grpo=False)
    lp = batch["log_prob"][on].clone().requires_grad_(True)
    loss, _ = compute_policy_loss_vanilla(batch["old_log_prob"][on], lp, adv, batch["mask"][on],
                                          config=_actor_config())
    loss.backward()


def _calibrl_math(batch: dict, n: int, lp: torch.Tensor, adv_all: torch.Tensor | None = None) -> torch.Tensor:
    on = ~batch["is_expert"]
    if adv_all is None:
        adv_all, _ = ca.compute_calibrl_advantage(batch["rewards"], batch["mask"], batch["index"], batch["is_expert"])
    elp, emask = expert_alignment(batch, n)
    correct = ca.correctness_sign(batch["rewards"][on].sum(-1))
    guide, _ = ca.compute_calibrl_guide_loss(lp, elp, emask, adv_all[on], correct, batch["mask"][on])
    return guide


def run_calibrl(batch: dict, n: int) -> None:
    on = ~batch["is_expert"]
    adv_all, _ = ca.compute_calibrl_advantage(batch["rewards"], batch["mask"], batch["index"], batch["is_expert"])
    lp = batch["log_prob"][on].clone().requires_grad_(True)
    pg, _ = compute_policy_loss_vanilla(batch["old_log_prob"][on], lp, adv_all[on], batch["mask"][on],
                                        config=_actor_config())
    guide = _calibrl_math(batch, n, lp, adv_all)
    (pg + 0.1 * guide).backward()


def run_calibrl_math(batch: dict, n: int) -> None:
    lp = batch["log_prob"][~batch["is_expert"]].clone().requires_grad_(True)
    _calibrl_math(batch, n, lp).backward()


def run_loop(batch: dict, n: int, alpha: float = 0.5) -> None:
    """The same advantage + token guide loss, one row at a time (what a first implementation looks like)."""
    scores = batch["rewards"].sum(-1)
    groups: dict[str, list[float]] = defaultdict(list)
    for i in range(len(scores)):
        if not batch["is_expert"][i]:
            groups[batch["index"][i]].append(float(scores[i]))
    expert_of = {batch["index"][i]: i for i in range(len(scores)) if batch["is_expert"][i]}
    lp_all = batch["log_prob"].clone().requires_grad_(True)
    total, denom = lp_all.new_zeros(()), 0.0
    for i in range(len(scores)):
        if batch["is_expert"][i]:
            continue
        vals = groups[batch["index"][i]]
        adv = 0.0 if len(set(vals)) == 1 else float(scores[i]) - sum(vals) / len(vals)
        sign = 1.0 if float(scores[i]) > 0.1 else -1.0
        e = expert_of[batch["index"][i]]
        m = batch["mask"][i].bool()
        elp = torch.where(batch["mask"][e].bool(), batch["old_log_prob"][e], 0.0)
        d = lp_all[i] - elp
        g = abs(adv) * torch.nn.functional.leaky_relu(-sign * d, alpha)
        total = total + g[m].sum()
        denom += float(m.sum())
    (total / denom).backward()


def median_time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up (allocator, lazy imports)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["16x10x512", "480x10x512", "480x10x4096"],
                        help="PROMPTSxNxTOKENS (n on-policy rows + 1 expert per prompt)")
    parser.add_argument("--repeats", type=int, default=3)
    # One thread by default: on a shared 2-core machine, torch's thread pool waiting on a descheduled
    # thread adds ~0.3 s stalls at random and makes the ratios meaningless.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'size':>14} {'verl s':>9} {'calibrl s':>10} {'ratio':>7} | {'loop s':>9} {'math s':>9} {'speedup':>8}")
    for size in args.sizes:
        prompts, n, length = (int(x) for x in size.split("x"))
        batch = make_batch(prompts, n, length)
        t_verl = median_time(partial(run_verl, batch, n), args.repeats)
        t_cal = median_time(partial(run_calibrl, batch, n), args.repeats)
        t_math = median_time(partial(run_calibrl_math, batch, n), args.repeats)
        t_loop = median_time(partial(run_loop, batch, n), max(1, args.repeats // 2))
        print(f"{size:>14} {t_verl:9.3f} {t_cal:10.3f} {t_cal / t_verl:6.2f}x | {t_loop:9.3f} {t_math:9.3f} "
              f"{t_loop / t_math:7.1f}x")
    print("targets: calibrl/verl <= 1.10x ; loop/calibrl-math >= 50x")


if __name__ == "__main__":
    main()
