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
    group_expert_count,
    inactive_expert_rows,
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
    # verl 0.9.1's padding rows copy row 0's fields (its reward here) under a uid of their own, pad<uuid>: they must
    # neither change group a's mean nor get an advantage of their own
    rows = _rows([1.0, 0.0, 0.0, 1.1, 1.0], ["a", "a", "a", "a", "pad0f3c"], [False, False, False, True, False],
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


@pytest.mark.parametrize("mode", ["luffy", "rlplus"])
def test_inactive_expert_rows_of_the_offpolicy_baselines_are_no_ops_in_the_update(mode):
    """Outside pass_rate_range a LUFFY / RL-PLUS expert row has A = 0 and must add nothing: no tokens to the
    token-mean denominator, no entropy or KL terms. Its update mask is all zero, like verl's padding rows."""
    rows = _rows([1.1, 0.0, 0.0, 1.1, 1.1, 1.1, 1.1, 1.1, 0.0], ["a", "a", "a", "a", "b", "b", "b", "b", "a"],
                 [False, False, False, True, False, False, False, True, False],
                 padding=[False] * 8 + [True], lengths=[6, 5, 4, 3, 6, 2, 6, 5, 1])
    f = compute_step_fields(CalibRLConfig(loss_mode=mode, mix_policy="pass_rate", pass_rate_range=(0.2, 0.6)), rows)
    assert f.active_expert.tolist() == [False, False, False, True, False, False, False, False, False]
    # group b's expert (row 7): all on-policy rows of b are correct, pass rate 1 is outside [0.2, 0.6]; the padding
    # row is never an inactive expert, whatever fields it copied
    assert inactive_expert_rows(rows, f.active_expert).tolist() == [False] * 7 + [True, False]
    assert f.advantages[7].abs().sum() == 0


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


def test_group_expert_count_per_row():
    got = group_expert_count(np.array(["x", "y", "x", "x", "y"], dtype=object),
                             torch.tensor([False, False, True, True, False]))
    assert got.tolist() == [2, 0, 2, 2, 0]


@pytest.mark.parametrize("sequence_norm", ["sum", "mean"])
def test_with_several_experts_the_baseline_is_their_mean(sequence_norm):
    """k = 2 distinct experts of lengths 4 and 2 in group a: position t's baseline is the mean over the experts that
    have a token at t, the sequence baseline the mean of the two experts' own S(l^e). Written out by hand."""
    rows = _rows([1.0, 0.0, 1.1, 1.1, 0.0, 1.0], ["a", "a", "a", "a", "b", "b"],
                 [False, False, True, True, False, False], lengths=[6, 3, 4, 2, 5, 5])
    f = compute_step_fields(CalibRLConfig(experts_per_group=2, sequence_norm=sequence_norm), rows)
    e1, e2 = rows.old_log_probs[2].tolist(), rows.old_log_probs[3].tolist()
    want_tokens = [(e1[0] + e2[0]) / 2, (e1[1] + e2[1]) / 2, e1[2], e1[3], 0.0, 0.0]
    for row in (0, 1):
        assert f.expert_log_prob[row].tolist() == pytest.approx(want_tokens, abs=1e-6)
        assert f.expert_mask[row].tolist() == [True] * 4 + [False] * 2
    s1, s2 = sum(e1[:4]), sum(e2[:2])
    if sequence_norm == "mean":
        s1, s2 = s1 / 4, s2 / 2
    assert f.expert_baseline.tolist() == pytest.approx([(s1 + s2) / 2] * 2 + [0.0] * 4, abs=1e-6)
    assert not f.expert_mask[4:].any()  # group b has no expert


def test_with_one_expert_the_group_baseline_is_that_expert():
    rows = _rows([1.0, 0.0, 1.1], ["a", "a", "a"], [False, False, True], lengths=[6, 6, 3])
    f = compute_step_fields(CalibRLConfig(), rows)
    e = rows.old_log_probs[2].tolist()
    assert f.expert_log_prob[0].tolist() == pytest.approx(e[:3] + [0.0] * 3, abs=1e-7)
    assert f.expert_baseline[0].item() == pytest.approx(sum(e[:3]), abs=1e-6)


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


def test_step_dump_has_one_row_per_real_row_with_the_documented_schema(tmp_path):
    import pyarrow.parquet as pq

    from calibrl_verl.integration import step_dump

    rows = _rows([1.1, 0.0, 1.1, 0.0], ["a", "a", "a", "a"], [False, False, True, False],
                 padding=[False, False, False, True], lengths=[3, 2, 4, 1], acc=[1.0, 0.0, float("nan"), 0.0])
    f = compute_step_fields(CalibRLConfig(), rows)
    responses = torch.arange(4 * 6).reshape(4, 6)
    guided = rows.onpolicy & f.expert_mask.any(-1)
    table = step_dump.step_table(7, rows.uids, rows.is_expert, rows.is_padding, responses, rows.response_mask,
                                 rows.old_log_probs, rows.scores, rows.acc, f.correct, f.advantages, guided,
                                 f.expert_baseline, f.active_expert, torch.tensor([3, 2, 0, 0]))
    path = step_dump.write_step_dump(tmp_path / "dump", 7, table)
    assert path.name == "step_000007.parquet" and not list(path.parent.glob("*.tmp"))
    got = pq.read_table(path)
    assert got.schema.equals(step_dump.SCHEMA)
    df = got.to_pandas()
    assert len(df) == 3  # the padding row is left out
    assert df.response_ids.map(list).tolist() == [[0, 1, 2], [6, 7], [12, 13, 14, 15]]
    assert [len(x) for x in df.old_log_probs] == [3, 2, 4]
    assert df.old_log_probs[2].tolist() == pytest.approx(rows.old_log_probs[2, :4].tolist())
    assert df.acc.isna().tolist() == [False, False, True]  # NaN acc -> null
    assert df.advantage.tolist() == pytest.approx([0.55, -0.55, 0.0])
    assert df.guided.tolist() == [True, True, False] and df.is_expert.tolist() == [False, False, True]
    assert df.expert_baseline.tolist() == pytest.approx([float(rows.old_log_probs[2, :4].sum())] * 2 + [0.0])
    assert df.expert_active.tolist() == [False, False, True]
    assert df.update_tokens.tolist() == [3, 2, 0]


def _grid():
    """Shapes: (prompts, n, k, dp, mini prompts, log-prob micro per gpu or None (dynamic), groups without expert)."""
    import itertools

    for prompts, n, k, dp, mini, micro, missing in itertools.product(
            (4, 6), (3, 5, 11), (1, 2), (1, 2, 4), (1, 2, 4), (1, 4, 6, None), (0, 1)):
        if k < n - 1 and mini <= prompts and prompts % mini == 0 and missing < prompts:
            yield prompts, n, k, dp, mini, micro, missing


def test_every_calibrl_batch_shape_pads_into_whole_micro_batches_and_update_mini_batches():
    """The padding arithmetic of the trainer (``_get_required_batch_multiple`` -> ``update_padding``) against the
    constraints verl 0.9.1 asserts: the full step splits into whole log-prob micro-batches on every rank, the
    on-policy update into whole mini-batches on every rank (engine_workers.py ~264-270, seqlen_balancing.py ~147),
    or the shape is refused at start-up (``check_update_shape``)."""
    from omegaconf import OmegaConf

    from calibrl_verl.config import CalibRLConfigError
    from calibrl_verl.main_calibrl import check_update_shape

    checked = refused = 0
    for prompts, n, k, dp, mini, micro, missing in _grid():
        n_on = prompts * (n - k)
        n_expert = (prompts - missing) * k
        mini_rows = mini * (n - k)
        config = OmegaConf.create({"trainer": {"n_gpus_per_node": dp, "nnodes": 1},
                                   "actor_rollout_ref": {"rollout": {"n": n}, "actor": {
                                       "ppo_mini_batch_size": mini}}})
        cfg = CalibRLConfig(experts_per_group=k)
        if mini_rows % dp:
            with pytest.raises(CalibRLConfigError, match="actor_rollout_ref.actor.ppo_mini_batch_size="):
                check_update_shape(config, cfg)
            refused += 1
            continue
        check_update_shape(config, cfg)
        full_multiple = dp * (micro or 1)
        p_update, p_total = update_padding(n_on, n_expert, dp, mini_rows, full_multiple)
        total, update = n_on + n_expert + p_total, n_on + p_update
        assert total % full_multiple == 0  # every rank: whole log-prob micro-batches
        assert 0 <= p_update <= p_total  # the update's padding rows come from the step's padding rows
        assert update % dp == 0 and (update // dp) % (mini_rows // dp) == 0  # every rank: whole mini-batches
        checked += 1
    assert checked > 100 and refused > 10


def test_the_refusal_names_a_mini_batch_that_works():
    from omegaconf import OmegaConf

    from calibrl_verl.config import CalibRLConfigError
    from calibrl_verl.main_calibrl import check_update_shape

    config = OmegaConf.create({"trainer": {"n_gpus_per_node": 8, "nnodes": 2}, "actor_rollout_ref": {
        "rollout": {"n": 11}, "actor": {"ppo_mini_batch_size": 121}}})
    with pytest.raises(CalibRLConfigError) as err:
        check_update_shape(config, CalibRLConfig())
    assert "121 x 10 on-policy rows" in str(err.value) and "ppo_mini_batch_size=128" in str(err.value)
    config.actor_rollout_ref.actor.ppo_mini_batch_size = 128
    check_update_shape(config, CalibRLConfig())  # 1280 rows over 16 ranks
    config.actor_rollout_ref.actor.ppo_mini_batch_size = 121
    check_update_shape(config, CalibRLConfig(loss_mode="luffy"))  # updates on all 11 rows: verl's own check
