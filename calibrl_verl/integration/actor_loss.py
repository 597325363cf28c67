"""The actor loss installed with verl's ``set_loss_fn``: verl's own ``ppo_loss`` with CalibRL's per-row inputs.

verl 0.9.1's ``ppo_loss`` (verl/workers/utils/losses.py) calls the registered policy loss with a fixed set of
arguments, so a registered loss cannot see the expert log-probs, expert mask, correctness or expert flags
the CalibRL trainer stored with each row. Rather than re-writing ``ppo_loss`` (entropy bonus, KL loss,
global normalisation, metric aggregation), ``calibrl_actor_loss`` wraps it: it reads our fields from the
micro-batch, exposes them for the duration of the call through ``registry.LOSS_EXTRAS`` and lets verl's
``ppo_loss`` run unchanged; the registered ``calibrl`` / ``luffy`` / ``rlplus`` loss picks them up there.
This is the one place where verl's loss API is too narrow for us.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from verl.utils.metric import Metric
from verl.workers.utils.losses import ppo_loss

from calibrl_verl.config import CalibRLConfig
from calibrl_verl.integration.registry import LOSS_EXTRAS

# TransferQueue fields the CalibRL trainer writes for every row (see integration.trainer).
EXPERT_LOG_PROB = "calibrl_expert_log_prob"  # nested, response-aligned
EXPERT_MASK = "calibrl_expert_mask"  # nested, response-aligned
EXPERT_BASELINE = "calibrl_expert_baseline"  # (B,): S(l^e) over the whole expert, for the sequence gap
CORRECT = "calibrl_correct"  # (B,)
IS_EXPERT = "calibrl_is_expert"  # (B,): an active expert row (trained on by luffy / rlplus only)
# loss-term metrics holding a micro-batch's share of the mini-batch mean (see aggregate_like_pg_loss)
LOSS_SHARE_METRICS = ("calibrl/guide_loss", "calibrl/luffy_expert_loss", "calibrl/rlplus_expert_loss")


def micro_batch_extras(data: TensorDict, cfg: CalibRLConfig) -> dict[str, Any]:
    """The registered loss's keyword arguments for this micro-batch, padded like verl pads ``old_log_probs``."""
    if cfg.loss_mode == "calibrl":
        padded = data.select(EXPERT_LOG_PROB, EXPERT_MASK).to_padded_tensor()
        return {
            "expert_log_prob": padded[EXPERT_LOG_PROB].float(),
            "expert_mask": padded[EXPERT_MASK].bool(),
            "correct": torch.as_tensor(data[CORRECT]).bool().reshape(-1),
            "expert_baseline": torch.as_tensor(data[EXPERT_BASELINE]).float().reshape(-1),
            "calibrl": cfg,
        }
    return {"is_expert": torch.as_tensor(data[IS_EXPERT]).bool().reshape(-1)}


def calibrl_actor_loss(config: Any, model_output: dict, data: TensorDict, dp_group: Any = None, *,
                       calibrl: CalibRLConfig) -> tuple[torch.Tensor, dict]:
    """verl's ``ppo_loss`` with the CalibRL policy loss (``policy_loss.loss_mode`` = calibrl/luffy/rlplus)."""
    token = LOSS_EXTRAS.set(micro_batch_extras(data, calibrl))
    try:
        loss, metrics = ppo_loss(config, model_output, data, dp_group)
    finally:
        LOSS_EXTRAS.reset(token)
    aggregate_like_pg_loss(metrics)
    return loss, metrics


def aggregate_like_pg_loss(metrics: dict[str, Any]) -> None:
    """Give our loss-term metrics the aggregation verl gives ``actor/pg_loss``.

    verl wraps every metric a policy loss returns as a per-micro-batch MEAN. Our loss terms are normalised like
    ``pg_loss`` (by the mini-batch's token / response count), so each micro-batch holds a share of the
    mini-batch mean and verl's rule for ``pg_loss`` applies: SUM the shares under global normalisation. The
    logged value is then the mini-batch mean, whatever the micro-batch split (a resumed run splits rows
    differently from the uninterrupted one).
    """
    pg = metrics.get("actor/pg_loss")
    if not isinstance(pg, Metric):
        return
    for key in LOSS_SHARE_METRICS:
        if isinstance(metrics.get(key), Metric):
            shares = Metric(aggregation=pg.aggregation)
            shares.extend(list(metrics[key].values))
            metrics[key] = shares
