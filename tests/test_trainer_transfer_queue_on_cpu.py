"""The trainer's stages against a real TransferQueue (Ray-local, in this process) and verl 0.9.1's own stage code.

verl's V1 trainer keeps a step's rows in TransferQueue; its stages (``_balance_batch`` with the padding rows of
``upsample_batch_to_divisible_size``, ``_compute_advantage``) read and write them there. These tests put rows the
way verl's agent loop does (one key ``{uid}_{session}_0`` per row, nested per-row tensors, tags with ``seq_len``),
run the CalibRL trainer's real stage methods, and read back what the update would see:

* the advantage stage: what the loss reads equals ``compute_step_fields`` on the same rows, written by one get
  and one put (CalibRL's fields ride on verl's calls, ``integration/stage_io.py``); inactive LUFFY expert rows are
  masked; GRPO with ``calibrl.dump_dir`` dumps the step;
* the padding grid through verl's real balancer: every shape pads into whole log-prob micro-batches and whole
  update mini-batches on every rank, with the padding rows verl builds in TransferQueue.

The worker groups are not started: the stages tested here only read the actor's data-parallel layout from them.
"""

from __future__ import annotations

import copy
import functools
import itertools
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from calibrl_verl.integration import actor_loss
from calibrl_verl.integration.step_fields import StepRows, compute_step_fields, update_padding
from calibrl_verl.integration.trainer import CalibRLTrainer
from calibrl_verl.main_calibrl import prepare_config

ray = pytest.importorskip("ray")
tq = pytest.importorskip("transfer_queue")
PROMPT_LEN = 6


@pytest.fixture(scope="module", autouse=True)
def transfer_queue():
    """A Ray-local TransferQueue (controller and storage actors; ~13 s to start on 2 cores)."""
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    tq.init()
    yield
    tq.close()
    ray.shutdown()


@pytest.fixture
def calls(monkeypatch):
    """Counts the TransferQueue gets and puts of the trainer module and verl's (the real calls still run)."""
    from verl.trainer.ppo.v1 import trainer_base

    from calibrl_verl.integration import trainer as calibrl_trainer

    counts = {"get": 0, "put": 0}

    class Counting:
        def __getattr__(self, name):
            return getattr(tq, name)

        def kv_batch_get(self, **kw):
            counts["get"] += 1
            return tq.kv_batch_get(**kw)

        def kv_batch_put(self, **kw):
            counts["put"] += 1
            return tq.kv_batch_put(**kw)

    monkeypatch.setattr(trainer_base, "tq", Counting())
    monkeypatch.setattr(calibrl_trainer, "tq", Counting())
    return counts


@functools.cache
def _base_config():
    with initialize_config_module("calibrl_verl.config", version_base=None):
        return compose("calibrl_trainer")


def _trainer(*overrides: str, dp: int = 1, step: int = 3) -> CalibRLTrainer:
    """The real trainer class on the real composed config; verl's __init__ (Ray workers) is skipped."""
    config = copy.deepcopy(_base_config())
    for override in [f"trainer.n_gpus_per_node={dp}", *overrides]:
        key, value = override.split("=", 1)
        OmegaConf.update(config, key, yaml.safe_load(value), merge=False)
    trainer = object.__new__(CalibRLTrainer)
    trainer.config, trainer.calibrl = config, prepare_config(config)
    trainer.global_steps, trainer.use_critic = step, False
    trainer.tokenizer = SimpleNamespace(eos_token_id=2)
    trainer.actor_rollout_wg = SimpleNamespace(_dispatch_info={"actor": list(range(dp))})
    trainer._balance_target = trainer._fixed_multiple = trainer._update_keys = None
    trainer._prompt_position, trainer._expert_uids, trainer._step_extra = {}, set(), {}
    return trainer


def _put_step(trainer: CalibRLTrainer, prompts: int, seed: int = 0, missing: int = 0, tag: str = "s"):
    """One step's rows into TransferQueue as verl's agent loop writes them: ``prompts`` groups of
    ``rollout.n - k`` sampled rows, plus ``k`` expert rows for each group the trainer injected (the last
    ``missing`` groups have no expert). Returns the batch meta and the rows' values by key."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    gen = torch.Generator().manual_seed(seed)
    n_on, k = trainer.n_onpolicy, trainer.calibrl.n_expert
    uids = [f"{tag}{seed}p{p}" for p in range(prompts)]
    trainer._prompt_position = {u: i for i, u in enumerate(uids)}
    trainer._expert_uids = set(uids[: prompts - missing]) if k else set()
    keys, rows, tags, values = [], [], [], {}
    for uid in uids:
        sessions = n_on + (k if uid in trainer._expert_uids else 0)
        for s in range(sessions):
            expert = s >= n_on
            length = int(torch.randint(2, 9, (1,), generator=gen))
            score = float(expert or torch.rand(1, generator=gen).item() < 0.5)
            values[f"{uid}_{s}_0"] = row = {
                "score": score, "expert": expert, "length": length,
                "old_log_probs": -torch.rand(length, generator=gen) * 3,
                "responses": torch.randint(3, 50, (length,), generator=gen)}
            rm = torch.zeros(length)
            rm[-1] = score
            prompt = torch.full((PROMPT_LEN,), 5)
            rows.append({
                "uid": uid, "prompts": prompt, "responses": row["responses"],
                "input_ids": torch.cat([prompt, row["responses"]]),
                "attention_mask": torch.ones(PROMPT_LEN + length, dtype=torch.int64),
                "position_ids": torch.arange(PROMPT_LEN + length),
                "response_mask": torch.ones(length, dtype=torch.int64), "rm_scores": rm,
                "old_log_probs": row["old_log_probs"], "rollout_log_probs": row["old_log_probs"] - 0.01,
                "extra_fields": {"is_expert": expert, "expert_truncated": False,
                                 "reward_extra_info": {"score": score, "acc": score}},
            })
            keys.append(f"{uid}_{s}_0")
            tags.append({"status": "success", "seq_len": PROMPT_LEN + length, "global_steps": trainer.global_steps})
    meta = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(rows), tags=tags)
    meta.tags = tags  # the replay buffer hands the trainer each row's tags with its key
    return meta, values


def _rows(trainer: CalibRLTrainer, keys: list[str], values: dict) -> StepRows:
    """The same step as plain tensors, built here from the values put (not read back)."""
    width = max(v["length"] for v in values.values())
    mask = torch.zeros(len(keys), width)
    old = torch.zeros(len(keys), width)
    for i, key in enumerate(keys):
        mask[i, : values[key]["length"]] = 1
        old[i, : values[key]["length"]] = values[key]["old_log_probs"]
    scores = torch.tensor([values[k]["score"] for k in keys])
    return StepRows(uids=np.array([k.rsplit("_", 2)[0] for k in keys], dtype=object),
                    is_expert=torch.tensor([values[k]["expert"] for k in keys]),
                    is_padding=torch.zeros(len(keys), dtype=torch.bool), scores=scores, acc=scores,
                    response_mask=mask, old_log_probs=old, expert_truncated=torch.zeros(len(keys), dtype=torch.bool))


def _read(keys: list[str], fields: list[str]) -> dict[str, torch.Tensor]:
    got = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=fields)
    return dict(got.to_padded_tensor().items())


@pytest.mark.parametrize("mode,gap", [("calibrl", "token"), ("calibrl", "sequence"), ("luffy", "token"),
                                      ("rlplus", "token")])
def test_the_advantage_stage_writes_what_step_fields_compute_in_one_get_and_one_put(mode, gap, calls):
    trainer = _trainer(f"calibrl.loss_mode={mode}", f"calibrl.gap={gap}", "actor_rollout_ref.rollout.n=5")
    batch, values = _put_step(trainer, prompts=4, seed=1, missing=1, tag=mode + gap)
    metrics: dict = {}
    before = dict(calls)
    trainer._compute_advantage(batch, metrics)
    assert calls["get"] - before["get"] == 1 and calls["put"] - before["put"] == 1  # verl's own two calls
    want = compute_step_fields(trainer.calibrl, _rows(trainer, batch.keys, values))
    got = _read(batch.keys, ["advantages", "response_mask", actor_loss.EXPERT_LOG_PROB, actor_loss.EXPERT_MASK,
                             actor_loss.EXPERT_BASELINE, actor_loss.CORRECT, actor_loss.IS_EXPERT])
    mask = got["response_mask"].bool()
    torch.testing.assert_close(got["advantages"] * mask, want.advantages * mask)
    # the per-token expert fields are cut to each row's own length; the baseline covers the whole expert
    torch.testing.assert_close(got[actor_loss.EXPERT_LOG_PROB], want.expert_log_prob[:, : mask.shape[1]] * mask)
    torch.testing.assert_close(got[actor_loss.EXPERT_MASK].bool(), want.expert_mask[:, : mask.shape[1]] & mask)
    torch.testing.assert_close(got[actor_loss.EXPERT_BASELINE], want.expert_baseline.float())
    assert got[actor_loss.CORRECT].bool().tolist() == want.correct.tolist()
    assert got[actor_loss.IS_EXPERT].bool().tolist() == want.active_expert.tolist()
    assert want.expert_mask.any() and (~want.expert_mask.any(-1)).any()  # guided and unguided rows both occur
    assert metrics["calibrl/groups_without_expert"] == 1.0
    assert trainer._step_extra.keys() == set(batch.keys)  # kept for _compute_metrics: no third read


def test_inactive_luffy_expert_rows_get_a_zero_update_mask_in_the_same_put(calls):
    """pass_rate mixing: groups whose on-policy pass rate is outside the range keep their expert row in the step
    but out of the update (the loss and its token-mean never see it)."""
    trainer = _trainer("calibrl.loss_mode=luffy", "calibrl.mix_policy=pass_rate", "calibrl.pass_rate_range=[0,0.5]",
                       "actor_rollout_ref.rollout.n=5")
    batch, values = _put_step(trainer, prompts=6, seed=4, tag="inactive")
    metrics: dict = {}
    trainer._compute_advantage(batch, metrics)
    got = _read(batch.keys, ["response_mask", actor_loss.IS_EXPERT])
    want = compute_step_fields(trainer.calibrl, _rows(trainer, batch.keys, values))
    experts = [i for i, k in enumerate(batch.keys) if values[k]["expert"]]
    active = [i for i in experts if want.active_expert[i]]
    assert 0 < len(active) < len(experts)  # both kinds occur with this seed
    for i in experts:
        assert got["response_mask"][i].any() == (i in active)
    assert metrics["calibrl/inactive_expert_rows"] == len(experts) - len(active)


def test_grpo_with_a_dump_dir_dumps_the_advantages_verl_stored(tmp_path: Path, calls):
    import pandas as pd

    trainer = _trainer("calibrl.loss_mode=grpo", f"calibrl.dump_dir={tmp_path}", "actor_rollout_ref.rollout.n=4")
    batch, values = _put_step(trainer, prompts=3, seed=2, tag="grpodump")
    trainer._compute_advantage(batch, {})
    df = pd.read_parquet(tmp_path / "step_000003.parquet")
    stored = _read(batch.keys, ["advantages"])["advantages"][:, 0]
    assert len(df) == len(batch.keys) and not df.is_expert.any() and not df.guided.any()
    assert df.advantage.tolist() == pytest.approx(stored.tolist())
    assert [list(r) for r in df.response_ids] == [values[k]["responses"].tolist() for k in batch.keys]
    assert df.correct.tolist() == [values[k]["score"] > 0 for k in batch.keys]


def test_expert_flags_that_disagree_with_the_agent_loop_are_an_error(calls):
    trainer = _trainer("actor_rollout_ref.rollout.n=5")
    batch, _ = _put_step(trainer, prompts=2, seed=3, tag="disagree")
    trainer._expert_uids = set()  # as if the trainer had not injected what the agent loop did
    with pytest.raises(RuntimeError, match="extra_fields.is_expert"):
        trainer._compute_advantage(batch, {})


def _shapes():
    """(prompts, n, k, dp, mini, micro, missing) shapes for the CalibRL update split (the arithmetic is checked over a
    larger grid in test_step_fields_on_cpu.py; here each shape goes through TransferQueue and verl's balancer)."""
    valid = [(prompts, n, k, dp, mini, micro, missing) for prompts, n, k, dp, mini, micro, missing
             in itertools.product((2, 4, 6), (3, 5), (1, 2), (1, 2, 4), (1, 2), (1, 2, 3), (0, 1))
             if k < n - 1 and prompts % mini == 0 and (mini * (n - k)) % dp == 0]
    return random.Random(0).sample(valid, 40)  # a fixed sample: every value of every axis occurs


def test_every_batch_shape_pads_through_verls_balancer_into_whole_micro_and_mini_batches(calls):
    checked = padded = 0
    for prompts, n, k, dp, mini, micro, missing in _shapes():
        trainer = _trainer(f"actor_rollout_ref.rollout.n={n}", f"calibrl.experts_per_group={k}",
                           f"actor_rollout_ref.actor.ppo_mini_batch_size={mini}",
                           f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}", dp=dp)
        batch, _ = _put_step(trainer, prompts, seed=checked, missing=missing, tag=f"grid{checked}_")
        real, n_on = len(batch), prompts * (n - k)
        out = trainer._balance_batch(batch, {})
        shape = (prompts, n, k, dp, mini, micro, missing)
        pads = [bool(t.get("is_padding", False)) for t in out.tags]
        expert = trainer._expert_flags(out)
        assert len(out) % (dp * micro) == 0, shape  # every rank: whole log-prob micro-batches
        assert sum(pads) == len(out) - real and not any(e and p for e, p in zip(expert, pads, strict=True)), shape
        update = trainer._update_keys
        mini_rows = mini * (n - k)
        assert len(update) % dp == 0 and (len(update) // dp) % (mini_rows // dp) == 0, shape  # whole mini-batches
        onpolicy = {key for key, e, p in zip(out.keys, expert, pads, strict=True) if not e and not p}
        padding = {key for key, p in zip(out.keys, pads, strict=True) if p}
        assert set(update[:n_on]) == onpolicy and set(update[n_on:]) <= padding, shape
        # the update subset is re-balanced over ranks without new padding (as _update_actor does)
        trainer._fixed_multiple = len(update)
        sub = super(CalibRLTrainer, trainer)._balance_batch(out.select_keys(update), {}, "calibrl/update_seqlen")
        trainer._fixed_multiple = None
        assert sorted(sub.keys) == sorted(update)
        # verl's padding rows exist in TransferQueue with an empty response mask: no-ops in every loss
        pad_keys = [key for key, p in zip(out.keys, pads, strict=True) if p]
        if pad_keys:
            assert not tq.kv_batch_get(keys=pad_keys, partition_id="train",
                                       select_fields=["response_mask"])["response_mask"].values().any()
            padded += 1
        want_total = update_padding(prompts * (n - k), (prompts - missing) * k, dp, mini_rows, dp * micro)[1]
        assert len(out) - real == want_total
        checked += 1
    assert checked >= 20 and padded >= 10
