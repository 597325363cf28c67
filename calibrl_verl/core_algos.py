"""CalibRL math: pure torch, no Ray, no verl import.

Every equation of docs/algorithm.md §1 and §3 lives in exactly one function below, and each docstring states it.
The verl glue (registries, trainer, actor loss) lives in ``calibrl_verl.integration`` and only calls
into this module, so the math can be read, tested and benchmarked on its own.

Notation (docs/algorithm.md): a *group* is all rows sharing a prompt uid; on-policy rows o_1..o_n were sampled,
expert rows e carry the expert chain-of-thought. r_i is a row's scalar reward, A_i its advantage,
s_i = +1 / -1 its correctness sign, l^e_t = log pi_old(e_t | q, e_<t) the expert's old per-token log-probs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "GAP_MODES",
    "LOG_PROB_FLOOR",
    "LOSS_AGG_MODES",
    "SEQUENCE_NORMS",
    "TAIL_MODES",
    "aggregate_loss",
    "asymmetric_gate",
    "compute_calibrl_advantage",
    "compute_calibrl_guide_loss",
    "compute_expert_advantage",
    "correctness_sign",
    "expert_sequence_baseline",
    "group_expert_baseline",
    "group_ids",
    "luffy_expert_token_loss",
    "rlplus_expert_token_loss",
]

GAP_MODES = ("token", "sequence")
TAIL_MODES = ("zero", "mask")
SEQUENCE_NORMS = ("sum", "mean")
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# Per-token log-probs below this (p < 2e-9, -inf included) are floored before any gap is formed. verl clamps
# its per-token log-ratios to [-20, 20] for the same reason: one impossible token must not make the loss inf.
LOG_PROB_FLOOR = -20.0


# ----------------------------------------------------------------------------------------------------------
# Groups and advantages (docs/algorithm.md §1.5, §3)
# ----------------------------------------------------------------------------------------------------------
def group_ids(index: np.ndarray | list[Any]) -> torch.Tensor:
    """Map per-row group keys (uids, any hashable) to dense int64 ids 0..G-1, first-seen order irrelevant."""
    _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def _onpolicy_group_stats(
    scores: torch.Tensor, gid: torch.Tensor, onpolicy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row mean, unbiased std and 'all rewards equal' flag of the row's group, over on-policy rows only.

    Single-row groups (and groups with no on-policy row) follow verl's GRPO convention: mean 0, std 1 (the lone
    reward is its own advantage). A group whose on-policy rewards are all equal gets mean = that reward and
    std = 1, as LUFFY does (see ``compute_expert_advantage``): a zero std must never be a divisor. "All equal"
    is decided exactly (max == min), not by std == 0: float32 gives ten rewards of 1.1 a std of about 1e-7.
    """
    n_groups = int(gid.max().item()) + 1 if gid.numel() else 0
    w = onpolicy.to(scores.dtype)
    count = torch.zeros(n_groups, dtype=scores.dtype).index_add_(0, gid, w)
    total = torch.zeros(n_groups, dtype=scores.dtype).index_add_(0, gid, scores * w)
    mean = total / count.clamp(min=1.0)
    sq_dev = torch.zeros(n_groups, dtype=scores.dtype).index_add_(0, gid, (scores - mean[gid]) ** 2 * w)
    std = torch.sqrt(sq_dev / (count - 1.0).clamp(min=1.0))
    big = torch.finfo(scores.dtype).max
    masked_hi = torch.where(onpolicy, scores, torch.full_like(scores, -big))
    masked_lo = torch.where(onpolicy, scores, torch.full_like(scores, big))
    hi = torch.full((n_groups,), -big, dtype=scores.dtype).scatter_reduce_(0, gid, masked_hi, reduce="amax")
    lo = torch.full((n_groups,), big, dtype=scores.dtype).scatter_reduce_(0, gid, masked_lo, reduce="amin")
    single = count <= 1.0
    all_equal = (hi == lo) & ~single
    mean = torch.where(single, torch.zeros_like(mean), torch.where(all_equal, hi, mean))
    std = torch.where(single | all_equal, torch.ones_like(std), std)
    return mean[gid], std[gid], all_equal[gid]


def compute_calibrl_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    is_expert: torch.Tensor,
    norm_adv_by_std: bool = False,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantage over on-policy rows (docs/algorithm.md §1.5); its magnitude is the group rareness.

        r_i  = sum_t token_level_rewards[i, t]
        A_i  = r_i - mean_{j on-policy, g(j) = g(i)} r_j                    (Dr.GRPO, default)
        A_i  = (r_i - mean_j r_j) / (std_j r_j + epsilon)                   (norm_adv_by_std=True)
        A_i  = 0  for expert rows, and for every row of a group whose on-policy rewards are all equal
        |A_i| is the distribution-aware weight: with binary accuracy and pass rate p, a correct answer
        weighs 1 - p and a wrong one p, so the rarer outcome in a group moves the policy more.

    Expert rows never enter the group statistics. Single-row groups follow verl's GRPO convention
    (mean 0, std 1). Returns (advantages, returns), both (B, T) and equal, broadcast over response_mask.
    """
    is_expert = torch.as_tensor(is_expert, dtype=torch.bool).reshape(-1)
    adv, all_equal = _centred_scores(token_level_rewards, index, is_expert, norm_adv_by_std, epsilon)
    adv = torch.where(~is_expert & ~all_equal, adv, torch.zeros_like(adv))
    adv = _broadcast(adv, token_level_rewards, response_mask)
    return adv, adv


def compute_expert_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    is_expert: torch.Tensor,
    norm_adv_by_std: bool = False,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """Advantage of expert rows for the off-policy baselines (LUFFY, RL-PLUS; docs/algorithm.md §3), 0 elsewhere.

        A_e = r_e - mean_{j on-policy} r_j                          (default)
        A_e = (r_e - mean_{j on-policy} r_j) / (std_j r_j + epsilon)  (norm_adv_by_std=True)
        std_j r_j := 1 when the group's on-policy rewards are all equal; mean 0, std 1 for a group with
        fewer than two on-policy rows

    LUFFY's own code (github.com/ElliottYan/LUFFY, ``luffy/verl/verl/mix_src/mix_core_alg.py``,
    ``compute_grpo_outcome_advantage_split``, its ``grpo_split`` estimator) takes the mean and the unbiased std
    over the on-policy rows of the prompt only, replaces a std equal to 0 by 1, and divides by std + 1e-6; a
    prompt with one on-policy row gets mean 0 and std 1. We follow it, with two differences that only make it
    well-defined: "all equal" is tested exactly rather than as std == 0 (in float32, ten on-policy rewards of
    1.1 have a std of ~1e-7, so an expert scoring 0 would get about -1e6), and a group with no on-policy row
    uses mean 0, std 1 where LUFFY's code fails with a KeyError. So with on-policy rewards [0, 0, 0] and
    r_e = 1.1, A_e = 1.1 / (1 + 1e-6), not 1.1 / 1e-6. In a group that is not all equal and whose rewards lie
    on a grid of step delta (acc + 0.1 fmt: delta = 0.1), the std of n rows is at least delta / sqrt(n) (one
    row off by delta), so |A_e| stays a bounded z-score.
    (LUFFY's released main script, ``exp_scripts/train.sh``, instead runs its plain ``grpo`` estimator with
    ``grpo_use_std=False``: there the expert row's reward also enters the group mean. docs/algorithm.md keeps
    the expert out of the statistics.)
    """
    is_expert = torch.as_tensor(is_expert, dtype=torch.bool).reshape(-1)
    adv, _ = _centred_scores(token_level_rewards, index, is_expert, norm_adv_by_std, epsilon)
    return _broadcast(torch.where(is_expert, adv, torch.zeros_like(adv)), token_level_rewards, response_mask)


def _centred_scores(token_level_rewards, index, is_expert, norm_adv_by_std, epsilon):
    """(r_i - mean) [/ (std + eps)] per row with on-policy group statistics, and the all-equal-group flag.

    The std of an all-equal group is 1 (``_onpolicy_group_stats``), so no row is divided by a zero std.
    """
    scores = token_level_rewards.sum(dim=-1).to(torch.float32)
    if scores.numel() == 0:
        return scores, torch.zeros_like(scores, dtype=torch.bool)
    mean, std, all_equal = _onpolicy_group_stats(scores, group_ids(index), ~is_expert)
    adv = scores - mean
    return (adv / (std + epsilon) if norm_adv_by_std else adv), all_equal


def _broadcast(adv: torch.Tensor, like: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A (B,) per-row value as verl's (B, T) token tensor: the value on response tokens, 0 elsewhere."""
    return adv.to(like.dtype).unsqueeze(-1) * response_mask.to(like.dtype)


def correctness_sign(
    scores: torch.Tensor, acc: torch.Tensor | None = None, pass_threshold: float = 0.1
) -> torch.Tensor:
    """Correctness of each row (docs/algorithm.md §1.6): the reward's ``acc`` when it has one, else r_i > threshold.

        correct_i = acc_i > 0           if acc is given
        correct_i = r_i > pass_threshold otherwise;   s_i = +1 if correct_i else -1

    Returns the bool tensor ``correct`` (the sign is ``2 * correct - 1``). NaN ``acc`` counts as wrong.
    """
    if acc is not None:
        acc = torch.as_tensor(acc, dtype=torch.float32).reshape(-1)
        return torch.nan_to_num(acc, nan=0.0) > 0
    return torch.as_tensor(scores, dtype=torch.float32).reshape(-1) > pass_threshold


# ----------------------------------------------------------------------------------------------------------
# The asymmetric expert-gap activation (docs/algorithm.md §1.7)
# ----------------------------------------------------------------------------------------------------------
def asymmetric_gate(
    gap: torch.Tensor, sign: torch.Tensor, alpha: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """|A| * LeakyReLU_alpha(-s * d): slope 1 while on the wrong side of the expert, alpha once past it.

        gate(d, s) = -s * d            if -s * d > 0   (correct below the expert / wrong above it)
                   = alpha * (-s * d)  otherwise       (already crossed the expert baseline: damped)

    ``weight`` (|A| >= 0, broadcastable) is folded inside the activation, w * LeakyReLU(x) = LeakyReLU(w * x)
    for w >= 0, which saves one full (B, T) multiply and its backward in the hot path.
    """
    coef = -sign if weight is None else -(sign * weight)
    return torch.nn.functional.leaky_relu(coef * gap, negative_slope=alpha)


def aggregate_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: float | torch.Tensor | None = None,
    global_batch_size: float | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) loss matrix to a scalar with verl's ``loss_agg_mode`` semantics.

        token-mean:              sum_{i,t} m l / N_tokens * dp
        token-sum:               sum_{i,t} m l * dp
        seq-mean-token-sum:      sum_i (sum_t m l) / N_seqs * dp
        seq-mean-token-sum-norm: the same / loss_scale_factor (default T)
        seq-mean-token-mean:     sum_i (sum_t m l / sum_t m) / N_seqs * dp

    N_tokens / N_seqs are the global counts verl passes (``batch_num_tokens`` / ``global_batch_size``) so a
    micro-batch's loss sums to the mini-batch mean across micro-batches and dp ranks; without them the local
    counts are used, and an all-empty mask gives 0 (verl's gives NaN). Re-derived from verl 0.9.1's
    ``agg_loss`` (kept torch-only here); a test pins the two equal for every mode. The guide loss uses the same
    aggregation in its per-row form, ``_row_agg_weights``.
    """
    mask = _float_mask(loss_mask, loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        denom = mask.sum().clamp(min=1.0) if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * mask).sum() / denom * dp_size
    if loss_agg_mode == "token-sum":
        return (loss_mat * mask).sum() * dp_size
    seq_tokens = mask.sum(dim=-1)
    seq_valid = (seq_tokens > 0).to(loss_mat.dtype)
    denom = seq_valid.sum().clamp(min=1.0) if global_batch_size is None else global_batch_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        loss = ((loss_mat * mask).sum(dim=-1) * seq_valid).sum() / denom * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1])
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        seq_loss = (loss_mat * mask).sum(dim=-1) / (seq_tokens + 1e-8)
        return (seq_loss * seq_valid).sum() / denom * dp_size
    raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")


def _row_agg_weights(
    seq_tokens: torch.Tensor,
    loss_agg_mode: str,
    horizon: int,
    dp_size: int = 1,
    batch_num_tokens: float | torch.Tensor | None = None,
    global_batch_size: float | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """``aggregate_loss`` as per-row weights a_i:  aggregate_loss(l, m) = sum_i a_i * sum_t m_{i,t} l_{i,t}.

    ``seq_tokens`` (B,) float32 holds sum_t m per row; ``horizon`` is T (the default loss_scale_factor). The guide
    loss reduces its tokens per row first, so its value and gradient need only these (B,) weights.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")
    if loss_agg_mode == "token-mean":
        denom = seq_tokens.sum().clamp(min=1.0) if batch_num_tokens is None else batch_num_tokens
        return torch.full_like(seq_tokens, dp_size) / denom
    if loss_agg_mode == "token-sum":
        return torch.full_like(seq_tokens, dp_size)
    seq_valid = (seq_tokens > 0).to(seq_tokens.dtype)
    denom = seq_valid.sum().clamp(min=1.0) if global_batch_size is None else global_batch_size
    weights = seq_valid * dp_size / denom
    if loss_agg_mode == "seq-mean-token-sum-norm":
        weights = weights / (loss_scale_factor if loss_scale_factor is not None else horizon)
    elif loss_agg_mode == "seq-mean-token-mean":
        weights = weights / (seq_tokens + 1e-8)
    return weights


# ----------------------------------------------------------------------------------------------------------
# The guide loss (docs/algorithm.md §1.7). One pass per step over the (B, T) tensors where eager torch allows it:
# masks as float (a bool mask in a float op is a slow mixed-dtype kernel), scratch tensors updated in place,
# per-token sums reduced per row first, the gradient formed next to the loss (backward is then one multiply), and
# every metric read from those intermediates with a single host synchronisation.
# ----------------------------------------------------------------------------------------------------------
def _float_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A mask as ``dtype``; bool goes through a uint8 view, whose cast is vectorised (bool's: ~2.5x slower on CPU)."""
    return mask.view(torch.uint8).to(dtype) if mask.dtype == torch.bool else mask.to(dtype)


def _row_count(mask: torch.Tensor) -> torch.Tensor:
    """sum_t mask per row as float32, for a bool mask, without a float copy (bool's own sum: ~1.5x slower on CPU)."""
    return mask.view(torch.uint8).sum(dim=-1, dtype=torch.int32).float()


def _row_any(mask: torch.Tensor) -> torch.Tensor:
    """``mask.any(-1)`` for a bool mask, as a uint8 max (a vectorised reduction; bool's ``any``: ~30x slower on CPU)."""
    if mask.shape[-1] == 0:
        return torch.zeros(mask.shape[:-1], dtype=torch.bool, device=mask.device)
    return mask.view(torch.uint8).amax(dim=-1) > 0


def _row_abs_advantage(advantages: torch.Tensor) -> torch.Tensor:
    """|A_i| per row (float32) from verl's (B, T) advantages (A_i on response tokens, 0 on padding) or a (B,) vector.

    max_t |a_t| = max(max_t a_t, -min_t a_t): two reductions instead of a (B, T) ``abs`` copy and a third one.
    """
    if advantages.dim() == 1:
        return advantages.float().abs()
    return torch.maximum(advantages.amax(dim=-1), advantages.amin(dim=-1).neg()).float()


def _floored(log_prob: torch.Tensor) -> torch.Tensor:
    """A new float32 tensor max(log_prob, LOG_PROB_FLOOR) (one pass for float32 input)."""
    if log_prob.dtype == torch.float32:
        return log_prob.clamp(min=LOG_PROB_FLOOR)
    return log_prob.float().clamp_(min=LOG_PROB_FLOOR)


def _check_guide_args(gap: str, tail: str, sequence_norm: str, alpha: float) -> None:
    for key, value, allowed in (("gap", gap, GAP_MODES), ("tail", tail, TAIL_MODES),
                                ("sequence_norm", sequence_norm, SEQUENCE_NORMS)):
        if value not in allowed:
            raise ValueError(f"calibrl.{key}={value!r} is not one of {allowed}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"calibrl.alpha={alpha} must be in [0, 1]")


def expert_sequence_baseline(expert_log_prob: torch.Tensor, expert_mask: torch.Tensor,
                             sequence_norm: str = "sum") -> torch.Tensor:
    """The expert's side of the sequence gap (docs/algorithm.md §1.7, eq. 9), over ALL of the expert's tokens:

        S(l^e) = sum_t l^e_t                      (sequence_norm="sum")
        S(l^e) = sum_t l^e_t / |e|                (sequence_norm="mean": |e| = the expert's own token count)

    (B, T) inputs with T covering the whole expert; returns (B,), 0 for rows whose mask is empty. Per-token
    log-probs are floored at LOG_PROB_FLOOR first, as in the loss.
    """
    if sequence_norm not in SEQUENCE_NORMS:
        raise ValueError(f"calibrl.sequence_norm={sequence_norm!r} is not one of {SEQUENCE_NORMS}")
    emask = expert_mask.bool()
    total = torch.where(emask, expert_log_prob.float().clamp(min=LOG_PROB_FLOOR), 0.0).sum(-1)
    return total / emask.sum(-1).clamp(min=1) if sequence_norm == "mean" else total


class _GuideParts(NamedTuple):
    """What a guide mode hands back: the loss value, its gradient (``_LossWithGradient``) and per-row metric terms."""

    value: torch.Tensor
    grad_mat: torch.Tensor | None  # (B, T), None without autograd
    grad_row: torch.Tensor | None  # (B,) scale of grad_mat's rows, or None
    stats: torch.Tensor  # (4, B), see _guide_metrics


class _LossWithGradient(torch.autograd.Function):
    """Attach to a loss value, computed without autograd, the gradient w.r.t. ``log_prob`` formed next to it:

        d loss / d log_prob = upstream * grad_mat * grad_row[:, None]   (grad_row optional, grad_mat float or bool)

    and 0 where log_prob < LOG_PROB_FLOOR (the floor's clamp), applied only when ``floored`` says such a token
    exists. One (B, T) pass instead of autograd replaying the forward's chain of element-wise ops backwards.
    """

    @staticmethod
    def forward(ctx: Any, log_prob: torch.Tensor, value: torch.Tensor, grad_mat: torch.Tensor,
                grad_row: torch.Tensor | None, floored: bool) -> torch.Tensor:
        ctx.floored, ctx.dtype = floored, log_prob.dtype
        ctx.save_for_backward(log_prob if floored else None, grad_mat, grad_row)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        log_prob, grad_mat, grad_row = ctx.saved_tensors
        scale = upstream if grad_row is None else (grad_row * upstream).unsqueeze(-1)
        grad = torch.where(grad_mat, scale, 0.0) if grad_mat.dtype == torch.bool else grad_mat * scale
        if ctx.floored:
            grad = torch.where(log_prob >= LOG_PROB_FLOOR, grad, 0.0)
        return grad.to(ctx.dtype), None, None, None, None


def compute_calibrl_guide_loss(
    log_prob: torch.Tensor,
    expert_log_prob: torch.Tensor,
    expert_mask: torch.Tensor,
    advantages: torch.Tensor,
    correct: torch.Tensor,
    response_mask: torch.Tensor,
    alpha: float = 0.5,
    gap: str = "token",
    tail: str = "zero",
    sequence_norm: str = "sum",
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: float | torch.Tensor | None = None,
    global_batch_size: float | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
    expert_baseline: torch.Tensor | None = None,
    all_wrong_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The calibration (guide) loss L_guide over on-policy rows (docs/algorithm.md §1.7); never over expert rows.

    Inputs are (B, T) over on-policy rows: ``expert_log_prob`` / ``expert_mask`` hold the row's group expert's
    old log-probs l^e_t, position-aligned, and where the expert has a token; a row whose group has no expert
    has an all-false ``expert_mask`` and adds nothing (but still counts in the denominator).
    s_i = +1 if ``correct[i]`` else -1.

    Token mode (authors' code, default; ``_token_guide``):
        d_{i,t} = log pi_theta(o_{i,t}) - l^e_t
        g_{i,t} = |A_i| * LeakyReLU_alpha(-s_i * d_{i,t})
        L_guide = agg_{loss_agg_mode}(g over response tokens; tokens without expert counterpart add 0)
        Past the expert's last token, tail="zero" uses l^e_t = 0 and tail="mask" drops the token from the sum.
    Sequence mode (the paper's eq. 9; ``_sequence_guide``):
        d_i = S(log pi_theta(o_i)) - S(l^e),  S = sum over tokens (sequence_norm="sum") or mean ("mean")
        g_i = |A_i| * LeakyReLU_alpha(-s_i * d_i)
        L_guide = sum_i g_i / N_responses   (every on-policy response counts, ``global_batch_size`` if given)
        S(l^e) runs over the whole expert (``expert_sequence_baseline``). Tensors aligned to the on-policy
        response (as verl's micro-batches are) can cut a longer expert, so the trainer passes S(l^e) per row as
        ``expert_baseline`` (B,); without it S(l^e) is taken from ``expert_log_prob`` / ``expert_mask``.

    Log-probs are floored at LOG_PROB_FLOOR first, so -inf never reaches the loss. Computed in float32 whatever
    the input dtype; the gradient comes back in ``log_prob``'s dtype.
    ``all_wrong_weight`` w replaces |A_i| in g_i for the rows ``guide_weight`` names (default 0: the paper).
    Metrics: gate_full_frac (share of guided tokens/responses on the slope-1 side), gap_mean (mean d over
    them), rareness_mean (mean |A_i| over the rows passed in), guided_frac (share of rows with an expert).
    """
    _check_guide_args(gap, tail, sequence_norm, alpha)
    need_grad = torch.is_grad_enabled() and log_prob.requires_grad
    with torch.no_grad():
        resp = response_mask if response_mask.dtype == torch.bool else response_mask.bool()
        emask = expert_mask if expert_mask.dtype == torch.bool else expert_mask.bool()
        has_expert = _row_any(emask).float()
        neg_sign = 1.0 - 2.0 * correct.reshape(-1).to(device=log_prob.device, dtype=torch.float32)  # -s_i
        rareness = _row_abs_advantage(advantages)
        weight = guide_weight(rareness, neg_sign, all_wrong_weight) * has_expert  # rows without an expert: none
        agg = dict(dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                   loss_scale_factor=loss_scale_factor)
        if gap == "token":
            value, grad_mat, grad_row, stats = _token_guide(
                log_prob, expert_log_prob, emask, resp, neg_sign, weight, alpha, tail, loss_agg_mode, agg, need_grad)
        else:
            if expert_baseline is None:
                expert_baseline = expert_sequence_baseline(expert_log_prob, emask, sequence_norm)
            ref = expert_baseline.reshape(-1).to(device=log_prob.device, dtype=torch.float32)
            value, grad_mat, grad_row, stats = _sequence_guide(
                log_prob, resp, ref, neg_sign, weight, alpha, sequence_norm, agg, need_grad)
        metrics, floored = _guide_metrics(stats, rareness, has_expert, log_prob if need_grad else None)
    if not need_grad:
        return value, metrics
    return _LossWithGradient.apply(log_prob, value, grad_mat, grad_row, floored), metrics


def guide_weight(rareness: torch.Tensor, neg_sign: torch.Tensor, all_wrong_weight: float) -> torch.Tensor:
    """The guide weight w_i of a row (docs/algorithm.md §1.7, calibrl.all_wrong_weight):

        w_i = all_wrong_weight   if A_i = 0 and s_i = -1   (a wrong row in a group with no outcome signal:
                                                            with GRPO's centred advantage, every on-policy
                                                            answer of the group scored the same)
        w_i = |A_i|              otherwise                 (the paper's group rareness)

    With the default 0 the two cases agree (|A_i| = 0), so all-wrong groups get no guidance, as in the paper.
    """
    if not all_wrong_weight:
        return rareness
    return torch.where((rareness == 0) & (neg_sign > 0), rareness.new_tensor(float(all_wrong_weight)), rareness)


def _token_guide(
    log_prob: torch.Tensor,
    expert_log_prob: torch.Tensor,
    emask: torch.Tensor,
    resp: torch.Tensor,
    neg_sign: torch.Tensor,
    weight: torch.Tensor,
    alpha: float,
    tail: str,
    loss_agg_mode: str,
    agg: dict[str, Any],
    need_grad: bool,
) -> _GuideParts:
    """Token-mode guide loss (docs/algorithm.md §1.7): value, its gradient, and per-row sums for the metrics.

        d_{i,t} = max(lp_{i,t}, floor) - l^e_t      (l^e_t = 0 past the expert's last token: tail="zero")
        g_{i,t} = |A_i| * LeakyReLU_alpha(-s_i * d_{i,t}),   L = sum_i a_i sum_t m_{i,t} g_{i,t}

    with m the guided tokens (response; tail="mask": response and expert) and a_i the aggregation's row weights
    (``_row_agg_weights``). With x = -s_i d m, LeakyReLU_alpha(x) = alpha x + (1 - alpha) max(x, 0), so per row
        sum_t m g = |A_i| (alpha sum_t x + (1 - alpha) sum_t max(x, 0)),
        d L / d lp_{i,t} = a_i |A_i| (-s_i) (alpha m + (1 - alpha) [x > 0])   (0 where lp is floored).
    Passes over (B, T): the floor, minus l^e, times -s, times m, three row sums, max(x, 0), its sign; the gradient
    three more in place. Scratch: x, l^e (reused for max(x, 0) and then the gradient), the float mask.
    """
    m = _float_mask(resp & emask if tail == "mask" else resp)
    guided_tokens = m.sum(-1)
    seq_tokens = guided_tokens if tail == "zero" else _row_count(resp)  # the aggregation counts response tokens
    elp = expert_log_prob if expert_log_prob.dtype == torch.float32 else expert_log_prob.float()
    buf = torch.where(emask, elp, 0.0).clamp_(min=LOG_PROB_FLOOR)  # l^e, 0 past the expert's last token
    x = _floored(log_prob).sub_(buf).mul_(neg_sign.unsqueeze(-1)).mul_(m)  # -s d on guided tokens, 0 elsewhere
    x_sum = x.sum(-1)
    pos = torch.clamp(x, min=0.0, out=buf)
    del x
    pos_sum = pos.sum(-1)
    full = pos.sign_()  # 1 on the slope-1 side of the gate (x > 0), else 0
    full_rows = full.sum(-1)
    row_weight = _row_agg_weights(seq_tokens, loss_agg_mode, log_prob.shape[-1], **agg) * weight
    value = (row_weight * (alpha * x_sum + (1.0 - alpha) * pos_sum)).sum()
    stats = torch.stack([full_rows, neg_sign * x_sum, guided_tokens, (seq_tokens > 0).float()])
    grad_mat = None
    if need_grad:  # alpha m + (1 - alpha) [x > 0], scaled per row: written over the 0/1 tensor `full`
        grad_mat = full.mul_(1.0 - alpha).add_(m, alpha=alpha).mul_((row_weight * neg_sign).unsqueeze(-1))
    return _GuideParts(value, grad_mat, None, stats)


def _sequence_guide(
    log_prob: torch.Tensor,
    resp: torch.Tensor,
    ref: torch.Tensor,
    neg_sign: torch.Tensor,
    weight: torch.Tensor,
    alpha: float,
    sequence_norm: str,
    agg: dict[str, Any],
    need_grad: bool,
) -> _GuideParts:
    """Sequence-mode guide loss (docs/algorithm.md §1.7, eq. 9): value, per-row gradient, per-row metric terms.

        d_i = S(max(lp, floor)) - S(l^e)       S = sum over response tokens, or their mean (sequence_norm="mean")
        g_i = |A_i| * LeakyReLU_alpha(-s_i * d_i),   L = sum_i g_i / N_responses * dp
        d L / d lp_{i,t} = dp / N_responses * |A_i| (-s_i) slope_i [/ |o_i|] on response tokens (0 where floored)
    Passes over (B, T): the float mask, the floor, times the mask, two row sums; backward: mask times a row scale.
    """
    m = _float_mask(resp)
    seq_tokens = m.sum(-1)
    own = _floored(log_prob).mul_(m).sum(-1)
    if sequence_norm == "mean":
        own = own / seq_tokens.clamp(min=1)
    d = own - ref
    g = asymmetric_gate(d, -neg_sign, alpha, weight)
    has_tokens = (seq_tokens > 0).float()
    n_resp = has_tokens.sum().clamp(min=1) if agg["global_batch_size"] is None else agg["global_batch_size"]
    value = g.sum() / n_resp * agg["dp_size"]
    full = (neg_sign * d > 0).float()  # -s d > 0: the slope-1 side
    stats = torch.stack([full, d, torch.ones_like(d), has_tokens]) * has_tokens
    grad_row = None
    if need_grad:
        coef = neg_sign * weight * agg["dp_size"] / n_resp
        slope = torch.where(coef * d > 0, 1.0, alpha)
        grad_row = coef * slope / (seq_tokens.clamp(min=1) if sequence_norm == "mean" else 1.0)
    return _GuideParts(value, m, grad_row, stats)


def _guide_metrics(stats: torch.Tensor, rareness: torch.Tensor, has_expert: torch.Tensor,
                   log_prob: torch.Tensor | None) -> tuple[dict[str, float], bool]:
    """The guide metrics from the loss's per-row sums, with ONE host synchronisation (verl's own loss has three).

    ``stats`` (4, B): slope-1 count, gap sum, guided count (tokens or responses) and 'has response tokens' per
    row. Rows without an expert are left out of the first three. Also says whether any log-prob is below the floor
    (``log_prob``'s min, for the backward's clamp), from the same synchronisation. Totals in float64 so token
    counts stay exact past 2^24.
    """
    rows = stats.double()
    guided = rows[:3] * has_expert.double()
    totals = [guided.sum(-1), rows[3].sum().reshape(1), (rareness.double() * rows[3]).sum().reshape(1),
              has_expert.double().sum().reshape(1)]
    if log_prob is not None and log_prob.numel():
        lp_min = log_prob.amin().double().reshape(1)
        totals.append(torch.where(lp_min >= LOG_PROB_FLOOR, 0.0, 1.0))  # NaN counts as floored, as in clamp
    full, gap_sum, n_guided, n_rows, rare_sum, n_expert, *floored = torch.cat(totals).tolist()
    n_guided = max(n_guided, 1.0)
    metrics = {
        "gate_full_frac": full / n_guided,
        "gap_mean": gap_sum / n_guided,
        "rareness_mean": rare_sum / n_rows if n_rows else 0.0,
        "guided_frac": n_expert / has_expert.numel() if has_expert.numel() else 0.0,
    }
    return metrics, bool(floored and floored[0])


# ----------------------------------------------------------------------------------------------------------
# Off-policy expert-token shaping for the baselines (docs/algorithm.md §3)
# ----------------------------------------------------------------------------------------------------------
def luffy_expert_token_loss(
    log_prob: torch.Tensor, advantages: torch.Tensor, shaping_gamma: float = 0.1
) -> torch.Tensor:
    """LUFFY's policy-shaped off-policy loss per expert token (no clipping, no importance ratio):

        l_t = -A_e * f(p_t),  f(p) = p / (p + gamma),  p_t = pi_theta(e_t) = exp(log_prob_t),  gamma = 0.1

    f regularises the gradient toward low-probability expert tokens. Computed as f(p) = sigmoid(log p - log gamma)
    (the same function: one fused op with a fused backward instead of exp, add, divide). Returns the (B, T) loss
    matrix; aggregation (with the on-policy PPO tokens) is the caller's.
    """
    shaped = torch.sigmoid_(_floored_log_prob(log_prob).sub_(math.log(shaping_gamma)))
    return (shaped * advantages).neg_().to(log_prob.dtype)


def rlplus_expert_token_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, explore_gamma: float = 0.5
) -> torch.Tensor:
    """RL-PLUS's off-policy loss per expert token (multiple importance sampling + exploration weight):

        l_t = -A_e * p_t / (0.75 * p_old_t + 0.25) * (1 - p_t)^gamma,   gamma = 0.5

    p_t = pi_theta(e_t), p_old_t = pi_old(e_t); the exploration factor (1 - p_t)^gamma re-weights the
    advantage and is held constant (detached), as in RL-PLUS. Everything but p_t is one constant factor per
    token, formed in place, so autograd sees l_t = p_t * c_t. Returns the (B, T) loss matrix.
    """
    p = torch.exp(_floored_log_prob(log_prob))
    with torch.no_grad():
        denom = _floored(old_log_prob).exp_().mul_(0.75).add_(0.25)
        coef = torch.rsub(p, 1.0).clamp_(min=0.0).pow_(explore_gamma).mul_(advantages).div_(denom).neg_()
    return (p * coef).to(log_prob.dtype)


def _floored_log_prob(log_prob: torch.Tensor) -> torch.Tensor:
    """max(log_prob, LOG_PROB_FLOOR) in float32, differentiable (the clamp's gradient is 0 below the floor)."""
    return log_prob.float().clamp(min=LOG_PROB_FLOOR)


# ----------------------------------------------------------------------------------------------------------
# The calibration baseline of a group with several experts (calibrl.experts_per_group = k > 1)
# ----------------------------------------------------------------------------------------------------------
class GroupBaseline(NamedTuple):
    """Per group g: the expert baseline the group's on-policy rows are compared with (see ``group_expert_baseline``)."""

    token_log_prob: torch.Tensor  # (G, T): l-bar^g_t, 0 where no expert of the group has a token
    token_mask: torch.Tensor  # (G, T) bool: some expert of the group has a token at t
    sequence: torch.Tensor  # (G,): S-bar^g, 0 for a group without expert
    n_experts: torch.Tensor  # (G,) int64: the group's expert rows


def group_expert_baseline(gid: torch.Tensor, n_groups: int, expert_rows: torch.Tensor, response_mask: torch.Tensor,
                          old_log_probs: torch.Tensor, sequence_norm: str = "sum") -> GroupBaseline:
    """The calibration baseline of each group: the MEAN over the group's experts e_1..e_k (docs/algorithm.md):

        token gap:     l-bar_t = (1 / k_t) sum_{j : t < |e_j|} l^{e_j}_t,   k_t = #experts with a token at t
                       (past the longest expert no expert has a token: the ``tail`` rule applies there)
        sequence gap:  S-bar   = (1 / k) sum_j S(l^{e_j})       (S over all of e_j's tokens, expert_sequence_baseline)

    With one expert both are exactly that expert's l^e_t and S(l^e). Why the mean: each expert is one draw of
    "how likely a verified solution is under the old policy"; their mean estimates that level with less variance
    than any single draw, and it does not depend on the order the experts were drawn in.

    ``gid`` (B,) dense group ids, ``expert_rows`` (B,) bool (real, active expert rows), (B, T) mask and log-probs.
    Log-probs are floored at LOG_PROB_FLOOR first, as in the loss.
    """
    emask = response_mask.bool() & expert_rows.reshape(-1, 1)
    lp = torch.where(emask, old_log_probs.float().clamp(min=LOG_PROB_FLOOR), 0.0)
    width = response_mask.shape[-1]
    lp_sum = torch.zeros(n_groups, width).index_add_(0, gid, lp)
    count = torch.zeros(n_groups, width).index_add_(0, gid, emask.float())
    token_log_prob = lp_sum / count.clamp(min=1.0)
    per_row = expert_sequence_baseline(old_log_probs, emask, sequence_norm)
    seq_sum = torch.zeros(n_groups).index_add_(0, gid, per_row * expert_rows.float())
    n_experts = torch.zeros(n_groups, dtype=torch.long).index_add_(0, gid, expert_rows.long())
    return GroupBaseline(token_log_prob, count > 0, seq_sum / n_experts.clamp(min=1), n_experts)
