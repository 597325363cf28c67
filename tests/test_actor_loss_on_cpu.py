"""The set_loss_fn actor loss on verl-shaped micro-batches: verl's real ppo_loss + the CalibRL policy loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import NonTensorData, TensorDict
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
from verl.workers.config import FSDPActorConfig, PolicyLossConfig

from calibrl_verl import core_algos as ca
from calibrl_verl.config import CalibRLConfig
from calibrl_verl.integration import actor_loss
from calibrl_verl.integration.actor_loss import calibrl_actor_loss
from calibrl_verl.integration.registry import LOSS_EXTRAS


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _step(seed: int = 0, prompt_lens=(3, 2, 4, 3), resp_lens=(5, 3, 6, 2)):
    """A micro-batch as verl's engine hands it to the loss, plus the same data as padded tensors."""
    gen = torch.Generator().manual_seed(seed)
    b = len(resp_lens)
    width = max(resp_lens)
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(resp_lens).unsqueeze(1)).float()
    padded = {
        "old": -torch.rand(b, width, generator=gen) * mask,
        "adv": torch.randn(b, 1, generator=gen).expand(b, width) * mask,
        "elp": -torch.rand(b, width, generator=gen) * mask,
        "emask": (torch.rand(b, width, generator=gen) > 0.3).float() * mask,
        "correct": (torch.rand(b, generator=gen) > 0.5).float(),
        "mask": mask,
    }
    new_resp = -torch.rand(b, width, generator=gen) * mask  # the current policy's response log-probs
    # the model's log_probs over prompt+response as verl's engine returns them: the log-prob of response token t
    # sits at position prompt_len - 1 + t (left-shifted by one token)
    log_probs = _nested([torch.cat([torch.zeros(p - 1), new_resp[i, :r], torch.zeros(1)])
                         for i, (p, r) in enumerate(zip(prompt_lens, resp_lens, strict=True))])
    per_row = {
        "prompts": _nested([torch.ones(p, dtype=torch.long) for p in prompt_lens]),
        "responses": _nested([torch.ones(r, dtype=torch.long) for r in resp_lens]),
        "response_mask": _nested([mask[i, :r] for i, r in enumerate(resp_lens)]),
        "old_log_probs": _nested([padded["old"][i, :r] for i, r in enumerate(resp_lens)]),
        "advantages": _nested([padded["adv"][i, :r] for i, r in enumerate(resp_lens)]),
        actor_loss.EXPERT_LOG_PROB: _nested([padded["elp"][i, :r] for i, r in enumerate(resp_lens)]),
        actor_loss.EXPERT_MASK: _nested([padded["emask"][i, :r] for i, r in enumerate(resp_lens)]),
        actor_loss.EXPERT_BASELINE: ca.expert_sequence_baseline(padded["elp"], padded["emask"]),
        actor_loss.CORRECT: padded["correct"],
        actor_loss.IS_EXPERT: torch.tensor([0.0, 0.0, 0.0, 1.0]),
    }
    return per_row, log_probs, padded, new_resp


def _data(per_row: dict, rows: slice, batch_num_tokens: float) -> TensorDict:
    td = TensorDict({k: _slice(v, rows) for k, v in per_row.items()}, batch_size=[len(range(4)[rows])])
    td["dp_size"] = NonTensorData(1)
    td["batch_num_tokens"] = NonTensorData(batch_num_tokens)
    td["global_batch_size"] = NonTensorData(4)
    return td


def _slice(value: torch.Tensor, rows: slice) -> torch.Tensor:
    if value.is_nested:
        return _nested(list(value.unbind())[rows])
    return value[rows]


def _config(loss_mode: str) -> FSDPActorConfig:
    return FSDPActorConfig(strategy="fsdp2", rollout_n=4, ppo_mini_batch_size=1, ppo_micro_batch_size_per_gpu=1,
                           policy_loss=PolicyLossConfig(loss_mode=loss_mode), loss_agg_mode="token-mean")


def test_calibrl_actor_loss_equals_ppo_plus_lambda_guide_on_padded_tensors():
    per_row, log_probs, p, new_resp = _step()
    n_tokens = float(p["mask"].sum())
    cfg = CalibRLConfig(guide_coef=0.2, alpha=0.3)
    loss, metrics = calibrl_actor_loss(_config("calibrl"), {"log_probs": log_probs},
                                       _data(per_row, slice(0, 4), n_tokens), calibrl=cfg)
    ref_cfg = _config("vanilla")
    ref_cfg.global_batch_info.update(dp_size=1, batch_num_tokens=n_tokens, global_batch_size=4)
    pg, _ = compute_policy_loss_vanilla(p["old"], new_resp, p["adv"], p["mask"].bool(), config=ref_cfg)
    guide, _ = ca.compute_calibrl_guide_loss(new_resp, p["elp"], p["emask"].bool(), p["adv"], p["correct"].bool(),
                                             p["mask"], alpha=0.3, batch_num_tokens=n_tokens)
    assert loss.item() == pytest.approx(pg.item() + 0.2 * guide.item(), rel=1e-5)
    assert metrics["calibrl/guide_loss"].values == [pytest.approx(guide.item(), rel=1e-5)]
    assert LOSS_EXTRAS.get() is None  # the per-micro-batch inputs do not leak past the call


def test_splitting_a_mini_batch_into_micro_batches_gives_the_same_gradient():
    per_row, log_probs, p, _ = _step(1)
    n_tokens = float(p["mask"].sum())
    cfg = CalibRLConfig()
    lp = log_probs.values().clone().requires_grad_(True)

    def loss_over(rows: slice, values: torch.Tensor) -> torch.Tensor:
        offsets = log_probs.offsets()
        parts = [values[offsets[i]:offsets[i + 1]] for i in range(4)][rows]
        return calibrl_actor_loss(_config("calibrl"), {"log_probs": _nested(parts)},
                                  _data(per_row, rows, n_tokens), calibrl=cfg)[0]

    (g_whole,) = torch.autograd.grad(loss_over(slice(0, 4), lp), lp)
    split = loss_over(slice(0, 1), lp) + loss_over(slice(1, 4), lp)
    (g_split,) = torch.autograd.grad(split, lp)
    torch.testing.assert_close(g_split, g_whole)
    assert g_whole.abs().sum() > 0


@pytest.mark.parametrize("mode", ["calibrl", "luffy", "rlplus"])
def test_loss_term_metrics_do_not_depend_on_the_micro_batch_split(mode):
    """Aggregated the way verl aggregates micro-batch metrics, the logged loss term is the mini-batch mean for
    any split of the rows (a resumed run splits them differently from the uninterrupted one)."""
    from verl.utils.metric import Metric

    per_row, log_probs, p, _ = _step(3)
    n_tokens = float(p["mask"].sum())
    cfg = CalibRLConfig(loss_mode=mode)
    key = "calibrl/guide_loss" if mode == "calibrl" else f"calibrl/{mode}_expert_loss"

    def logged(splits: list[slice]) -> tuple[float, float]:
        merged: dict[str, Metric] = {}
        for rows in splits:
            parts = list(log_probs.unbind())[rows]
            _, metrics = calibrl_actor_loss(_config(mode), {"log_probs": _nested(parts)},
                                            _data(per_row, rows, n_tokens), calibrl=cfg)
            for name in (key, "actor/pg_loss"):
                merged.setdefault(name, Metric(aggregation=metrics[name].aggregation)).extend(metrics[name])
        return merged[key].aggregate(), merged["actor/pg_loss"].aggregate()

    whole = logged([slice(0, 4)])
    assert whole[0] != 0.0
    for splits in ([slice(0, 1), slice(1, 4)], [slice(0, 3), slice(3, 4)], [slice(i, i + 1) for i in range(4)]):
        assert logged(splits) == pytest.approx(whole, rel=1e-5), splits


@pytest.mark.parametrize("mode", ["luffy", "rlplus"])
def test_offpolicy_baselines_read_the_expert_flag_from_the_micro_batch(mode):
    per_row, log_probs, p, new_resp = _step(2)
    n_tokens = float(p["mask"].sum())
    loss, metrics = calibrl_actor_loss(_config(mode), {"log_probs": log_probs}, _data(per_row, slice(0, 4), n_tokens),
                                       calibrl=CalibRLConfig(loss_mode=mode))
    expert = torch.tensor([False, False, False, True]).unsqueeze(-1)
    ref_cfg = _config("vanilla")
    ref_cfg.global_batch_info.update(dp_size=1, batch_num_tokens=n_tokens, global_batch_size=4)
    pg, _ = compute_policy_loss_vanilla(p["old"], new_resp, p["adv"], p["mask"].bool() & ~expert, config=ref_cfg)
    if mode == "luffy":
        token = ca.luffy_expert_token_loss(new_resp, p["adv"])
    else:
        token = ca.rlplus_expert_token_loss(new_resp, p["old"], p["adv"])
    expert_part = (token * p["mask"] * expert).sum() / n_tokens
    assert loss.item() == pytest.approx(pg.item() + expert_part.item(), rel=1e-5)
    assert f"calibrl/{mode}_expert_loss" in metrics


@pytest.mark.parametrize(("norm", "want"), [("sum", (-0.55, 0.825)), ("mean", (0.275, 0.275))])
def test_sequence_gap_compares_with_the_whole_expert_through_the_trainer_fields(norm, want):
    """Trainer fields -> TransferQueue-style nested rows -> the actor loss: S(l^e) covers all of the expert's tokens,
    also for a response shorter than the expert (the per-token fields are cut to the response's length).

    Group: a correct 2-token response (log-probs -1.5, -1.5), a wrong 7-token one (-0.5 each), and a 5-token
    expert summing to -5 (mean -1) whose first two tokens sum to -0.4: comparing with the cut expert would put the
    correct response on the full-push side (d = -3 + 0.4 < 0) instead of the damped one (d = -3 + 5 = 2 > 0).
    """
    from verl.workers.utils.padding import response_to_nested

    from calibrl_verl.integration.step_fields import StepRows, compute_step_fields

    lengths, width = [2, 7, 5], 7
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()
    old = torch.stack([torch.full((width,), -1.5), torch.full((width,), -0.5),
                       torch.tensor([-0.2, -0.2, -2.0, -2.0, -0.6, 0.0, 0.0])]) * mask
    rows = StepRows(uids=np.array(["a", "a", "a"], dtype=object), is_expert=torch.tensor([False, False, True]),
                    is_padding=torch.tensor([False] * 3), scores=torch.tensor([1.1, 0.0, 1.1]), acc=None,
                    response_mask=mask, old_log_probs=old, expert_truncated=torch.tensor([False] * 3))
    cfg = CalibRLConfig(gap="sequence", sequence_norm=norm, alpha=0.5, guide_coef=1.0)
    fields = compute_step_fields(cfg, rows)
    nested_mask = _nested([mask[i, :n] for i, n in enumerate(lengths)])
    stored = {  # what the trainer writes to TransferQueue for every row, as it writes it
        "response_mask": nested_mask,
        "old_log_probs": response_to_nested(old, nested_mask),
        "advantages": response_to_nested(fields.advantages, nested_mask),
        actor_loss.EXPERT_LOG_PROB: response_to_nested(fields.expert_log_prob, nested_mask),
        actor_loss.EXPERT_MASK: response_to_nested(fields.expert_mask.float(), nested_mask),
        actor_loss.EXPERT_BASELINE: fields.expert_baseline.float(),
        actor_loss.CORRECT: fields.correct.float(),
        actor_loss.IS_EXPERT: fields.active_expert.float(),
        "prompts": _nested([torch.ones(2, dtype=torch.long)] * 3),
        "responses": _nested([torch.ones(n, dtype=torch.long) for n in lengths]),
    }
    onpolicy = slice(0, 2)  # the update never sees the expert row
    data = TensorDict({k: _slice(v, onpolicy) for k, v in stored.items()}, batch_size=[2])
    data["dp_size"], data["batch_num_tokens"], data["global_batch_size"] = (NonTensorData(1), NonTensorData(9.0),
                                                                            NonTensorData(2))
    # the current policy equals the old one (one mini-batch, first epoch): log-probs as verl's engine returns them
    log_probs = _nested([torch.cat([torch.zeros(1), old[i, :n], torch.zeros(1)]) for i, n in enumerate(lengths[:2])])
    _, metrics = calibrl_actor_loss(_config("calibrl"), {"log_probs": log_probs}, data, calibrl=cfg)
    # |A| = 0.55 for both rows; g_i = 0.55 * LeakyReLU_0.5(-s_i d_i), averaged over the two responses
    assert metrics["calibrl/guide_loss"].values == [pytest.approx(sum(want) / 2, rel=1e-5)]
    expert_s = -5.0 if norm == "sum" else -1.0
    torch.testing.assert_close(fields.expert_baseline, torch.tensor([expert_s, expert_s, 0.0]))
