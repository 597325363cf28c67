"""Hand-computed checks of every CalibRL equation in calibrl_verl.core_algos (docs/algorithm.md §1, §3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from calibrl_verl import core_algos as ca

FLOOR = -20.0  # the specification's per-token log-prob floor (p < 2e-9 counts as 2e-9), written out here


def _rewards(scores: list[float], length: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome rewards as verl stores them: the score on the last response token."""
    rewards = torch.zeros(len(scores), length)
    rewards[:, -1] = torch.tensor(scores)
    return rewards, torch.ones(len(scores), length)


# ---------------------------------------------------------------------------------------------- advantage
def test_advantage_hand_case_excludes_expert_from_group_stats():
    rewards, mask = _rewards([1.1, 0.1, 0.1, 0.0, 1.1, 1.0, 0.0])
    index = np.array(["a", "a", "a", "a", "a", "b", "b"], dtype=object)
    is_expert = torch.tensor([False, False, False, False, True, False, True])
    adv, ret = ca.compute_calibrl_advantage(rewards, mask, index, is_expert)
    mean_a = (1.1 + 0.1 + 0.1 + 0.0) / 4
    expected = [1.1 - mean_a, 0.1 - mean_a, 0.1 - mean_a, 0.0 - mean_a, 0.0, 1.0, 0.0]
    torch.testing.assert_close(adv[:, 0], torch.tensor(expected))
    assert torch.equal(adv, ret)
    # Group b has one on-policy row: verl's GRPO convention (mean 0) gives it its own reward.
    assert adv[5, 0].item() == pytest.approx(1.0)


def test_expert_rows_never_change_group_statistics():
    rewards, mask = _rewards([1.0, 0.0, 0.0, 1.0])
    index = np.array(["g"] * 4, dtype=object)
    without, _ = ca.compute_calibrl_advantage(rewards, mask, index, torch.zeros(4, dtype=torch.bool), True)
    for expert_reward in (0.0, 1.1, -5.0):
        r2, m2 = _rewards([1.0, 0.0, 0.0, 1.0, expert_reward])
        with_expert, _ = ca.compute_calibrl_advantage(
            r2, m2, np.array(["g"] * 5, dtype=object), torch.tensor([False] * 4 + [True]), True
        )
        torch.testing.assert_close(with_expert[:4], without)
        assert with_expert[4].abs().sum() == 0


def test_rareness_is_one_minus_pass_rate_for_correct_and_pass_rate_for_wrong():
    rewards, mask = _rewards([1.0, 1.0, 1.0, 0.0])  # pass rate p = 0.75
    adv, _ = ca.compute_calibrl_advantage(rewards, mask, np.array(["q"] * 4, dtype=object), torch.zeros(4).bool())
    torch.testing.assert_close(adv[:, 0].abs(), torch.tensor([0.25, 0.25, 0.25, 0.75]))


@pytest.mark.parametrize("norm", [False, True])
def test_all_equal_groups_get_zero_advantage(norm):
    rewards, mask = _rewards([1.1, 1.1, 1.1, 0.3, 0.3, 0.3])
    index = np.array(["x"] * 3 + ["y"] * 3, dtype=object)
    adv, _ = ca.compute_calibrl_advantage(rewards, mask, index, torch.zeros(6).bool(), norm_adv_by_std=norm)
    assert torch.count_nonzero(adv) == 0


@pytest.mark.parametrize("norm", [False, True])
def test_matches_verl_grpo_when_there_is_no_expert(norm):
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 2, (40,), generator=gen).float() + 0.1 * torch.randint(0, 2, (40,), generator=gen)
    rewards, mask = _rewards(scores.tolist(), length=5)
    mask[:, 3:] = 0
    index = np.array([f"u{i // 5}" for i in range(40)], dtype=object)
    ours, _ = ca.compute_calibrl_advantage(rewards, mask, index, torch.zeros(40).bool(), norm_adv_by_std=norm)
    theirs, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_std_normalisation_uses_unbiased_std_of_onpolicy_rows():
    rewards, mask = _rewards([1.0, 0.0, 0.0, 9.0])
    adv, _ = ca.compute_calibrl_advantage(
        rewards, mask, np.array(["g"] * 4, dtype=object), torch.tensor([False, False, False, True]), True
    )
    std = torch.tensor([1.0, 0.0, 0.0]).std().item()
    assert adv[0, 0].item() == pytest.approx((1 - 1 / 3) / (std + 1e-6), rel=1e-5)


def test_empty_batch_and_groups_with_only_an_expert():
    empty, _ = ca.compute_calibrl_advantage(torch.zeros(0, 4), torch.zeros(0, 4), np.array([], dtype=object),
                                            torch.zeros(0).bool())
    assert empty.shape == (0, 4)
    rewards, mask = _rewards([1.1])
    adv, _ = ca.compute_calibrl_advantage(rewards, mask, np.array(["e"], dtype=object), torch.tensor([True]))
    assert adv.abs().sum() == 0 and torch.isfinite(adv).all()


def test_expert_advantage_for_offpolicy_baselines():
    rewards, mask = _rewards([1.0, 0.0, 0.0, 1.1])
    index = np.array(["g"] * 4, dtype=object)
    is_expert = torch.tensor([False, False, False, True])
    adv = ca.compute_expert_advantage(rewards, mask, index, is_expert)
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.0, 0.0, 0.0, 1.1 - 1 / 3]))
    adv_n = ca.compute_expert_advantage(rewards, mask, index, is_expert, norm_adv_by_std=True)
    std = torch.tensor([1.0, 0.0, 0.0]).std().item()
    assert adv_n[3, 0].item() == pytest.approx((1.1 - 1 / 3) / (std + 1e-6), rel=1e-5)


@pytest.mark.parametrize("norm", [False, True])
def test_expert_advantage_never_divides_by_a_zero_onpolicy_std(norm):
    """LUFFY's rule (mix_core_alg.py, compute_grpo_outcome_advantage_split): on-policy statistics only, and a
    group whose on-policy rewards are all equal gets std 1, so the expert row's advantage stays bounded."""
    groups = {  # uid: (on-policy rewards, expert reward)
        "zero": ([0.0, 0.0, 0.0], 1.1),  # the reported case: 1.1 / (0 + 1e-6) = 1.1e6 before the fix
        "flat": ([1.1] * 10, 0.0),  # float32 gives these a std of ~1e-7, not 0
        "normal": ([1.0, 0.0, 0.0, 0.1], 1.1),
        "single": ([1.0], 0.1),  # one on-policy row: mean 0, std 1
        "alone": ([], 1.1),  # no on-policy row: mean 0, std 1
    }
    scores, uids, expert = [], [], []
    for uid, (onpolicy, r_e) in groups.items():
        scores += onpolicy + [r_e]
        uids += [uid] * (len(onpolicy) + 1)
        expert += [False] * len(onpolicy) + [True]
    rewards, mask = _rewards(scores)
    adv = ca.compute_expert_advantage(rewards, mask, np.array(uids, dtype=object), torch.tensor(expert),
                                      norm_adv_by_std=norm)
    normal = [1.0, 0.0, 0.0, 0.1]
    mean_n = sum(normal) / 4  # 0.275
    std_n = math.sqrt(sum((x - mean_n) ** 2 for x in normal) / 3)  # unbiased: 0.48563...
    if norm:
        want = {"zero": 1.1 / (1 + 1e-6), "flat": -1.1 / (1 + 1e-6), "normal": (1.1 - mean_n) / (std_n + 1e-6),
                "single": 0.1 / (1 + 1e-6), "alone": 1.1 / (1 + 1e-6)}
    else:
        want = {"zero": 1.1, "flat": -1.1, "normal": 1.1 - mean_n, "single": 0.1, "alone": 1.1}
    expected = [want[u] if e else 0.0 for u, e in zip(uids, expert, strict=True)]
    torch.testing.assert_close(adv[:, 0], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert adv.abs().max() < 2.0
    # CalibRL's own advantage is unchanged: all-equal groups give 0, expert rows give 0
    own, _ = ca.compute_calibrl_advantage(rewards, mask, np.array(uids, dtype=object), torch.tensor(expert),
                                          norm_adv_by_std=norm)
    assert own[[i for i, u in enumerate(uids) if u in ("zero", "flat", "alone")]].abs().sum() == 0


def test_correctness_prefers_acc_field_then_threshold():
    scores = torch.tensor([1.1, 0.1, 0.2, 1.0])
    assert ca.correctness_sign(scores).tolist() == [True, False, True, True]
    assert ca.correctness_sign(scores, pass_threshold=0.5).tolist() == [True, False, False, True]
    acc = torch.tensor([1.0, 0.0, 0.0, float("nan")])
    assert ca.correctness_sign(scores, acc=acc).tolist() == [True, False, False, False]


# ---------------------------------------------------------------------------------------------- gate
@pytest.mark.parametrize(
    "correct,gap,slope",
    [(True, -1.0, 1.0), (True, 1.0, 0.5), (False, 1.0, 1.0), (False, -1.0, 0.5)],
)
def test_gradient_direction_and_slope_of_the_gate(correct, gap, slope):
    """Correct below the expert: full push up; above it: damped to alpha. Mirrored for wrong responses."""
    log_prob = torch.tensor([[-2.0 + gap]], requires_grad=True)
    loss, metrics = ca.compute_calibrl_guide_loss(
        log_prob, torch.tensor([[-2.0]]), torch.tensor([[True]]), torch.tensor([[0.6]]),
        torch.tensor([correct]), torch.ones(1, 1), alpha=0.5,
    )
    loss.backward()
    direction = -1.0 if correct else 1.0  # d loss / d log_prob: negative = the update raises log-prob
    assert log_prob.grad.item() == pytest.approx(direction * slope * 0.6)
    assert metrics["gate_full_frac"] == (1.0 if slope == 1.0 else 0.0)
    assert metrics["gap_mean"] == pytest.approx(gap)
    assert metrics["rareness_mean"] == pytest.approx(0.6)


def test_token_mode_hand_case_with_tail_zero_and_mask():
    log_prob = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]])
    expert = torch.tensor([[-1.5, -1.0, 0.0], [-1.5, -1.0, 0.0]])
    emask = torch.tensor([[True, True, False], [True, True, False]])
    adv = torch.tensor([[0.5] * 3, [-0.25] * 3])
    correct = torch.tensor([True, False])
    resp = torch.ones(2, 3)
    a = 0.5

    def gate(x):
        return x if x > 0 else a * x

    # row 0 (correct, |A|=.5): d = [.5, -1, -3] (tail zero: l^e = 0);  row 1 (wrong, |A|=.25): d = [1, .5, -4]
    g0 = [0.5 * gate(-d) for d in (0.5, -1.0, -3.0)]
    g1 = [0.25 * gate(d) for d in (1.0, 0.5, -4.0)]
    loss, m = ca.compute_calibrl_guide_loss(log_prob, expert, emask, adv, correct, resp, alpha=a, tail="zero")
    assert loss.item() == pytest.approx((sum(g0) + sum(g1)) / 6)
    assert m["gate_full_frac"] == pytest.approx(4 / 6)
    loss_m, m_m = ca.compute_calibrl_guide_loss(log_prob, expert, emask, adv, correct, resp, alpha=a, tail="mask")
    # tail="mask" drops the third token from the sum but the denominator is still every response token.
    assert loss_m.item() == pytest.approx((sum(g0[:2]) + sum(g1[:2])) / 6)
    assert m_m["gate_full_frac"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("gap", ["token", "sequence"])
def test_all_wrong_weight_guides_only_wrong_rows_without_outcome_signal(gap):
    """calibrl.all_wrong_weight w: a wrong row with A = 0 (its group all wrong) is weighted w instead of |A| = 0;
    a correct row with A = 0 (all correct) keeps 0; rows with A != 0 keep |A|. Hand values, token-mean."""
    # rows: wrong A=0 | correct A=0 | wrong A=-0.5; each one token, 1 nat above the expert's -2
    log_prob = torch.tensor([[-1.0], [-1.0], [-1.0]], requires_grad=True)
    expert, emask = torch.full((3, 1), -2.0), torch.ones(3, 1, dtype=torch.bool)
    adv = torch.tensor([[0.0], [0.0], [-0.5]])
    correct = torch.tensor([False, True, False])
    paper, _ = ca.compute_calibrl_guide_loss(log_prob, expert, emask, adv, correct, torch.ones(3, 1), gap=gap)
    # wrong and above the expert: slope 1, g = w * 1; correct and above: slope alpha = .5, g = 0 * (-.5) = 0
    assert paper.item() == pytest.approx((0.0 + 0.0 + 0.5 * 1.0) / 3)
    loss, m = ca.compute_calibrl_guide_loss(log_prob, expert, emask, adv, correct, torch.ones(3, 1), gap=gap,
                                            all_wrong_weight=0.3)
    assert loss.item() == pytest.approx((0.3 * 1.0 + 0.0 + 0.5 * 1.0) / 3)
    loss.backward()
    assert log_prob.grad.flatten().tolist() == pytest.approx([0.3 / 3, 0.0, 0.5 / 3])  # pushes wrong rows down
    assert m["rareness_mean"] == pytest.approx(0.5 / 3)  # the metric stays the group rareness |A|


def test_rows_without_expert_add_nothing_but_count_in_the_denominator():
    log_prob = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    expert = torch.tensor([[-2.0, -2.0], [0.0, 0.0]])
    emask = torch.tensor([[True, True], [False, False]])
    loss, m = ca.compute_calibrl_guide_loss(log_prob, expert, emask, torch.ones(2, 2), torch.tensor([False, True]),
                                            torch.ones(2, 2), alpha=0.5)
    assert loss.item() == pytest.approx(2 * 1.0 / 4)  # row 0: wrong, above expert by 1 -> slope 1; / 4 tokens
    loss.backward()
    assert log_prob.grad[1].abs().sum() == 0
    assert m["guided_frac"] == 0.5


def test_no_expert_at_all_and_zero_advantage_give_zero_loss_and_gradient():
    log_prob = torch.randn(3, 4, requires_grad=True)
    loss, m = ca.compute_calibrl_guide_loss(log_prob, torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bool),
                                            torch.ones(3, 4), torch.ones(3).bool(), torch.ones(3, 4))
    loss.backward()
    assert loss.item() == 0 and log_prob.grad.abs().sum() == 0 and m["gate_full_frac"] == 0
    log_prob2 = torch.randn(3, 4, requires_grad=True)
    loss2, _ = ca.compute_calibrl_guide_loss(log_prob2, torch.randn(3, 4), torch.ones(3, 4).bool(),
                                             torch.zeros(3, 4), torch.ones(3).bool(), torch.ones(3, 4))
    loss2.backward()
    assert loss2.item() == 0 and log_prob2.grad.abs().sum() == 0


def test_empty_response_mask_is_finite():
    for gap in ca.GAP_MODES:
        loss, m = ca.compute_calibrl_guide_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3).bool(),
                                                torch.ones(2, 3), torch.ones(2).bool(), torch.zeros(2, 3), gap=gap)
        assert loss.item() == 0 and all(math.isfinite(v) for v in m.values())


def test_minus_inf_log_probs_are_floored_not_propagated():
    log_prob = torch.tensor([[float("-inf"), -1.0]], requires_grad=True)
    expert = torch.tensor([[-1.0, float("-inf")]])
    for gap in ca.GAP_MODES:
        loss, m = ca.compute_calibrl_guide_loss(log_prob, expert, torch.ones(1, 2).bool(), torch.ones(1, 2),
                                                torch.tensor([True]), torch.ones(1, 2), gap=gap)
        (grad,) = torch.autograd.grad(loss, log_prob)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(math.isfinite(v) for v in m.values())
    # the floored token's gap is exactly -20 - (-1)
    loss, m = ca.compute_calibrl_guide_loss(log_prob[:, :1], expert[:, :1], torch.ones(1, 1).bool(),
                                            torch.ones(1, 1), torch.tensor([True]), torch.ones(1, 1))
    assert m["gap_mean"] == pytest.approx(FLOOR + 1.0)


def test_sequence_mode_is_the_papers_eq9():
    log_prob = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    resp = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    expert = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    emask = torch.tensor([[True, True, False], [True, True, False]])
    adv = torch.tensor([[0.5] * 3, [0.5] * 3])
    correct = torch.tensor([True, False])
    loss, m = ca.compute_calibrl_guide_loss(log_prob, expert, emask, adv, correct, resp, gap="sequence", alpha=0.5)
    # d_0 = -4 - (-2) = -2, correct -> gate(2) = 2;  d_1 = -1 - (-2) = 1, wrong -> gate(1) = 1
    assert loss.item() == pytest.approx((0.5 * 2 + 0.5 * 1) / 2)
    assert m["gate_full_frac"] == 1.0 and m["gap_mean"] == pytest.approx(-0.5)
    loss_mean, m_mean = ca.compute_calibrl_guide_loss(log_prob, expert, emask, adv, correct, resp, gap="sequence",
                                                      sequence_norm="mean", alpha=0.5)
    # d_0 = -4/3 - (-1) = -1/3 -> 1/3;  d_1 = -0.5 - (-1) = 0.5 -> 0.5
    assert loss_mean.item() == pytest.approx((0.5 / 3 + 0.5 * 0.5) / 2)
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert grad[0, 0].item() == pytest.approx(-0.5 / 2) and grad[1, 2].item() == 0.0


def test_sequence_mode_counts_responses_without_expert():
    loss, _ = ca.compute_calibrl_guide_loss(
        torch.tensor([[-3.0], [-3.0]]), torch.tensor([[-1.0], [0.0]]), torch.tensor([[True], [False]]),
        torch.ones(2, 1), torch.tensor([True, True]), torch.ones(2, 1), gap="sequence")
    assert loss.item() == pytest.approx(2.0 / 2)


def test_bf16_and_fp32_agree():
    gen = torch.Generator().manual_seed(3)
    lp = -torch.rand(8, 16, generator=gen) * 3
    elp = -torch.rand(8, 16, generator=gen) * 3
    emask = torch.rand(8, 16, generator=gen) > 0.2
    adv = torch.randn(8, 1, generator=gen).expand(8, 16)
    correct = torch.rand(8, generator=gen) > 0.5
    resp = torch.ones(8, 16)
    for gap in ca.GAP_MODES:
        full, _ = ca.compute_calibrl_guide_loss(lp, elp, emask, adv, correct, resp, gap=gap)
        half, _ = ca.compute_calibrl_guide_loss(lp.bfloat16(), elp.bfloat16(), emask, adv.bfloat16(), correct,
                                                resp.bfloat16(), gap=gap)
        assert half.dtype == torch.float32
        assert half.item() == pytest.approx(full.item(), rel=2e-2, abs=1e-3)


def test_bf16_extremes_never_overflow_the_gap():
    """bf16 log-probs at the edge of the format (-inf, -3e38, -1e30 experts) over long responses: the gap is
    formed in float32 after the floor, so loss, gradient and metrics stay finite, and a bf16 input gives
    exactly the result of its float32 copy (no bf16 accumulation of 8k-token sums anywhere)."""
    T = 8192
    lp = torch.full((4, T), -30.0)
    lp[0, :10] = -float("inf")
    lp[1] = -3.0e38
    lp[3] = -0.01
    elp = torch.full((4, T), -0.5)
    elp[2] = -1.0e30
    elp[3, T // 2:] = -float("inf")
    emask = torch.ones(4, T, dtype=torch.bool)
    adv = torch.tensor([[2.0], [-2.0], [1.0], [-1.0]]).expand(4, T)
    correct = torch.tensor([True, False, True, False])
    resp = torch.ones(4, T)
    for gap, norm in [("token", "sum"), ("sequence", "sum"), ("sequence", "mean")]:
        results = []
        for dtype in (torch.bfloat16, torch.float32):
            x = lp.bfloat16().to(dtype).requires_grad_()
            loss, metrics = ca.compute_calibrl_guide_loss(x, elp.bfloat16().to(dtype), emask, adv.to(dtype), correct,
                                                          resp.to(dtype), gap=gap, sequence_norm=norm)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), (gap, norm, dtype)
            assert all(math.isfinite(v) for v in metrics.values()), metrics
            results.append(loss.item())
        assert results[0] == results[1], (gap, norm, results)


def test_invalid_modes_are_rejected_with_the_key_name():
    args = (torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1).bool(), torch.ones(1, 1), torch.ones(1).bool(),
            torch.ones(1, 1))
    with pytest.raises(ValueError, match="calibrl.gap"):
        ca.compute_calibrl_guide_loss(*args, gap="tokens")
    with pytest.raises(ValueError, match="calibrl.alpha"):
        ca.compute_calibrl_guide_loss(*args, alpha=1.5)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ca.compute_calibrl_guide_loss(*args, loss_agg_mode="mean")


# ---------------------------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_aggregate_loss_matches_verl_agg_loss(mode):
    from verl.trainer.ppo.core_algos import agg_loss

    gen = torch.Generator().manual_seed(1)
    loss_mat = torch.randn(6, 7, generator=gen)
    mask = (torch.rand(6, 7, generator=gen) > 0.3).float()
    mask[2] = 0
    torch.testing.assert_close(ca.aggregate_loss(loss_mat, mask, mode), agg_loss(loss_mat, mask, mode))
    kwargs = dict(dp_size=2, batch_num_tokens=55, global_batch_size=11, loss_scale_factor=4)
    torch.testing.assert_close(ca.aggregate_loss(loss_mat, mask, mode, **kwargs),
                               agg_loss(loss_mat, mask, mode, **kwargs))


@pytest.mark.parametrize("gap,agg", [("token", "token-mean"), ("token", "seq-mean-token-mean"),
                                     ("sequence", "token-mean")])
def test_micro_batch_split_gives_the_same_gradient(gap, agg):
    """With verl's global token/sequence counts, summing micro-batch losses equals the mini-batch loss."""
    gen = torch.Generator().manual_seed(2)
    lp = (-torch.rand(6, 5, generator=gen) * 2).requires_grad_(True)
    elp = -torch.rand(6, 5, generator=gen) * 2
    emask = torch.rand(6, 5, generator=gen) > 0.3
    adv = torch.randn(6, 1, generator=gen).expand(6, 5)
    correct = torch.rand(6, generator=gen) > 0.5
    resp = (torch.rand(6, 5, generator=gen) > 0.2).float()
    resp[:, 0] = 1
    glob = dict(batch_num_tokens=resp.sum(), global_batch_size=6)
    whole, _ = ca.compute_calibrl_guide_loss(lp, elp, emask, adv, correct, resp, gap=gap, loss_agg_mode=agg, **glob)
    (g_whole,) = torch.autograd.grad(whole, lp)
    parts = [ca.compute_calibrl_guide_loss(lp[s], elp[s], emask[s], adv[s], correct[s], resp[s], gap=gap,
                                           loss_agg_mode=agg, **glob)[0] for s in (slice(0, 2), slice(2, 6))]
    (g_parts,) = torch.autograd.grad(sum(parts), lp)
    torch.testing.assert_close(sum(parts), whole)
    torch.testing.assert_close(g_parts, g_whole)


# ---------------------------------------------------------------------------------------------- baselines
def test_luffy_expert_token_loss_value_and_gradient():
    lp = torch.log(torch.tensor([[0.1, 0.9]])).requires_grad_(True)
    adv = torch.tensor([[2.0, 2.0]])
    loss = ca.luffy_expert_token_loss(lp, adv)
    torch.testing.assert_close(loss, torch.tensor([[-2 * 0.1 / 0.2, -2 * 0.9 / 1.0]]))
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    # d/dlogp [p/(p+g)] = p*g/(p+g)^2: low-probability expert tokens get the larger push
    expected = [-2 * p * 0.1 / (p + 0.1) ** 2 for p in (0.1, 0.9)]
    torch.testing.assert_close(grad, torch.tensor([expected]))
    assert abs(grad[0, 0]) > abs(grad[0, 1])


def test_rlplus_expert_token_loss_value_and_gradient():
    lp = torch.log(torch.tensor([[0.2, 0.5]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.4, 0.4]]))
    adv = torch.tensor([[1.0, 1.0]])
    loss = ca.rlplus_expert_token_loss(lp, old, adv)
    expected = [-p / (0.75 * 0.4 + 0.25) * (1 - p) ** 0.5 for p in (0.2, 0.5)]
    torch.testing.assert_close(loss, torch.tensor([expected]))
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    # the exploration weight is held constant: gradient = loss itself (d p / d log p = p)
    torch.testing.assert_close(grad, torch.tensor([expected]))


def test_vectorised_advantage_equals_a_per_row_loop():
    gen = torch.Generator().manual_seed(5)
    n = 60
    scores = torch.randint(0, 3, (n,), generator=gen).float()
    is_expert = torch.rand(n, generator=gen) > 0.8
    index = np.array([f"g{int(i)}" for i in torch.randint(0, 9, (n,), generator=gen)], dtype=object)
    rewards, mask = _rewards(scores.tolist())
    adv, _ = ca.compute_calibrl_advantage(rewards, mask, index, is_expert, norm_adv_by_std=True)
    for i in range(n):
        members = [j for j in range(n) if index[j] == index[i] and not is_expert[j]]
        vals = scores[members]
        if is_expert[i] or (len(vals) > 1 and bool((vals == vals[0]).all())):
            want = 0.0
        elif len(vals) == 1:
            want = scores[i].item() / (1 + 1e-6)
        else:
            want = ((scores[i] - vals.mean()) / (vals.std() + 1e-6)).item()
        assert adv[i, 0].item() == pytest.approx(want, abs=1e-5), i


def test_vectorised_expert_advantage_equals_a_per_row_loop():
    gen = torch.Generator().manual_seed(6)
    n = 80
    scores = (torch.randint(0, 2, (n,), generator=gen) + 0.1 * torch.randint(0, 2, (n,), generator=gen)).tolist()
    is_expert = (torch.rand(n, generator=gen) > 0.7).tolist()
    index = np.array([f"g{int(i)}" for i in torch.randint(0, 12, (n,), generator=gen)], dtype=object)
    rewards, mask = _rewards(scores)
    for norm in (False, True):
        adv = ca.compute_expert_advantage(rewards, mask, index, torch.tensor(is_expert), norm_adv_by_std=norm)
        for i in range(n):
            vals = [scores[j] for j in range(n) if index[j] == index[i] and not is_expert[j]]
            if len(vals) <= 1:
                mean, std = 0.0, 1.0
            elif max(vals) == min(vals):
                mean, std = vals[0], 1.0
            else:
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
            want = 0.0 if not is_expert[i] else (scores[i] - mean) / ((std + 1e-6) if norm else 1.0)
            assert adv[i, 0].item() == pytest.approx(want, abs=1e-5), (norm, i)


# ---------------------------------------------------------------------------------------------- fast path vs formula
# compute_calibrl_guide_loss reduces per row and forms its gradient next to the loss (one backward pass). These
# tests pin it, value, gradient and metrics, to docs/algorithm.md §1.7 written op by op with autograd and verl's
# own agg_loss.
def _reference_sequence_baseline(elp, emask, sequence_norm):
    """S(l^e) of eq. 9 token by token: over ALL of the expert's tokens (not only those under the response), each
    floored at -20; the sum, or the mean over the expert's own token count; 0 for a row without expert tokens."""
    out = []
    for row_lp, row_mask in zip(elp.float().tolist(), emask.bool().tolist(), strict=True):
        tokens = [max(value, FLOOR) for value, on in zip(row_lp, row_mask, strict=True) if on]
        total = sum(tokens)
        out.append(total / len(tokens) if sequence_norm == "mean" and tokens else total)
    return torch.tensor(out)


def test_reference_sequence_baseline_hand_case():
    """Pins the reference (and the code's own helper) to hand numbers: floor at -20, the mean over |e|."""
    elp = torch.tensor([[-1.0, -30.0, -3.0, -7.0], [-2.0, float("-inf"), -1.0, -1.0], [-5.0, -5.0, -5.0, -5.0]])
    emask = torch.tensor([[True, True, True, False], [True, True, True, True], [False] * 4])
    for fn in (_reference_sequence_baseline, ca.expert_sequence_baseline):
        torch.testing.assert_close(fn(elp, emask, "sum"), torch.tensor([-24.0, -24.0, 0.0]))
        torch.testing.assert_close(fn(elp, emask, "mean"), torch.tensor([-8.0, -6.0, 0.0]))
    assert ca.LOG_PROB_FLOOR == FLOOR


def _reference_guide(lp, elp, emask, adv, correct, resp, *, alpha, gap, tail, sequence_norm, loss_agg_mode,
                     expert_baseline=None, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                     loss_scale_factor=None):
    from verl.trainer.ppo.core_algos import agg_loss

    resp, emask = resp.bool(), emask.bool()
    has_expert = emask.any(-1)
    if expert_baseline is None:
        expert_baseline = _reference_sequence_baseline(elp, emask, sequence_norm)
    lp = lp.float().clamp(min=FLOOR)
    elp = torch.where(emask, elp.float().clamp(min=FLOOR), 0.0)  # tail zero: l^e = 0 past the expert
    sign = correct.float() * 2 - 1
    rareness = adv.float().abs().amax(-1)
    weight = rareness * has_expert
    if gap == "token":
        d = lp - elp
        g = weight[:, None] * torch.nn.functional.leaky_relu(-sign[:, None] * d, alpha)
        if tail == "mask":
            g, gated = g * emask, resp & emask
        else:
            gated = resp & has_expert[:, None]
        loss = agg_loss(g, resp, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)
        s = sign[:, None]
    else:
        own = (lp * resp).sum(-1)
        if sequence_norm == "mean":
            own = own / resp.sum(-1).clamp(min=1)
        d = own - expert_baseline
        g = weight * torch.nn.functional.leaky_relu(-sign * d, alpha)
        n_resp = resp.any(-1).sum() if global_batch_size is None else global_batch_size
        loss = g.sum() / n_resp * dp_size
        gated, s = has_expert & resp.any(-1), sign
    d = d.detach()
    n_gated = gated.sum().clamp(min=1)
    metrics = {"gate_full_frac": float(((-s * d > 0) & gated).sum() / n_gated),
               "gap_mean": float((d * gated).sum() / n_gated),
               "rareness_mean": float(rareness[resp.any(-1)].mean()),
               "guided_frac": float(has_expert.float().mean())}
    return loss, metrics


def _guide_inputs(seed: int, floored: bool, dtype: torch.dtype = torch.float32, rows: int = 9, length: int = 13):
    """Random rows that reach every branch: ragged responses with holes, an empty response, rows without an
    expert, an expert mask reaching past the response, zero-advantage rows, both sides of the gate, and (when
    ``floored``) log-probs below the floor (-inf included) on both the policy and the expert side."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(length)
    resp = (pos < torch.randint(3, length + 1, (rows,), generator=gen)[:, None]) & (torch.rand(rows, length,
                                                                                         generator=gen) > 0.1)
    resp[1] = False  # a row with no response token
    resp[8] = pos == 3  # a row with one response token
    emask = pos < torch.randint(2, length + 4, (rows,), generator=gen)[:, None]  # can reach past the response
    emask[[2, 5]] = False  # groups without an expert
    adv = torch.randn(rows, 1, generator=gen) * resp
    adv[3] = 0.0  # an all-equal group
    lp = -torch.rand(rows, length, generator=gen) * 3
    elp = -torch.rand(rows, length, generator=gen) * 3
    lp[8, 3] = elp[8, 3] = -1.5  # a token exactly at the expert: the gate's kink
    if floored:  # below the floor but finite (the floor's flag must see them), and -inf on the expert side
        lp[0, 0], lp[4, 2], lp[6, 1], elp[7, 0] = -30.0, -25.0, FLOOR, -float("inf")
    correct = torch.rand(rows, generator=gen) > 0.5
    correct[:2] = torch.tensor([True, False])
    baseline = -torch.rand(rows, generator=gen) * 20
    baseline[8] = -1.5  # row 8's own sum and mean: a response exactly at the expert (the kink of eq. 9)
    return (lp.to(dtype), elp.to(dtype), emask, adv.to(dtype), correct, resp, baseline)


def _compare_guide(inputs, dtype, **kw):
    lp, elp, emask, adv, correct, resp, baseline = inputs
    mine_lp, ref_lp = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    loss, metrics = ca.compute_calibrl_guide_loss(mine_lp, elp, emask, adv, correct, resp, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "expert_baseline"}
    ref_loss, ref_metrics = _reference_guide(ref_lp, elp, emask, adv, correct, resp,
                                             expert_baseline=kw.get("expert_baseline"), **ref_kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, mine_lp)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_lp)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, **tol)
    assert metrics.keys() == ref_metrics.keys()
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    return loss, grad


def test_guide_inputs_reach_every_branch():
    """Guards the comparisons below: their inputs must make the modes, sides and floors differ."""
    lp, elp, emask, adv, correct, resp, baseline = _guide_inputs(0, floored=True)
    kw = dict(alpha=0.5, gap="token", sequence_norm="sum", loss_agg_mode="token-mean")
    zero, _ = _reference_guide(lp, elp, emask, adv, correct, resp, tail="zero", **kw)
    mask, _ = _reference_guide(lp, elp, emask, adv, correct, resp, tail="mask", **kw)
    assert not torch.isclose(zero, mask)
    x = -(correct.float() * 2 - 1)[:, None] * (lp.clamp(min=FLOOR) - torch.where(emask, elp, 0.0))
    guided = resp & emask.any(-1, keepdim=True) & (adv != 0)
    assert (x[guided] > 0).any() and (x[guided] < 0).any() and (x[guided] == 0).any()
    assert resp[8].sum() == 1 and emask[8].any() and adv[8].abs().max() > 0  # the sequence gap's kink row
    assert (lp < FLOOR).any() and (emask & ~resp).any() and not resp[1].any()
    assert (_guide_inputs(0, floored=False)[0] >= FLOOR).all()


@pytest.mark.parametrize("floored", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", ca.TAIL_MODES)
@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_token_guide_matches_the_formula(mode, tail, alpha, dtype, floored):
    inputs = _guide_inputs(11, floored, dtype)
    kw = dict(alpha=alpha, gap="token", tail=tail, sequence_norm="sum", loss_agg_mode=mode)
    _compare_guide(inputs, dtype, **kw)
    # verl's global normalisation (what the trainer passes)
    _compare_guide(inputs, dtype, dp_size=2, batch_num_tokens=97, global_batch_size=12, loss_scale_factor=7, **kw)


@pytest.mark.parametrize("floored", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("norm", ca.SEQUENCE_NORMS)
@pytest.mark.parametrize("with_baseline", [False, True])
def test_sequence_guide_matches_the_formula(with_baseline, norm, alpha, dtype, floored):
    inputs = _guide_inputs(12, floored, dtype)
    kw = dict(alpha=alpha, gap="sequence", tail="zero", sequence_norm=norm, loss_agg_mode="token-mean")
    if with_baseline:
        kw["expert_baseline"] = inputs[-1]
    _compare_guide(inputs, dtype, **kw)
    _compare_guide(inputs, dtype, dp_size=2, global_batch_size=12, **kw)


def test_guide_fast_path_edge_layouts():
    """Float and non-contiguous masks, (B,) advantages, no autograd: the same loss as the formula."""
    lp, elp, emask, adv, correct, resp, _ = _guide_inputs(13, floored=True, length=26)
    kw = dict(alpha=0.3, gap="token", tail="mask", sequence_norm="sum", loss_agg_mode="seq-mean-token-mean")
    sl = (slice(None), slice(None, None, 2))  # every other token: non-contiguous views
    ref, _ = _reference_guide(lp[sl], elp[sl], emask[sl], adv[sl], correct, resp[sl], **kw)
    for m_resp, m_emask in ((resp[sl], emask[sl]), (resp[sl].float(), emask[sl].float())):
        loss, _ = ca.compute_calibrl_guide_loss(lp[sl], elp[sl], m_emask, adv[sl], correct, m_resp, **kw)
        torch.testing.assert_close(loss, ref)
    loss, _ = ca.compute_calibrl_guide_loss(lp, elp, emask, adv.abs().amax(-1), correct, resp, **kw)
    torch.testing.assert_close(loss, _reference_guide(lp, elp, emask, adv, correct, resp, **kw)[0])
    with torch.no_grad():
        no_grad, _ = ca.compute_calibrl_guide_loss(lp.requires_grad_(), elp, emask, adv, correct, resp, **kw)
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, loss.detach())


def test_guide_gradient_survives_a_second_backward_and_scales_with_upstream():
    lp, elp, emask, adv, correct, resp, _ = _guide_inputs(14, floored=True)
    lp[0, 0] = -float("inf")
    lp.requires_grad_()
    loss, _ = ca.compute_calibrl_guide_loss(lp, elp, emask, adv, correct, resp)
    (g1,) = torch.autograd.grad(3.0 * loss, lp, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g1, 3.0 * g2)
    rows, cols = [0, 4, 6], [0, 2, 1]  # guided tokens at -inf, -25 and exactly the floor
    assert resp[rows, cols].all() and emask[rows].any(-1).all() and (adv[rows] != 0).any(-1).all()
    assert g2[0, 0] == 0 and g2[4, 2] == 0  # below the floor: no gradient
    assert g2[6, 1] != 0  # exactly at the floor the clamp still passes it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offpolicy_token_losses_match_their_formulas(dtype):
    gen = torch.Generator().manual_seed(15)
    lp = -torch.rand(6, 11, generator=gen) * 4
    lp[0, 0], lp[1, 1] = -float("inf"), -30.0
    old = -torch.rand(6, 11, generator=gen) * 4
    old[2, 2] = -float("inf")
    adv = torch.randn(6, 1, generator=gen).expand(6, 11)
    lp, old, adv = lp.to(dtype), old.to(dtype), adv.to(dtype)

    def luffy(x):
        p = torch.exp(x.float().clamp(min=FLOOR))
        return (-adv.float() * p / (p + 0.1)).to(dtype)

    def rlplus(x):
        p = torch.exp(x.float().clamp(min=FLOOR))
        p_old = torch.exp(old.float().clamp(min=FLOOR))
        explore = (1.0 - p.detach()).clamp(min=0.0) ** 0.5
        return (-adv.float() * p / (0.75 * p_old + 0.25) * explore).to(dtype)

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for mine, ref in ((lambda x: ca.luffy_expert_token_loss(x, adv), luffy),
                      (lambda x: ca.rlplus_expert_token_loss(x, old, adv), rlplus)):
        a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
        out, want = mine(a), ref(b)
        assert out.dtype == dtype
        torch.testing.assert_close(out, want, **tol)
        upstream = torch.randn(6, 11, generator=gen).to(dtype)
        (ga,), (gb,) = torch.autograd.grad(out, a, upstream), torch.autograd.grad(want, b, upstream)
        torch.testing.assert_close(ga, gb, **tol)
        assert ga[0, 0] == 0 and ga[1, 1] == 0


@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_aggregate_loss_with_a_bool_mask_matches_verl(mode):
    from verl.trainer.ppo.core_algos import agg_loss

    gen = torch.Generator().manual_seed(16)
    loss_mat = torch.randn(6, 7, generator=gen)
    mask = torch.rand(6, 7, generator=gen) > 0.3
    mask[2] = False
    torch.testing.assert_close(ca.aggregate_loss(loss_mat, mask, mode), agg_loss(loss_mat, mask, mode))
