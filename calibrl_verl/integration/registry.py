"""Registers CalibRL in verl 0.9.1's registries by name.

- advantage estimator ``calibrl``  (``algorithm.adv_estimator=calibrl``)
- policy losses ``calibrl``, ``luffy``, ``rlplus``  (``actor_rollout_ref.actor.policy_loss.loss_mode=...``)

verl's stock call sites (``compute_advantage``, ``ppo_loss``) pass only their standard arguments. CalibRL
needs more per row (expert flags, the group expert's old log-probs, correctness), which our trainer and
actor loss pass as keyword arguments. Called without them, these functions raise ``CalibRLCallError``
naming what is missing: they never fall back to plain GRPO silently.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, register_adv_est, register_policy_loss

from calibrl_verl import core_algos
from calibrl_verl.config import CalibRLConfig
from calibrl_verl.integration.step_fields import active_expert_advantage

ADV_ESTIMATOR = "calibrl"
POLICY_LOSSES = ("calibrl", "luffy", "rlplus")
_HOW = ("run training through `python -m calibrl_verl.main_calibrl` (trainer `calibrl`), whose trainer and "
        "actor loss pass these per-row tensors")


# Set by ``actor_loss.calibrl_actor_loss`` around verl's ``ppo_loss`` call: the per-micro-batch CalibRL inputs
# that verl's fixed policy-loss call cannot pass. Explicit keyword arguments take precedence.
LOSS_EXTRAS: ContextVar[dict[str, Any] | None] = ContextVar("calibrl_loss_extras", default=None)


# Set by the CalibRL trainer around verl's ``_compute_advantage``: which rows verl's ``compute_advantage``
# must keep out of the group statistics (expert and padding rows), in the order of the step's keys.
ADV_EXTRAS: ContextVar[dict[str, Any] | None] = ContextVar("calibrl_adv_extras", default=None)


def _with_extras(var: ContextVar = LOSS_EXTRAS, **kwargs: Any) -> dict[str, Any]:
    """Explicit keyword arguments, completed from a context variable for the ones the call site left out."""
    extras = var.get() or {}
    return {key: extras.get(key) if value is None else value for key, value in kwargs.items()}


class CalibRLCallError(TypeError):
    """A CalibRL estimator/loss was called by a stock verl call site that lacks CalibRL's per-row inputs."""


def _require(name: str, **tensors: Any) -> None:
    missing = [key for key, value in tensors.items() if value is None]
    if missing:
        raise CalibRLCallError(f"verl called CalibRL's '{name}' without {missing}; {_HOW}.")


@register_adv_est(ADV_ESTIMATOR)
def calibrl_advantage_estimator(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    is_expert: torch.Tensor | None = None,
    norm_adv_by_std: bool = False,
    epsilon: float = 1e-6,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl-signature wrapper of ``core_algos.compute_calibrl_advantage`` (expert rows out of the statistics).

    For the off-policy baselines the trainer also passes ``expert_rows`` (active expert rows), which then get
    their own advantage A_e (``core_algos.compute_expert_advantage``) instead of 0.
    """
    extras = ADV_EXTRAS.get() or {}
    if is_expert is None:
        is_expert = extras.get("is_expert")
        norm_adv_by_std = extras.get("norm_adv_by_std", norm_adv_by_std)
    _require(ADV_ESTIMATOR, index=index, is_expert=is_expert)
    adv, _ = core_algos.compute_calibrl_advantage(
        token_level_rewards, response_mask, index, is_expert, norm_adv_by_std=norm_adv_by_std, epsilon=epsilon
    )
    expert_rows = extras.get("expert_rows")
    if expert_rows is not None:
        adv = adv + active_expert_advantage(token_level_rewards, response_mask, index, is_expert,
                                            extras["is_padding"], expert_rows, norm_adv_by_std, epsilon).to(adv.dtype)
    return adv, adv


def _global_info(config: Any, response_mask: torch.Tensor) -> dict[str, Any]:
    """verl's global normalisation (set by ``ppo_loss`` on the actor config); local counts when absent."""
    info = dict(getattr(config, "global_batch_info", None) or {})
    info.setdefault("dp_size", 1)
    if info.get("batch_num_tokens") is None:
        info["batch_num_tokens"] = response_mask.sum()
    return info


def _ppo_surrogate(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config, rollout_is_weights, info):
    """verl's own clipped (dual-clip) PPO surrogate, restricted to ``mask`` (the on-policy tokens).

    It normalises by ``config.global_batch_info``; ``info`` is put there for the call (and restored after) so
    the surrogate and our extra terms always share one denominator, also when verl has not set one.
    """
    saved = dict(config.global_batch_info)
    config.global_batch_info.update(info)
    try:
        return compute_policy_loss_vanilla(
            old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=mask,
            loss_agg_mode=loss_agg_mode, config=config, rollout_is_weights=rollout_is_weights,
        )
    finally:
        config.global_batch_info.clear()
        config.global_batch_info.update(saved)


@register_policy_loss("calibrl")
def calibrl_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    expert_log_prob: torch.Tensor | None = None,
    expert_mask: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
    calibrl: CalibRLConfig | None = None,
    expert_baseline: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """L = L_pg + guide_coef * L_guide over on-policy rows (docs/algorithm.md §1.7); expert rows are not passed in.

    ``expert_baseline`` (B,): S(l^e) over the whole group expert, which the sequence gap needs (the per-token
    expert fields are cut to each on-policy response's length); the trainer always passes it.
    """
    got = _with_extras(expert_log_prob=expert_log_prob, expert_mask=expert_mask, correct=correct, calibrl=calibrl,
                       expert_baseline=expert_baseline)
    expert_log_prob, expert_mask, correct, calibrl = (got["expert_log_prob"], got["expert_mask"], got["correct"],
                                                      got["calibrl"])
    if calibrl is not None and calibrl.gap == "sequence":
        _require("calibrl (gap=sequence)", expert_baseline=got["expert_baseline"])
    _require("calibrl", expert_log_prob=expert_log_prob, expert_mask=expert_mask, correct=correct, calibrl=calibrl)
    info = _global_info(config, response_mask)
    pg_loss, metrics = _ppo_surrogate(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                      rollout_is_weights, info)
    guide, guide_metrics = core_algos.compute_calibrl_guide_loss(
        log_prob, expert_log_prob, expert_mask, advantages, correct, response_mask,
        alpha=calibrl.alpha, gap=calibrl.gap, tail=calibrl.tail, sequence_norm=calibrl.sequence_norm,
        loss_agg_mode=loss_agg_mode, expert_baseline=got["expert_baseline"],
        all_wrong_weight=calibrl.all_wrong_weight, **info,
    )
    # this micro-batch's share of the mini-batch mean (normalised like pg_loss); actor_loss aggregates it like
    # verl aggregates pg_loss, so the logged value does not depend on how rows were split into micro-batches
    metrics["calibrl/guide_loss"] = float(guide.detach())
    # rareness_mean is logged by the trainer over the whole step; the rest only the loss can see
    metrics.update({f"calibrl/{k}": v for k, v in guide_metrics.items() if k != "rareness_mean"})
    return pg_loss + calibrl.guide_coef * guide, metrics


def _offpolicy_loss(name, token_loss_fn, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                    rollout_is_weights, is_expert):
    """On-policy tokens: verl's PPO surrogate. Expert tokens: ``token_loss_fn``. One shared denominator."""
    is_expert = _with_extras(is_expert=is_expert)["is_expert"]
    _require(name, is_expert=is_expert)
    expert_rows = torch.as_tensor(is_expert, dtype=torch.bool, device=response_mask.device).reshape(-1, 1)
    mask = response_mask.bool()
    info = _global_info(config, response_mask)
    pg_loss, metrics = _ppo_surrogate(old_log_prob, log_prob, advantages, mask & ~expert_rows, loss_agg_mode,
                                      config, rollout_is_weights, info)
    expert_loss = core_algos.aggregate_loss(token_loss_fn(), mask & expert_rows, loss_agg_mode, **info)
    metrics[f"calibrl/{name}_expert_loss"] = float(expert_loss.detach())  # a share, like guide_loss
    return pg_loss + expert_loss, metrics


@register_policy_loss("luffy")
def luffy_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                      rollout_is_weights=None, *, is_expert=None, **_: Any):
    """LUFFY baseline (docs/algorithm.md §3): PPO on on-policy tokens + shaped -A_e * p/(p+0.1) on expert tokens."""
    return _offpolicy_loss("luffy", lambda: core_algos.luffy_expert_token_loss(log_prob, advantages),
                           old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                           rollout_is_weights, is_expert)


@register_policy_loss("rlplus")
def rlplus_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                       rollout_is_weights=None, *, is_expert=None, **_: Any):
    """RL-PLUS baseline (docs/algorithm.md §3): PPO on on-policy tokens + -A p/(0.75 p_old + 0.25) (1-p)^0.5 on
    expert tokens."""
    return _offpolicy_loss("rlplus",
                           lambda: core_algos.rlplus_expert_token_loss(log_prob, old_log_prob, advantages),
                           old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                           rollout_is_weights, is_expert)
