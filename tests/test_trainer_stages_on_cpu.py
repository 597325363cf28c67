"""Stages of the CalibRL trainer (integration/trainer.py) on real inputs, without a Ray cluster.

The trainer's methods that need only their own state (the injection decision, the reward's `acc` reader) run on
an instance whose verl set-up is skipped; the end-to-end stages run in the smoke tests.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta

from calibrl_verl.config import CalibRLConfig, CalibRLConfigError
from calibrl_verl.integration.trainer import CalibRLTrainer, _reward_acc


def _trainer(step: int, **calibrl: object) -> CalibRLTrainer:
    """The real trainer class with only the state ``_expert_injection`` reads (verl's __init__ needs Ray)."""
    trainer = object.__new__(CalibRLTrainer)
    trainer.calibrl = CalibRLConfig(**calibrl)
    trainer.global_steps = step
    return trainer


def _batch(texts: list[object], key: str = "solution") -> TensorDict:
    return TensorDict({key: NonTensorStack(*texts), "index": torch.arange(len(texts))}, batch_size=[len(texts)])


def test_injection_skips_prompts_without_usable_expert_text():
    texts = ["<think>a</think><answer>1</answer>", "", "   \n", None, "<think>b</think><answer>2</answer>"]
    assert _trainer(1)._expert_injection(_batch(texts)).tolist() == [True, False, False, False, True]


def test_injection_is_off_during_the_grpo_warm_up_and_on_after_it():
    texts = ["<think>a</think><answer>1</answer>"] * 3
    trainer = _trainer(2, warmup_grpo_steps=2)
    assert not trainer._expert_injection(_batch(texts)).any()  # steps 1..2 are plain GRPO
    trainer.global_steps = 3
    assert trainer._expert_injection(_batch(texts)).all()


def test_random_mixing_draws_are_reproducible_per_seed_and_step():
    texts = ["<think>a</think><answer>1</answer>"] * 64

    def draw(seed: int, step: int) -> list[bool]:
        return _trainer(step, mix_policy="random", mix_ratio=0.5, seed=seed)._expert_injection(_batch(texts)).tolist()

    assert draw(3, 5) == draw(3, 5)  # a resumed run draws what the uninterrupted one drew
    assert draw(3, 5) != draw(3, 6) and draw(3, 5) != draw(4, 5)
    assert 16 < sum(draw(3, 5)) < 48  # about mix_ratio of the groups
    assert not any(_trainer(5, mix_policy="random", mix_ratio=0.0)._expert_injection(_batch(texts)).tolist())


def test_a_missing_expert_column_is_named():
    with pytest.raises(CalibRLConfigError, match=r"calibrl.expert_key='solution': the training data has no such "
                                                 r"column \(columns: \['cot', 'index'\]\)"):
        _trainer(1)._expert_injection(_batch(["x"], key="cot"))


def test_reward_acc_is_read_only_from_dict_results_that_carry_it():
    with_acc = [{"reward_extra_info": {"score": 1.1, "acc": 1.0}}, {"reward_extra_info": {"score": 0.1, "acc": 0.0}}]
    assert _reward_acc(with_acc).tolist() == [1.0, 0.0]
    # a float reward: verl 0.9.1's reward manager stores it as {"acc": score}, which is not an accuracy
    assert _reward_acc([{"reward_extra_info": {"acc": 1.1}}, {"reward_extra_info": {"acc": 0.0}}]) is None
    # a dict without acc, a row without reward info, no rows: correctness falls back to the threshold
    assert _reward_acc([{"reward_extra_info": {"score": 1.0}}]) is None
    assert _reward_acc([with_acc[0], {}]) is None
    assert _reward_acc([]) is None


def _composed_trainer(*overrides: str, step: int) -> CalibRLTrainer:
    """The real trainer class on the real composed config (``prepare_config`` run on it), with the data-loading state
    verl's ``_next_train_batch`` reads; verl's __init__ (Ray workers) is skipped."""
    import copy

    import yaml
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from calibrl_verl.main_calibrl import prepare_config

    with initialize_config_module("calibrl_verl.config", version_base=None):
        config = copy.deepcopy(compose("calibrl_trainer"))
    for override in overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(config, key, yaml.safe_load(value), merge=False)
    trainer = object.__new__(CalibRLTrainer)
    trainer.config, trainer.calibrl = config, prepare_config(config)
    trainer.global_steps, trainer.train_dataloader_it = step, None
    trainer._prompt_position, trainer._expert_uids, trainer._short_groups = {}, set(), 0
    return trainer


def _dataloader(texts: list[object]):
    """Prompt rows batched by a torch DataLoader with verl's own collate function, as verl's dataloader hands them."""
    from torch.utils.data import DataLoader
    from verl.utils.dataset.rl_dataset import collate_fn

    rows = [{"raw_prompt": [{"role": "user", "content": f"question {i}"}], "solution": text, "index": i,
             "input_ids": torch.ones(3, dtype=torch.long)} for i, text in enumerate(texts)]
    return DataLoader(rows, batch_size=len(rows), collate_fn=collate_fn)


def test_the_warm_up_steps_inject_no_expert_and_sample_the_on_policy_count():
    """``calibrl.warmup_grpo_steps=2``: steps 1 and 2 are plain GRPO through the trainer's own data-source hook
    (``_next_train_batch``): no prompt gets its expert and every prompt samples n_onpolicy responses, so no key is an
    expert row; step 3 injects the expert of every prompt that has one (n_onpolicy + 1 sessions)."""
    texts = ["<think>a</think><answer>1</answer>", "", "<think>b</think><answer>2</answer>", None]
    trainer = _composed_trainer("calibrl.warmup_grpo_steps=2", "calibrl.n_onpolicy=3", "data.train_batch_size=4",
                                "data.gen_batch_size=null", step=1)
    trainer.train_dataloader = _dataloader(texts)
    for step in (1, 2):
        trainer.global_steps = step
        batch = trainer._next_train_batch()
        assert batch["__rollout_n__"].tolist() == [3, 3, 3, 3], step
        assert not batch["calibrl_expert"].any() and trainer._expert_uids == set(), step
        assert not trainer._expert_injection(batch).any(), step
        uids = [str(u) for u in list(batch["uid"])]
        keys = KVBatchMeta(keys=[f"{u}_{s}_0" for u in uids for s in range(4)], tags=[{}] * 16, partition_id="train")
        assert not any(trainer._expert_flags(keys)), step  # not even a 4th session would count as an expert row
    trainer.global_steps = 3
    batch = trainer._next_train_batch()
    assert batch["__rollout_n__"].tolist() == [4, 3, 4, 3]
    assert batch["calibrl_expert"].tolist() == [True, False, True, False]
    uids = [str(u) for u in list(batch["uid"])]
    assert trainer._expert_uids == {uids[0], uids[2]}


def test_the_update_subset_keeps_its_size_when_verl_rebalances_it():
    """The shape from the bug report (ppo_mini_batch_size=1, log-prob micro-batch 6, 4 prompts x (4 + 1)): the
    step pads to whole log-prob micro-batches (24 rows), the update re-balance of the 16 on-policy rows must not
    pad them to that multiple (18 rows broke verl's 4-row mini-batches)."""
    from omegaconf import OmegaConf

    trainer = _trainer(1)
    trainer.config = OmegaConf.create({"actor_rollout_ref": {
        "actor": {"ppo_mini_batch_size": 1},
        "rollout": {"n": 5, "log_prob_micro_batch_size_per_gpu": 6, "log_prob_use_dynamic_bsz": False}}})
    trainer._fixed_multiple = None
    trainer._balance_target = (16, 4)  # as _balance_batch sets it: 16 on-policy rows, 4 expert rows
    assert trainer._get_required_batch_multiple(1) == 24  # verl pads the step to a multiple of this
    assert trainer._balance_target == (16, 4)  # no update padding needed: 16 rows are 4 mini-batches of 4
    trainer._balance_target, trainer._fixed_multiple = None, 16  # as _update_actor re-balances the subset
    assert trainer._get_required_batch_multiple(1) == 16


def test_rows_are_put_in_a_canonical_order_before_verl_balances_them():
    """The same samples arriving in another order (rollout completion order) get the same ranks and the same
    places in them, through verl 0.9.1's own ``_balance_batch``, once the trainer sorts them by (prompt position,
    session); uids differ per run, the prompts' positions in the data batch do not."""
    import random
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from transfer_queue import KVBatchMeta

    from calibrl_verl.integration.trainer import canonical_row_order

    def balanced(uids: list[str], arrival: list[tuple[int, int]]) -> list[tuple[int, int]]:
        trainer = _trainer(3, loss_mode="grpo")
        trainer.config = OmegaConf.create({"trainer": {"critic_warmup": 0}, "actor_rollout_ref": {
            "actor": {"ppo_mini_batch_size": 2}, "rollout": {"n": 4}}})
        trainer.use_critic, trainer.tokenizer = False, SimpleNamespace(eos_token_id=0)  # no padding row is built
        trainer.actor_rollout_wg = SimpleNamespace(_dispatch_info={"actor": [0, 1]})  # dp = 2
        trainer._balance_target, trainer._fixed_multiple = None, None
        trainer._prompt_position = {uid: i for i, uid in enumerate(uids)}
        keys = [f"{uids[p]}_{s}_0" for p, s in arrival]
        lengths = {(p, s): 10 + (p * 7 + s * 3) % 5 for p in range(4) for s in range(4)}  # equal lengths: ties
        batch = KVBatchMeta(keys=keys, tags=[{"seq_len": lengths[a]} for a in arrival], partition_id="train")
        out = trainer._balance_batch(batch, {})
        by_key = {f"{uids[p]}_{s}_0": (p, s) for p, s in arrival}
        return [by_key[k] for k in out.keys]

    rows = [(p, s) for p in range(4) for s in range(4)]
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    first = balanced([f"u{i}-a" for i in range(4)], rows)
    assert balanced([f"u{i}-b" for i in range(4)], shuffled) == first  # other uids, other arrival order
    assert sorted(first) == rows and first != rows  # every row once, in verl's balanced order
    # the order itself: prompt position, then session, then turn; unknown uids (padding) last
    keys = ["b_1_0", "pad_0_0", "a_0_1", "b_0_0", "a_0_0", "a_10_0", "a_2_0"]
    assert [keys[i] for i in canonical_row_order(keys, {"a": 0, "b": 1})] == [
        "a_0_0", "a_0_1", "a_2_0", "a_10_0", "b_0_0", "b_1_0", "pad_0_0"]
