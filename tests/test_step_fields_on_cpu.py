"""The trainer's per-step CalibRL fields (integration.step_fields) on real step-shaped tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrl_verl import core_algos as ca
from calibrl_verl.config import CalibRLConfig
from calibrl_verl.integration.step_fields import (
    StepRows,
    compute_step_fields,
    first_expert_row,
    update_padding,
)


def _rows(scores, uids, expert, padding=None, lengths=None, acc=None, truncated=None, width=6, seed=0) -> StepRows:
    n = len(scores)
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or [width] * n
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()
    return StepRows(
        uids=np.array(uids, dtype=object), is_expert=torch.tensor(expert),
        is_padding=torch.tensor(padding or [False] * n), scores=torch.tensor(scores, dtype=torch.float32),
        acc=None if acc is None else torch.tensor(acc, dtype=torch.float32), response_mask=mask,
        old_log_probs=-torch.rand(n, width, generator=gen) * mask,
        expert_truncated=torch.tensor(truncated or [False] * n),
    )


def test_each_onpolicy_row_gets_its_own_groups_expert_log_probs_position_aligned():
    rows = _rows([1.1, 0.0, 1.1, 0.1, 1.1, 0.0, 0.0, 1.1],
                 ["a", "a", "a", "b", "b", "b", "c", "c"],
                 [False, False, True, False, False, True, False, False],
                 lengths=[6, 6, 3, 6, 2, 5, 6, 6])
    f = compute_step_fields(CalibRLConfig(), rows)
    for i, expert in ((0, 2), (1, 2), (3, 5), (4, 5)):
        want = rows.old_log_probs[expert] * rows.response_mask[expert]
        torch.testing.assert_close(f.expert_log_prob[i], want)
        assert torch.equal(f.expert_mask[i], rows.response_mask[expert].bool())
    # group c has no expert, expert rows themselves carry nothing
    for i in (2, 5, 6, 7):
        assert not f.expert_mask[i].any() and f.expert_log_prob[i].abs().sum() == 0
    assert f.metrics["calibrl/expert_groups_frac"] == pytest.approx(2 / 3)
    assert f.metrics["calibrl/groups_without_expert"] == 1.0


def test_advantages_exclude_experts_and_padding_from_group_statistics():
    # the padding row copies row 0's uid (verl does that): it must not change group a's mean
    rows = _rows([1.0, 0.0, 0.0, 1.1, 1.0], ["a", "a", "a", "a", "a"], [False, False, False, True, False],
                 padding=[False, False, False, False, True])
    f = compute_step_fields(CalibRLConfig(), rows)
    torch.testing.assert_close(f.advantages[:, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0]))


def test_correctness_uses_acc_when_the_reward_returns_it():
    rows = _rows([1.1, 0.1, 0.1], ["a"] * 3, [False] * 3, acc=[1.0, 0.0, 1.0])
    assert compute_step_fields(CalibRLConfig(), rows).correct.tolist() == [True, False, True]
    rows = _rows([1.1, 0.1, 0.2], ["a"] * 3, [False] * 3)
    assert compute_step_fields(CalibRLConfig(), rows).correct.tolist() == [True, False, True]


def test_pass_rate_mixing_switches_the_expert_off_outside_the_range():
    # group a: pass rate 1/3 (kept by [0.2, 0.6]); group b: pass rate 1.0 (expert ignored)
    rows = _rows([1.1, 0.0, 0.0, 1.1, 1.1, 1.1, 1.1, 1.1], ["a", "a", "a", "a", "b", "b", "b", "b"],
                 [False, False, False, True, False, False, False, True])
    f = compute_step_fields(CalibRLConfig(mix_policy="pass_rate", pass_rate_range=(0.2, 0.6)), rows)
    assert f.expert_mask[:3].any(-1).all() and not f.expert_mask[4:7].any()
    assert f.active_expert.tolist() == [False, False, False, True, False, False, False, False]
    assert f.metrics["calibrl/expert_groups_frac"] == 0.5


def test_offpolicy_baselines_give_active_expert_rows_their_advantage():
    rows = _rows([1.0, 0.0, 0.0, 1.1], ["a"] * 4, [False, False, False, True])
    f = compute_step_fields(CalibRLConfig(loss_mode="luffy"), rows)
    assert f.advantages[3, 0].item() == pytest.approx(1.1 - 1 / 3)
    assert compute_step_fields(CalibRLConfig(), rows).advantages[3].abs().sum() == 0


def test_expert_metrics_describe_the_expert_rows_only():
    rows = _rows([1.0, 0.0, 1.1, 0.1], ["a", "a", "a", "b"], [False, False, True, True], lengths=[6, 6, 4, 2],
                 truncated=[False, False, True, False])
    m = compute_step_fields(CalibRLConfig(), rows).metrics
    assert m["calibrl/expert_reward_mean"] == pytest.approx(0.6)
    assert m["calibrl/expert_len_mean"] == pytest.approx(3.0)
    assert m["calibrl/expert_truncated_frac"] == pytest.approx(0.5)
    mask = rows.response_mask[2:]
    want = (rows.old_log_probs[2:] * mask).sum() / mask.sum()
    assert m["calibrl/expert_logprob_mean"] == pytest.approx(want.item())
    assert m["calibrl/rareness_mean"] == pytest.approx(0.5)


def test_first_expert_row_per_group():
    got = first_expert_row(np.array(["x", "y", "x", "x", "y"], dtype=object),
                           torch.tensor([False, False, True, True, False]))
    assert got.tolist() == [2, -1, 2, 2, -1]


@pytest.mark.parametrize("n_on,n_exp,dp,mini,micro", [(40, 4, 1, 20, 1), (40, 3, 4, 20, 2), (37, 4, 8, 16, 1),
                                                      (10, 0, 2, 10, 1), (16, 4, 1, 16, 8), (4800, 470, 8, 1200, 4)])
def test_update_padding_fills_mini_batches_and_micro_batches(n_on, n_exp, dp, mini, micro):
    p_update, p_total = update_padding(n_on, n_exp, dp, mini, dp * micro)
    assert 0 <= p_update <= p_total
    assert (n_on + p_update) % mini == 0 and (n_on + p_update) % dp == 0
    assert (n_on + n_exp + p_total) % (dp * micro) == 0
    assert p_update < np.lcm(dp, mini) and p_total - p_update < dp * micro


def test_guide_loss_on_step_fields_matches_core_algos_directly():
    """The fields the trainer stores are exactly the inputs core_algos' guide loss expects."""
    rows = _rows([1.1, 0.0, 0.1, 1.1], ["a"] * 4, [False, False, False, True], lengths=[6, 4, 5, 3])
    f = compute_step_fields(CalibRLConfig(), rows)
    on = ~rows.is_expert
    log_prob = -torch.rand(3, 6)
    loss, m = ca.compute_calibrl_guide_loss(log_prob, f.expert_log_prob[on], f.expert_mask[on], f.advantages[on],
                                            f.correct[on], rows.response_mask[on])
    expert = rows.old_log_probs[3]
    g = []
    for i in range(3):
        s = 1.0 if f.correct[on][i] else -1.0
        a = f.advantages[on][i, 0].abs()
        for t in range(int(rows.response_mask[on][i].sum())):
            le = expert[t] if t < 3 else 0.0  # tail: zero
            d = log_prob[i, t] - le
            g.append(a * torch.nn.functional.leaky_relu(-s * d, 0.5))
    assert loss.item() == pytest.approx((sum(g) / rows.response_mask[on].sum()).item(), rel=1e-5)
    assert m["guided_frac"] == 1.0
