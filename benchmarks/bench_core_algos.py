"""Cost of CalibRL's loss terms next to verl's own PPO surrogate, side by side in one run.

    python benchmarks/bench_core_algos.py                            # loss terms at 480 x 10 x 1024 and x 4096
    python benchmarks/bench_core_algos.py --sizes 48x10x1024 --pairs 5
    python benchmarks/bench_core_algos.py --e2e                      # also the step-math table (below)

Loss terms (the default). Per size PROMPTS x N x TOKENS the loss sees PROMPTS * N response rows of up to TOKENS
tokens (ragged, padded), with the dtypes verl's ``ppo_loss`` and our actor loss pass: float32 log-probs and
advantages, bool response mask, float32 expert log-probs and bool expert mask (1 in 10 groups without an
expert). Each term is timed forward + backward w.r.t. the policy log-probs, metrics included:
  ppo             verl's ``compute_policy_loss_vanilla`` (clip 0.2, dual clip 3), the reference of every ratio
  guide-token     ``compute_calibrl_guide_loss(gap="token")``  (tail zero, token-mean)
  guide-seq       ``compute_calibrl_guide_loss(gap="sequence")`` with the trainer's per-row expert baseline
  *-formula       the guide loss op by op from docs/algorithm.md §1.7 (what this module did before its fast path)
  *-compiled      ``torch.compile`` of that literal formula (compilation time printed apart, not in the ratio)
  luffy / rlplus  ``luffy_expert_token_loss`` / ``rlplus_expert_token_loss`` + ``aggregate_loss`` on the same tokens
Timing: interleaved pairs. Each pair runs PPO and the term back to back (order alternating between pairs) and
gives one ratio term / PPO; the table prints the median ratio (and the spread), so machine noise slower than a
pair cancels. Memory: the bytes the call allocates through torch's CPU allocator, forward + backward
(``torch.profiler`` with ``profile_memory=True``: every allocation and free, replayed in order), as the peak over
the call and as what the forward leaves held for the backward; inputs are excluded, the gradient included.

Step math (``--e2e``), the older table: verl's GRPO advantage + PPO loss against CalibRL's advantage + PPO +
guide loss on n + 1 rows per prompt (expert rows attached), and the same CalibRL math as a per-row Python loop.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_policy_loss_vanilla
from verl.workers.config import FSDPActorConfig

from calibrl_verl import core_algos as ca

GUIDE_TARGET = 0.75  # the project's bound: each CalibRL loss term <= 0.75x verl's PPO surrogate on the same rows


def _actor_config() -> FSDPActorConfig:
    return FSDPActorConfig(strategy="fsdp2", rollout_n=10, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2)


# ----------------------------------------------------------------------------------------------------------
# Loss terms against verl's PPO surrogate
# ----------------------------------------------------------------------------------------------------------
@dataclass
class LossInputs:
    """One micro-batch as the actor loss sees it (on-policy rows only)."""

    log_prob: torch.Tensor  # leaf, requires grad
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    response_mask: torch.Tensor  # bool, as verl's ppo_loss passes it
    expert_log_prob: torch.Tensor
    expert_mask: torch.Tensor
    expert_baseline: torch.Tensor
    correct: torch.Tensor


def make_loss_inputs(prompts: int, n: int, length: int, seed: int = 0) -> LossInputs:
    """Ragged responses, binary rewards, group-relative advantages, one expert per group (1 in 10 without)."""
    gen = torch.Generator().manual_seed(seed)
    rows = prompts * n
    positions = torch.arange(length)
    resp = positions < torch.randint(length // 4, length + 1, (rows,), generator=gen).unsqueeze(1)
    correct = torch.rand(rows, generator=gen) > 0.5
    scores = correct.float().view(prompts, n)
    adv = (scores - scores.mean(dim=1, keepdim=True)).reshape(rows, 1) * resp
    expert_len = torch.randint(length // 4, length + 1, (prompts,), generator=gen)
    expert_len[torch.rand(prompts, generator=gen) < 0.1] = 0
    expert_lp = -torch.rand(prompts, length, generator=gen) * 2
    full_mask = positions < expert_len.unsqueeze(1)
    baseline = torch.where(full_mask, expert_lp, 0.0).sum(-1)
    group = torch.arange(rows) // n
    return LossInputs(
        log_prob=(-torch.rand(rows, length, generator=gen) * 2).requires_grad_(True),
        old_log_prob=-torch.rand(rows, length, generator=gen) * 2,
        advantages=adv.float(), response_mask=resp,
        expert_log_prob=expert_lp[group] * resp,  # response-aligned, cut to the on-policy row like the trainer's
        expert_mask=full_mask[group] & resp, expert_baseline=baseline[group], correct=correct,
    )


def literal_guide_loss(lp: torch.Tensor, elp: torch.Tensor, emask: torch.Tensor, adv: torch.Tensor,
                       correct: torch.Tensor, resp: torch.Tensor, baseline: torch.Tensor, gap: str,
                       alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/algorithm.md §1.7 op by op (tail zero, token-mean): loss and metric sums, as computed before."""
    lp = lp.float().clamp(min=ca.LOG_PROB_FLOOR)
    has_expert = emask.any(-1)
    sign = correct.float() * 2 - 1
    weight = adv.float().abs().amax(-1) * has_expert
    coef = -(sign * weight)
    if gap == "token":
        d = lp - torch.where(emask, elp.float().clamp(min=ca.LOG_PROB_FLOOR), 0.0)
        mask = resp.float()
        loss = (F.leaky_relu(coef.unsqueeze(-1) * d, alpha) * mask).sum() / mask.sum().clamp(min=1)
        gated, sign = resp & has_expert.unsqueeze(-1), sign.unsqueeze(-1)
    else:
        d = (lp * resp).sum(-1) - baseline
        loss = F.leaky_relu(coef * d, alpha).sum() / resp.any(-1).sum().clamp(min=1)
        gated = has_expert & resp.any(-1)
    d, rows = d.detach(), resp.any(-1)
    stats = torch.stack([((sign * d < 0) & gated).sum().float(), (d * gated).sum(), gated.sum().float(),
                         (adv.abs().amax(-1) * rows).sum() / rows.sum()])
    return loss, stats


def _ppo(x: LossInputs, config: FSDPActorConfig) -> None:
    loss, _ = compute_policy_loss_vanilla(x.old_log_prob, x.log_prob, x.advantages, x.response_mask, config=config)
    loss.backward()


def _guide(x: LossInputs, gap: str) -> None:
    loss, _ = ca.compute_calibrl_guide_loss(x.log_prob, x.expert_log_prob, x.expert_mask, x.advantages, x.correct,
                                            x.response_mask, gap=gap, expert_baseline=x.expert_baseline)
    loss.backward()


def _literal(x: LossInputs, gap: str, fn: Callable = literal_guide_loss) -> None:
    loss, stats = fn(x.log_prob, x.expert_log_prob, x.expert_mask, x.advantages, x.correct, x.response_mask,
                     x.expert_baseline, gap)
    loss.backward()
    stats.tolist()  # the metrics' host read, as in the real loss


def _luffy(x: LossInputs) -> None:
    ca.aggregate_loss(ca.luffy_expert_token_loss(x.log_prob, x.advantages), x.response_mask).backward()


def _rlplus(x: LossInputs) -> None:
    ca.aggregate_loss(ca.rlplus_expert_token_loss(x.log_prob, x.old_log_prob, x.advantages),
                      x.response_mask).backward()


def _fresh(x: LossInputs, fn: Callable[[LossInputs], None]) -> Callable[[], None]:
    """``fn`` on ``x`` with the previous gradient dropped first, so every call allocates its own."""
    def call() -> None:
        x.log_prob.grad = None
        fn(x)
    return call


def compiled_terms(x: LossInputs) -> tuple[dict[str, Callable[[], None]], list[str]]:
    """torch.compile'd literal formula per gap, compiled here (timed apart); a failure is reported, not raised."""
    terms, notes = {}, []
    for gap, name in (("token", "guide-token-compiled"), ("sequence", "guide-seq-compiled")):
        start = time.perf_counter()
        try:
            fn = torch.compile(literal_guide_loss, dynamic=False)
            call = _fresh(x, partial(_literal, gap=gap, fn=fn))
            call()
        except Exception as exc:  # no compiler / backend on this machine: the eager terms still run
            notes.append(f"{name}: not measured ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
            continue
        terms[name] = call
        notes.append(f"{name}: compiled in {time.perf_counter() - start:.1f} s")
    return terms, notes


def paired_ratio(base: Callable[[], None], term: Callable[[], None], pairs: int) -> tuple[float, float, float,
                                                                                           float, float]:
    """(median of term/base over pairs, min ratio, max ratio, median base s, median term s); order alternates."""
    base()
    term()
    ratios, t_base, t_term = [], [], []
    for k in range(pairs):
        order = (base, term) if k % 2 == 0 else (term, base)
        took = []
        for fn in order:
            start = time.perf_counter()
            fn()
            took.append(time.perf_counter() - start)
        b, t = took if k % 2 == 0 else took[::-1]
        ratios.append(t / b)
        t_base.append(b)
        t_term.append(t)
    return statistics.median(ratios), min(ratios), max(ratios), statistics.median(t_base), statistics.median(t_term)


def allocated_bytes(fn: Callable[[], None], x: LossInputs) -> tuple[int, int]:
    """(peak, held at the start of backward) bytes allocated by ``fn`` through torch's CPU allocator.

    torch.profiler(profile_memory=True) records each op's own net allocation and each free; replayed in time
    order they give the live bytes over the call. "Held" is the live total when the first autograd backward node
    starts, i.e. what the forward keeps for the backward (saved tensors, the graph's outputs).
    """
    from torch.profiler import ProfilerActivity, profile

    x.log_prob.grad = None  # freed here, not inside the profiled call (it was allocated before it)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    held = None
    for event in events:
        if held is None and event.name.startswith("autograd::engine::evaluate_function"):
            held = live
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, held if held is not None else live


def run_terms(sizes: list[str], pairs: int, compile_: bool) -> None:
    print(f"Loss terms vs verl's PPO surrogate, forward + backward; {pairs} interleaved pairs per term; "
          f"target term/PPO <= {GUIDE_TARGET}x")
    for size in sizes:
        prompts, n, length = (int(v) for v in size.split("x"))
        x = make_loss_inputs(prompts, n, length)
        tokens = x.log_prob.numel()
        terms = {
            "guide-token": _fresh(x, partial(_guide, gap="token")),
            "guide-seq": _fresh(x, partial(_guide, gap="sequence")),
            "guide-token-formula": _fresh(x, partial(_literal, gap="token")),
            "guide-seq-formula": _fresh(x, partial(_literal, gap="sequence")),
            "luffy": _fresh(x, _luffy),
            "rlplus": _fresh(x, _rlplus),
        }
        notes = []
        if compile_:
            compiled, notes = compiled_terms(x)
            terms.update(compiled)
        ppo = _fresh(x, partial(_ppo, config=_actor_config()))
        print(f"\n{size}: {x.log_prob.shape[0]} rows x {length} tokens ({tokens / 1e6:.1f}M token slots, "
              f"{int(x.response_mask.sum()) / 1e6:.1f}M response tokens)")
        print(f"{'term':>22} {'term s':>8} {'PPO s':>8} {'term/PPO':>9} {'[min..max]':>13} {'target':>7} "
              f"| {'peak MB':>8} {'B/slot':>7} {'held MB':>8}")
        peak, held = allocated_bytes(ppo, x)
        print(f"{'ppo (verl)':>22} {'':>8} {'':>8} {'':>9} {'':>13} {'':>7} | {peak / 2**20:8.0f} "
              f"{peak / tokens:7.1f} {held / 2**20:8.0f}")
        for name, term in terms.items():
            ratio, low, high, t_ppo, t_term = paired_ratio(ppo, term, pairs)
            peak, held = allocated_bytes(term, x)
            verdict = "" if "formula" in name or "compiled" in name else ("ok" if ratio <= GUIDE_TARGET else "MISS")
            print(f"{name:>22} {t_term:8.3f} {t_ppo:8.3f} {ratio:8.2f}x {f'[{low:.2f}..{high:.2f}]':>13} "
                  f"{verdict:>7} | {peak / 2**20:8.0f} {peak / tokens:7.1f} {held / 2**20:8.0f}")
        for note in notes:
            print(f"  {note}")


# ----------------------------------------------------------------------------------------------------------
# Step math: CalibRL advantage + PPO + guide against verl's GRPO path and a per-row loop (--e2e)
# ----------------------------------------------------------------------------------------------------------
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


def median_time(fn: Callable[[], None], repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()  # allocator, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_e2e(sizes: list[str], repeats: int) -> None:
    print(f"\nStep math, median of {repeats}")
    print(f"{'size':>14} {'verl s':>9} {'calibrl s':>10} {'ratio':>7} | {'loop s':>9} {'math s':>9} {'speedup':>8}")
    for size in sizes:
        prompts, n, length = (int(x) for x in size.split("x"))
        batch = make_batch(prompts, n, length)
        t_verl = median_time(partial(run_verl, batch, n), repeats)
        t_cal = median_time(partial(run_calibrl, batch, n), repeats)
        t_math = median_time(partial(run_calibrl_math, batch, n), repeats)
        # a Python loop has nothing to warm up, and at 4096 tokens one run takes minutes
        t_loop = median_time(partial(run_loop, batch, n), max(1, repeats // 2), warmup=False)
        print(f"{size:>14} {t_verl:9.3f} {t_cal:10.3f} {t_cal / t_verl:6.2f}x | {t_loop:9.3f} {t_math:9.3f} "
              f"{t_loop / t_math:7.1f}x")
    print("targets: calibrl/verl <= 1.10x ; loop/calibrl-math >= 50x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["480x10x1024", "480x10x4096"],
                        help="loss terms: PROMPTSxNxTOKENS (PROMPTS * N on-policy rows)")
    parser.add_argument("--pairs", type=int, default=9, help="interleaved (PPO, term) pairs per term")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-terms", action="store_true", help="skip the loss-term table")
    parser.add_argument("--e2e", action="store_true", help="also the step-math table")
    parser.add_argument("--e2e-sizes", nargs="+", default=["16x10x512", "480x10x512", "480x10x4096"],
                        help="step math: PROMPTSxNxTOKENS (n on-policy rows + 1 expert per prompt)")
    parser.add_argument("--repeats", type=int, default=3, help="step math: median of this many")
    # One thread by default: on a shared 2-core machine, torch's thread pool waiting on a descheduled
    # thread adds ~0.3 s stalls at random and makes the ratios meaningless.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if not args.no_terms:
        run_terms(args.sizes, args.pairs, not args.no_compile)
    if args.e2e:
        run_e2e(args.e2e_sizes, args.repeats)


if __name__ == "__main__":
    main()
