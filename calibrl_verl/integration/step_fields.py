"""One training step's CalibRL fields, computed from the rows of a step (torch + numpy, no TransferQueue).

The trainer (``integration.trainer``) reads a step's rows from verl's TransferQueue, calls
``compute_step_fields`` and writes the result back; keeping this part free of Ray/TQ lets tests run it on
real tensors directly. Row order is the step's key order; padding rows (verl's ``is_padding`` tag) copy
row 0's fields under a uid of their own (``pad<uuid>`` in verl 0.9.1 ``padding_utils.py``), so they are excluded
explicitly everywhere, by the tag, never by the uid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from calibrl_verl import core_algos
from calibrl_verl.config import CalibRLConfig


@dataclasses.dataclass
class StepRows:
    """What the trainer knows about each row of one step (B rows, T = padded response length)."""

    uids: np.ndarray  # (B,) object: the prompt uid (= group)
    is_expert: torch.Tensor  # (B,) bool: an injected expert row
    is_padding: torch.Tensor  # (B,) bool: verl's balance padding
    scores: torch.Tensor  # (B,) float: the row's reward (sum of token-level rewards)
    acc: torch.Tensor | None  # (B,) float or None: the reward's `acc` field when it returns one (NaN if missing)
    response_mask: torch.Tensor  # (B, T)
    old_log_probs: torch.Tensor  # (B, T)
    expert_truncated: torch.Tensor  # (B,) bool: expert row cut at max_response_length

    @property
    def onpolicy(self) -> torch.Tensor:
        return ~self.is_expert & ~self.is_padding


@dataclasses.dataclass
class StepFields:
    """Per-row tensors written back for the update, and the step's ``calibrl/*`` metrics."""

    advantages: torch.Tensor  # (B, T)
    expert_log_prob: torch.Tensor  # (B, T): the group expert's old log-probs, position-aligned (on-policy rows)
    expert_mask: torch.Tensor  # (B, T) bool: where that expert has a token; all false without an active expert
    expert_baseline: torch.Tensor  # (B,): S(l^e) over the WHOLE group expert (sequence gap), 0 without one
    correct: torch.Tensor  # (B,) bool
    active_expert: torch.Tensor  # (B,) bool: expert rows whose group uses its expert this step
    metrics: dict[str, float]


def update_padding(n_onpolicy: int, n_expert: int, dp_size: int, mini_batch_rows: int,
                   full_multiple: int | None = None) -> tuple[int, int]:
    """Padding rows (p_update, p_total) so that on-policy + p_update rows fill whole update mini-batches on
    every data-parallel rank, and all rows + p_total split into whole log-prob micro-batches on every rank
    (``full_multiple``: dp x log-prob micro-batch size; dp when micro-batches are dynamic). p_update <= p_total.

    verl pads a step to lcm(dp, ppo_mini_batch_size * rollout.n), which presumes every group has rollout.n
    rows; CalibRL's groups have n or n - k rows (mixing, missing experts) and it updates on a subset (no
    experts), so the subset gets the mini-batch constraint and the whole batch the micro-batch one.
    """
    full_multiple = full_multiple or dp_size
    p_update = (-n_onpolicy) % math.lcm(dp_size, mini_batch_rows)
    p_total = p_update + (-(n_onpolicy + n_expert + p_update)) % full_multiple
    return p_update, p_total


def group_expert_count(uids: np.ndarray, is_expert: torch.Tensor) -> torch.Tensor:
    """For every row, the number of expert rows in its group (0 when the group has none)."""
    gid = core_algos.group_ids(uids)
    n_groups = int(gid.max()) + 1 if gid.numel() else 0
    return torch.zeros(n_groups, dtype=torch.long).index_add_(0, gid, is_expert.long())[gid]


def group_pass_rate(uids: np.ndarray, correct: torch.Tensor, onpolicy: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of its group's on-policy rows that are correct (NaN for groups without any)."""
    gid = core_algos.group_ids(uids)
    n_groups = int(gid.max()) + 1 if gid.numel() else 0
    w = onpolicy.float()
    count = torch.zeros(n_groups).index_add_(0, gid, w)
    hits = torch.zeros(n_groups).index_add_(0, gid, correct.float() * w)
    rate = hits / count
    return rate[gid]


def keep_expert(cfg: CalibRLConfig, rows: StepRows, correct: torch.Tensor) -> torch.Tensor:
    """Per row: does the row's group use its expert this step? (docs/algorithm.md §2; `random`: decided at injection)"""
    has = group_expert_count(rows.uids, rows.is_expert & ~rows.is_padding) > 0
    if cfg.mix_policy != "pass_rate":
        return has
    lo, hi = cfg.pass_rate_range
    rate = group_pass_rate(rows.uids, correct, rows.onpolicy)
    return has & (rate >= lo) & (rate <= hi)


def compute_step_fields(cfg: CalibRLConfig, rows: StepRows) -> StepFields:
    """Advantages, correctness, expert alignment and metrics for one step (docs/algorithm.md §1.4-1.8, §2, §3, §5)."""
    excluded = rows.is_expert | rows.is_padding
    token_rewards = torch.zeros_like(rows.response_mask, dtype=torch.float32)
    token_rewards[:, 0] = rows.scores.float()  # an outcome reward: only its sum matters
    adv, _ = core_algos.compute_calibrl_advantage(token_rewards, rows.response_mask, rows.uids, excluded,
                                                  norm_adv_by_std=cfg.norm_adv_by_std)
    correct = core_algos.correctness_sign(rows.scores, rows.acc, cfg.pass_threshold)
    keep = keep_expert(cfg, rows, correct)
    guided = rows.onpolicy & keep
    active_expert = rows.is_expert & ~rows.is_padding & keep
    # the group's baseline is the mean over its experts (one expert: that expert). Here T spans every row of the
    # step, so each expert is whole; the per-token fields are later cut to each on-policy response's length, which
    # is why the sequence gap's baseline travels as its own per-row value
    gid = core_algos.group_ids(rows.uids)
    base = core_algos.group_expert_baseline(gid, int(gid.max()) + 1 if gid.numel() else 0, active_expert,
                                            rows.response_mask, rows.old_log_probs, cfg.sequence_norm)
    expert_mask = base.token_mask[gid] & guided.unsqueeze(-1)
    expert_log_prob = torch.where(expert_mask, base.token_log_prob[gid], 0.0)
    expert_baseline = torch.where(guided, base.sequence[gid], 0.0)
    if cfg.loss_mode in ("luffy", "rlplus"):
        adv = adv + active_expert_advantage(token_rewards, rows.response_mask, rows.uids, rows.is_expert,
                                            rows.is_padding, active_expert, cfg.norm_adv_by_std)
    return StepFields(adv, expert_log_prob, expert_mask, expert_baseline, correct, active_expert,
                      step_metrics(rows, adv, keep, correct))


def inactive_expert_rows(rows: StepRows, active_expert: torch.Tensor) -> torch.Tensor:
    """Expert rows that stay in a LUFFY / RL-PLUS step but out of its update: their group does not use its expert
    this step (e.g. outside ``pass_rate_range``). (B,) bool.

    Such a row has A = 0, but its tokens would still count in the token-mean denominator and get entropy / KL
    terms. The trainer zeroes both masks verl reads for it, ``response_mask`` (the loss's tokens) and ``loss_mask``
    (the engine's denominator, verl 0.9.1 ``workers/engine/fsdp/transformer_impl.py`` ~730), so it is a no-op
    exactly as verl makes its own padding rows no-ops (``padding_utils.py`` zeroes both masks).
    """
    return rows.is_expert & ~rows.is_padding & ~active_expert


def active_expert_advantage(token_rewards: torch.Tensor, response_mask: torch.Tensor, uids: np.ndarray,
                            is_expert: torch.Tensor, is_padding: torch.Tensor, active: torch.Tensor,
                            norm_adv_by_std: bool, epsilon: float = 1e-6) -> torch.Tensor:
    """A_e on the active expert rows (LUFFY / RL-PLUS), 0 elsewhere; group statistics over real on-policy rows.

    verl's padding rows are removed before the statistics are taken (they carry row 0's reward fields).
    """
    real = ~torch.as_tensor(is_padding).bool()
    out = torch.zeros_like(token_rewards)
    out[real] = core_algos.compute_expert_advantage(
        token_rewards[real], response_mask[real], np.asarray(uids, dtype=object)[real.numpy()],
        torch.as_tensor(is_expert).bool()[real], norm_adv_by_std=norm_adv_by_std, epsilon=epsilon,
    ).to(out.dtype)
    return out * torch.as_tensor(active).bool().unsqueeze(-1).to(out.dtype)


def step_metrics(rows: StepRows, adv: torch.Tensor, keep: torch.Tensor, correct: torch.Tensor) -> dict[str, Any]:
    """docs/algorithm.md §5 trainer-side metrics (the loss adds guide_loss, gate_full_frac and gap_mean)."""
    real = ~rows.is_padding
    groups = np.unique(rows.uids[real.numpy()].astype(str))
    guided_groups = np.unique(rows.uids[(real & keep & rows.onpolicy).numpy()].astype(str))
    experts = rows.is_expert & real
    on = rows.onpolicy
    out: dict[str, Any] = {
        "calibrl/expert_groups_frac": len(guided_groups) / max(len(groups), 1),
        "calibrl/groups_without_expert": float(len(groups) - len(np.unique(rows.uids[experts.numpy()].astype(str)))),
        "calibrl/rareness_mean": float(adv[on].abs().amax(-1).mean()) if on.any() else 0.0,
        "calibrl/onpolicy_acc_mean": float(correct[on].float().mean()) if on.any() else 0.0,
    }
    if experts.any():
        mask = rows.response_mask[experts].float()
        out.update({
            "calibrl/expert_reward_mean": float(rows.scores[experts].float().mean()),
            "calibrl/expert_acc_mean": float(correct[experts].float().mean()),
            "calibrl/expert_logprob_mean": float((rows.old_log_probs[experts] * mask).sum() / mask.sum().clamp(min=1)),
            "calibrl/expert_len_mean": float(mask.sum(-1).mean()),
            "calibrl/expert_truncated_frac": float(rows.expert_truncated[experts].float().mean()),
        })
    return out


def fault_metrics(extra: list[dict], is_padding: list[bool], grad_norm: float | None) -> dict[str, float]:
    """Counted fallbacks of one step (docs/reliability.md), logged every step so a zero is visible too.

    * ``calibrl/reward_faults``: rows (on-policy and expert) whose reward function raised or returned a
      non-finite score and were scored 0 by the reward guard (``integration/reward_guard.py``);
    * ``calibrl/skipped_update``: 1 when verl's engine skipped an optimizer step of this training step because
      the gradient norm was not finite (verl then zeroes the gradients, so no NaN reaches the weights).
    """
    faults = sum(float((e.get("reward_extra_info") or {}).get("reward_fault", 0.0) or 0.0)
                 for e, pad in zip(extra, is_padding, strict=True) if not pad)
    skipped = grad_norm is not None and not math.isfinite(float(grad_norm))
    return {"calibrl/reward_faults": faults, "calibrl/skipped_update": float(skipped)}
