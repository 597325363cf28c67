"""LUFFY / RL-PLUS with ``mix_policy: pass_rate``: an inactive expert row is a no-op in verl's update.

verl 0.9.1's loss sums over ``response_mask`` and its FSDP engine divides by the sum of ``loss_mask`` over the
mini-batch (``workers/engine/fsdp/transformer_impl.py`` ~730: ``batch_num_tokens = data["loss_mask"].sum()``), two
fields written at rollout. The trainer's advantage-stage put must zero both for a group that does not use its expert.
The update here is verl's real ``ppo_loss`` (through ``calibrl_actor_loss``) on the fields that put writes; the
expected loss is written out by hand from the specification.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tensordict import NonTensorData, TensorDict
from verl.workers.config import FSDPActorConfig, PolicyLossConfig

from calibrl_verl.config import CalibRLConfig
from calibrl_verl.integration import actor_loss
from calibrl_verl.integration.step_fields import StepRows, compute_step_fields
from calibrl_verl.integration.trainer import CalibRLTrainer

# two groups of 4 on-policy rows + 1 expert; group a (pass rate 1/2) uses its expert, group b (pass rate 1) does not
SCORES = [1.1, 0.0, 1.1, 0.0, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1]
UIDS = ["a"] * 5 + ["b"] * 5
EXPERT = [False] * 4 + [True] + [False] * 4 + [True]
LENGTHS = [7, 5, 6, 4, 8, 3, 6, 5, 7, 9]


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _rows() -> StepRows:
    width = max(LENGTHS)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).float()
    old = -torch.rand(len(SCORES), width, generator=torch.Generator().manual_seed(0)) * 2 * mask
    scores = torch.tensor(SCORES)
    return StepRows(uids=np.array(UIDS, dtype=object), is_expert=torch.tensor(EXPERT),
                    is_padding=torch.zeros(len(SCORES), dtype=torch.bool), scores=scores, acc=(scores > 1).float(),
                    response_mask=mask, old_log_probs=old, expert_truncated=torch.zeros(len(SCORES), dtype=torch.bool))


def _advantage_put(mode: str, rows: StepRows) -> tuple[TensorDict, dict]:
    """The trainer's advantage-stage outputs on verl's put of advantages (``_advantage_outputs``)."""
    trainer = object.__new__(CalibRLTrainer)
    trainer.calibrl = CalibRLConfig(loss_mode=mode, mix_policy="pass_rate", pass_rate_range=(0.0, 0.75))
    fields = compute_step_fields(trainer.calibrl, rows)
    masks = [rows.response_mask[i, :n] for i, n in enumerate(LENGTHS)]
    metrics: dict = {}
    stage = {"rows": rows, "fields": fields, "metrics": metrics, "response_mask": _nested(masks),
             "loss_mask": _nested([m.long() for m in masks])}  # verl's rollout writes loss_mask = response_mask
    put = TensorDict({"advantages": _nested([fields.advantages[i, :n] for i, n in enumerate(LENGTHS)])},
                     batch_size=[len(LENGTHS)])
    return trainer._advantage_outputs(stage, put), metrics


def _update_loss(mode: str, rows: StepRows, put: TensorDict) -> float:
    """verl's ppo_loss on the whole step as one micro-batch, normalised as verl's engine does (sum of loss_mask);
    the current policy equals the old one (first PPO mini-batch), so every ratio is 1."""
    n = len(LENGTHS)
    data = TensorDict({
        "prompts": _nested([torch.ones(2, dtype=torch.long)] * n),
        "responses": _nested([torch.ones(k, dtype=torch.long) for k in LENGTHS]),
        "old_log_probs": _nested([rows.old_log_probs[i, :k] for i, k in enumerate(LENGTHS)]),
        **{key: put[key] for key in put.keys()},
    }, batch_size=[n])
    data["dp_size"] = NonTensorData(1)
    data["batch_num_tokens"] = NonTensorData(float(data["loss_mask"].values().sum()))  # the engine's denominator
    data["global_batch_size"] = NonTensorData(n)
    log_probs = _nested([torch.cat([torch.zeros(1), rows.old_log_probs[i, :k], torch.zeros(1)])
                         for i, k in enumerate(LENGTHS)])  # response token t sits at prompt_len - 1 + t
    config = FSDPActorConfig(strategy="fsdp2", rollout_n=5, ppo_mini_batch_size=1, ppo_micro_batch_size_per_gpu=1,
                             policy_loss=PolicyLossConfig(loss_mode=mode), loss_agg_mode="token-mean")
    cfg = CalibRLConfig(loss_mode=mode)
    loss, _ = actor_loss.calibrl_actor_loss(config, {"log_probs": log_probs}, data, calibrl=cfg)
    return float(loss)


def _reference_loss(mode: str, rows: StepRows) -> float:
    """By hand: group a's on-policy mean is 0.55 (rewards 1.1, 0, 1.1, 0), so A = +-0.55 and its expert's
    A_e = 1.1 - 0.55 = 0.55; group b is all correct (A = 0) and outside the pass-rate range, so its expert row counts
    nowhere. Per on-policy token the PPO term at ratio 1 is -A; per active expert token LUFFY's is -A_e p/(p + 0.1)
    and RL-PLUS's -A_e p/(0.75 p + 0.25) (1 - p)^0.5 with p = p_old. Token-mean over the tokens the update counts."""
    total, tokens = 0.0, 0
    for i in range(len(SCORES)):
        if UIDS[i] == "b" and EXPERT[i]:
            continue  # the inactive expert row
        tokens += LENGTHS[i]
        if UIDS[i] == "b":
            continue  # A = 0
        adv = 0.55 if SCORES[i] > 1 else -0.55
        for t in range(LENGTHS[i]):
            if not EXPERT[i]:
                total += -adv
                continue
            p = math.exp(float(rows.old_log_probs[i, t]))
            total += -adv * (p / (p + 0.1) if mode == "luffy" else p / (0.75 * p + 0.25) * (1 - p) ** 0.5)
    return total / tokens


@pytest.mark.parametrize("mode", ["luffy", "rlplus"])
def test_an_inactive_expert_row_counts_in_no_mask_verl_normalises_with(mode):
    rows = _rows()
    put, metrics = _advantage_put(mode, rows)
    loss_mask = put["loss_mask"].to_padded_tensor(padding=0)
    response_mask = put["response_mask"].to_padded_tensor(padding=0)
    assert loss_mask[9].sum() == 0 and response_mask[9].sum() == 0  # group b's expert: a no-op
    assert loss_mask.sum(-1).tolist()[:9] == LENGTHS[:9]  # every other row keeps its tokens
    assert loss_mask.sum() == sum(LENGTHS) - LENGTHS[9]  # the engine's denominator: 55 tokens, not 64
    assert metrics["calibrl/inactive_expert_rows"] == 1.0
    assert _update_loss(mode, rows, put) == pytest.approx(_reference_loss(mode, rows), rel=1e-5)
