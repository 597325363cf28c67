"""CalibRL math: pure torch, no Ray, no verl import.

Every equation of SPEC.md §1 and §3 lives in exactly one function below, and each docstring states it.
The verl glue (registries, trainer, actor loss) lives in ``calibrl_verl.integration`` and only calls
into this module, so the math can be read, tested and benchmarked on its own.

Notation (SPEC.md): a *group* is all rows sharing a prompt uid; on-policy rows o_1..o_n were sampled,
expert rows e carry the expert chain-of-thought. r_i is a row's scalar reward, A_i its advantage,
s_i = +1 / -1 its correctness sign, l^e_t = log pi_old(e_t | q, e_<t) the expert's old per-token log-probs.
"""

from __future__ import annotations

from typing import Any

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
# Groups and advantages (SPEC §1.5, §3)
# ----------------------------------------------------------------------------------------------------------
def group_ids(index: np.ndarray | list[Any]) -> torch.Tensor:
    """Map per-row group keys (uids, any hashable) to dense int64 ids 0..G-1, first-seen order irrelevant."""
    _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def _onpolicy_group_stats(
    scores: torch.Tensor, gid: torch.Tensor, onpolicy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row mean, unbiased std and 'all rewards equal' flag of the row's group, over on-policy rows only.

    Single-row groups follow verl's GRPO convention: mean 0, std 1 (the lone reward is its own advantage).
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
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    all_equal = (hi == lo) & ~single
    return mean[gid], std[gid], all_equal[gid]


def compute_calibrl_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    is_expert: torch.Tensor,
    norm_adv_by_std: bool = False,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantage over on-policy rows (SPEC §1.5); its magnitude is the group rareness.

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
    """Advantage of expert rows for the off-policy baselines (LUFFY, RL-PLUS; SPEC §3), 0 on on-policy rows.

        A_e = r_e - mean_{j on-policy} r_j            (divided by std_j r_j + epsilon when norm_adv_by_std)

    The group statistics use on-policy rows only, as LUFFY's own code does; a group with no on-policy row
    (or a single one) uses mean 0 and std 1.
    """
    is_expert = torch.as_tensor(is_expert, dtype=torch.bool).reshape(-1)
    adv, _ = _centred_scores(token_level_rewards, index, is_expert, norm_adv_by_std, epsilon)
    return _broadcast(torch.where(is_expert, adv, torch.zeros_like(adv)), token_level_rewards, response_mask)


def _centred_scores(token_level_rewards, index, is_expert, norm_adv_by_std, epsilon):
    """(r_i - mean) [/ (std + eps)] per row with on-policy group statistics, and the all-equal-group flag."""
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
    """Correctness of each row (SPEC §1.6): the reward's ``acc`` field when it has one, else r_i > threshold.

        correct_i = acc_i > 0           if acc is given
        correct_i = r_i > pass_threshold otherwise;   s_i = +1 if correct_i else -1

    Returns the bool tensor ``correct`` (the sign is ``2 * correct - 1``). NaN ``acc`` counts as wrong.
    """
    if acc is not None:
        acc = torch.as_tensor(acc, dtype=torch.float32).reshape(-1)
        return torch.nan_to_num(acc, nan=0.0) > 0
    return torch.as_tensor(scores, dtype=torch.float32).reshape(-1) > pass_threshold


# ----------------------------------------------------------------------------------------------------------
# The asymmetric expert-gap activation (SPEC §1.7)
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
    ``agg_loss`` (kept torch-only here); a test pins the two equal for every mode.
    """
    mask = loss_mask.to(loss_mat.dtype)
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


def _row_abs_advantage(advantages: torch.Tensor) -> torch.Tensor:
    """|A_i| per row from verl's (B, T) advantages (A_i on response tokens, 0 on padding) or a (B,) vector."""
    return advantages.abs() if advantages.dim() == 1 else advantages.abs().amax(dim=-1)


def _check_guide_args(gap: str, tail: str, sequence_norm: str, alpha: float) -> None:
    for key, value, allowed in (("gap", gap, GAP_MODES), ("tail", tail, TAIL_MODES),
                                ("sequence_norm", sequence_norm, SEQUENCE_NORMS)):
        if value not in allowed:
            raise ValueError(f"calibrl.{key}={value!r} is not one of {allowed}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"calibrl.alpha={alpha} must be in [0, 1]")


def expert_sequence_baseline(expert_log_prob: torch.Tensor, expert_mask: torch.Tensor,
                             sequence_norm: str = "sum") -> torch.Tensor:
    """The expert's side of the sequence gap (SPEC §1.7, eq. 9), over ALL of the expert's tokens:

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
) -> tuple[torch.Tensor, dict[str, float]]:
    """The calibration (guide) loss L_guide over on-policy rows (SPEC §1.7); expert rows are never passed in.

    Inputs are (B, T) over on-policy rows: ``expert_log_prob`` / ``expert_mask`` hold the row's group expert's
    old log-probs l^e_t, position-aligned, and where the expert has a token; a row whose group has no expert
    has an all-false ``expert_mask`` and adds nothing (but still counts in the denominator).
    s_i = +1 if ``correct[i]`` else -1.

    Token mode (authors' code, default):
        d_{i,t} = log pi_theta(o_{i,t}) - l^e_t
        g_{i,t} = |A_i| * LeakyReLU_alpha(-s_i * d_{i,t})
        L_guide = agg_{loss_agg_mode}(g over response tokens; tokens without expert counterpart add 0)
        Past the expert's last token, tail="zero" uses l^e_t = 0 and tail="mask" drops the token from the sum.
    Sequence mode (the paper's eq. 9):
        d_i = S(log pi_theta(o_i)) - S(l^e),  S = sum over tokens (sequence_norm="sum") or mean ("mean")
        g_i = |A_i| * LeakyReLU_alpha(-s_i * d_i)
        L_guide = sum_i g_i / N_responses   (every on-policy response counts, ``global_batch_size`` if given)
        S(l^e) runs over the whole expert (``expert_sequence_baseline``). Tensors aligned to the on-policy
        response (as verl's micro-batches are) can cut a longer expert, so the trainer passes S(l^e) per row as
        ``expert_baseline`` (B,); without it S(l^e) is taken from ``expert_log_prob`` / ``expert_mask``.

    Log-probs are floored at LOG_PROB_FLOOR first, so -inf never reaches the loss. Computed in float32.
    Metrics: gate_full_frac (share of guided tokens/responses on the slope-1 side), gap_mean (mean d over
    them), rareness_mean (mean |A_i| over the rows passed in), guided_frac (share of rows with an expert).
    """
    _check_guide_args(gap, tail, sequence_norm, alpha)
    resp = response_mask.bool()
    emask = expert_mask.bool()
    has_expert = emask.any(dim=-1)
    lp = log_prob.float().clamp(min=LOG_PROB_FLOOR)
    with torch.no_grad():  # the expert baseline is a constant of the update
        elp = torch.where(emask, expert_log_prob.float().clamp(min=LOG_PROB_FLOOR), 0.0)
        sign = correct.reshape(-1).to(lp.device).float() * 2.0 - 1.0
        weight = _row_abs_advantage(advantages.float()) * has_expert  # rows without an expert: no guide
    if gap == "token":
        loss, d, gated, sign_b = _token_guide(lp, elp, emask, has_expert, resp, sign, weight, alpha, tail)
        loss = aggregate_loss(loss, resp, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                              loss_scale_factor)
    else:
        if expert_baseline is None:
            expert_baseline = expert_sequence_baseline(expert_log_prob, emask, sequence_norm)
        ref = expert_baseline.reshape(-1).to(lp.device).float().detach()
        loss, d, gated, sign_b = _sequence_guide(lp, ref, has_expert, resp, sign, weight, alpha, sequence_norm)
        n_resp = resp.any(dim=-1).sum().clamp(min=1) if global_batch_size is None else global_batch_size
        loss = loss.sum() / n_resp * dp_size
    return loss, _guide_metrics(d.detach(), gated, sign_b, advantages, resp, has_expert)


def _token_guide(lp, elp, emask, has_expert, resp, sign, weight, alpha, tail):
    """(B, T) matrix of g_{i,t} (zero where not guided), the gaps, the guided-token mask and the row signs."""
    d = lp - elp  # elp is 0 past the expert's last token: tail="zero"
    g = asymmetric_gate(d, sign.unsqueeze(-1), alpha, weight.unsqueeze(-1))
    if tail == "mask":
        g = g * emask
        gated = resp & emask
    else:
        gated = resp & has_expert.unsqueeze(-1)
    return g, d, gated, sign.unsqueeze(-1)


def _sequence_guide(lp, ref, has_expert, resp, sign, weight, alpha, sequence_norm):
    """(B,) vector of g_i (zero without an expert), the gaps d_i = S(own) - ref, the guided-response mask and
    the signs; ``ref`` is the expert's S(l^e) per row."""
    own = (lp * resp).sum(-1)
    if sequence_norm == "mean":
        own = own / resp.sum(-1).clamp(min=1)
    d = own - ref
    return asymmetric_gate(d, sign, alpha, weight), d, has_expert & resp.any(-1), sign


@torch.no_grad()
def _guide_metrics(d, gated, sign, advantages, resp, has_expert) -> dict[str, float]:
    n_gated = gated.sum().clamp(min=1)
    full = (sign * d < 0) & gated  # -s * d > 0: the slope-1 side of the gate
    rows = resp.any(dim=-1)
    weight = _row_abs_advantage(advantages.float())
    return {
        "gate_full_frac": float(full.sum() / n_gated),
        "gap_mean": float((d * gated).sum() / n_gated),
        "rareness_mean": float(weight[rows].mean()) if rows.any() else 0.0,
        "guided_frac": float(has_expert.float().mean()) if has_expert.numel() else 0.0,
    }


# ----------------------------------------------------------------------------------------------------------
# Off-policy expert-token shaping for the baselines (SPEC §3)
# ----------------------------------------------------------------------------------------------------------
def luffy_expert_token_loss(
    log_prob: torch.Tensor, advantages: torch.Tensor, shaping_gamma: float = 0.1
) -> torch.Tensor:
    """LUFFY's policy-shaped off-policy loss per expert token (no clipping, no importance ratio):

        l_t = -A_e * f(p_t),  f(p) = p / (p + gamma),  p_t = pi_theta(e_t) = exp(log_prob_t),  gamma = 0.1

    f regularises the gradient toward low-probability expert tokens. Returns the (B, T) loss matrix;
    aggregation (with the on-policy PPO tokens) is the caller's.
    """
    p = torch.exp(log_prob.float().clamp(min=LOG_PROB_FLOOR))
    return (-advantages.float() * p / (p + shaping_gamma)).to(log_prob.dtype)


def rlplus_expert_token_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, explore_gamma: float = 0.5
) -> torch.Tensor:
    """RL-PLUS's off-policy loss per expert token (multiple importance sampling + exploration weight):

        l_t = -A_e * p_t / (0.75 * p_old_t + 0.25) * (1 - p_t)^gamma,   gamma = 0.5

    p_t = pi_theta(e_t), p_old_t = pi_old(e_t); the exploration factor (1 - p_t)^gamma re-weights the
    advantage and is held constant (detached), as in RL-PLUS. Returns the (B, T) loss matrix.
    """
    p = torch.exp(log_prob.float().clamp(min=LOG_PROB_FLOOR))
    p_old = torch.exp(old_log_prob.float().clamp(min=LOG_PROB_FLOOR))
    explore = (1.0 - p.detach()).clamp(min=0.0) ** explore_gamma
    return (-advantages.float() * p / (0.75 * p_old + 0.25) * explore).to(log_prob.dtype)
