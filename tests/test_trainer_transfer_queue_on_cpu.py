"""The trainer's stages against a real TransferQueue (Ray-local, in this process) and verl 0.9.1's own stage code.

verl's V1 trainer keeps a step's rows in TransferQueue; its stages (``_balance_batch`` with the padding rows of
``upsample_batch_to_divisible_size``, ``_compute_old_log_prob``, ``_compute_advantage``, ``_update_actor``,
``_compute_metrics``) read and write them there. These tests put rows the way verl's agent loop does (one key
``{uid}_{session}_0`` per row, nested per-row tensors, tags with ``seq_len``), run the CalibRL trainer's real stage
methods, and read back what the update would see. Expected values come from ``_expected``, a per-row reference
written here from the algorithm's rules (docs/algorithm.md), never from the code under test:

* the advantage stage: advantages, correctness, the group expert's fields and the active-expert flag, written by
  one get and one put (CalibRL's fields ride on verl's calls, ``integration/stage_io.py``); inactive LUFFY expert
  rows are masked; a group whose expert row was dropped (``expert_overlong=drop``) is a group without expert;
  GRPO with ``calibrl.dump_dir`` dumps the step;
* the old-log-prob stage: expert rows' placeholder rollout log-probs are replaced, entropy and rollout-vs-actor
  metrics cover on-policy rows only;
* the update sees the on-policy rows with ``rollout.n`` = the on-policy count, restored also when it raises;
  verl's step metrics cover on-policy rows only;
* the padding grid through verl's real balancer: every shape pads into whole log-prob micro-batches and whole
  update mini-batches on every rank, with the padding rows verl builds in TransferQueue.

The actor worker group is replaced by ``_WorkerGroup``, a small stand-in for the GPU workers that computes
deterministic log-probs and entropy from the tokens and records what the update is handed; verl's stage code runs.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensordict import TensorDict

from calibrl_verl.config import CalibRLConfig
from calibrl_verl.integration import actor_loss
from calibrl_verl.integration.step_fields import update_padding
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


def _onpolicy(n_on: int) -> str:
    """The config override for ``n_on`` on-policy samples per prompt (``rollout.n`` follows from it)."""
    return f"calibrl.n_onpolicy={n_on}"


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
    trainer.actor_rollout_wg = _WorkerGroup(trainer, dp)
    trainer._balance_target = trainer._fixed_multiple = trainer._update_keys = None
    trainer._prompt_position, trainer._expert_uids, trainer._step_extra = {}, set(), {}
    trainer._short_groups = 0
    return trainer


class _WorkerGroup:
    """Stands in for the actor worker group (the GPU workers), on the same TransferQueue.

    ``compute_log_prob`` reads each row's tokens and writes ``log_probs`` / ``entropy`` over prompt + response
    (position j holds the value for token j + 1, as verl's engine returns them), which verl's workers write through
    their TransferQueue bridge: log-prob -((token % 5) + 1) / 10 and entropy ((token % 3) + 1) / 4 for each next
    token. ``update_actor`` records the rows and ``rollout.n`` it is handed, and raises when ``fail`` is set.
    """

    def __init__(self, trainer: CalibRLTrainer, dp: int) -> None:
        self._dispatch_info = {"actor": list(range(dp))}
        self._trainer = trainer
        self.fail = False
        self.updates: list[dict] = []

    def compute_log_prob(self, batch):
        ids = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["input_ids"])
        log_probs, entropy = [], []
        for seq in ids["input_ids"].unbind():
            nxt = torch.cat([seq[1:], torch.zeros(1, dtype=seq.dtype)])
            last = torch.arange(len(seq)) == len(seq) - 1
            log_probs.append(torch.where(last, 0.0, -((nxt % 5) + 1).float() / 10))
            entropy.append(torch.where(last, 0.0, ((nxt % 3) + 1).float() / 4))
        fields = TensorDict({"log_probs": _nested(log_probs), "entropy": _nested(entropy)}, batch_size=len(batch))
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
        return batch

    def update_actor(self, batch):
        rollout = self._trainer.config.actor_rollout_ref.rollout
        self.updates.append({"keys": list(batch.keys), "rollout_n": int(rollout.n),
                             "global_batch_size": batch.extra_info["global_batch_size"]})
        if self.fail:
            raise RuntimeError("the update failed on a rank")
        return {"metrics": {"mfu": [0.5], "pg_loss": [0.25], "calibrl/guide_loss": [0.125]}}


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _put_step(trainer: CalibRLTrainer, prompts: int, seed: int = 0, missing: int = 0, tag: str = "s",
              levels: tuple[float, ...] = (0.0, 1.0), acc: bool = True, dropped: int = 0):
    """One step's rows into TransferQueue as verl's agent loop writes them: ``prompts`` groups of the on-policy
    count of sampled rows (rewards drawn from ``levels``), plus ``k`` expert rows (reward ``levels[-1]``, placeholder
    rollout log-probs 0) for each group the trainer injected. The last ``missing`` groups have no expert; the
    ``dropped`` groups before them were injected but their expert row was dropped (the agent loop stored none).
    ``acc``: the reward returns a dict with ``acc`` (= reward >= 1), else a float (verl stores ``{"acc": score}``).
    Returns the batch meta and the rows' values by key."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    gen = torch.Generator().manual_seed(seed)
    n_on, k = trainer.n_onpolicy, trainer.calibrl.n_expert
    uids = [f"{tag}{seed}p{p}" for p in range(prompts)]
    trainer._prompt_position = {u: i for i, u in enumerate(uids)}
    trainer._expert_uids = set(uids[: prompts - missing]) if k else set()
    stored = set(uids[: prompts - missing - dropped]) if k else set()
    keys, rows, tags, values = [], [], [], {}
    for uid in uids:
        sessions = n_on + (k if uid in stored else 0)
        for s in range(sessions):
            expert = s >= n_on
            length = int(torch.randint(2, 9, (1,), generator=gen))
            pick = int(torch.randint(0, len(levels), (1,), generator=gen))
            score = float(levels[-1] if expert else levels[pick])
            old = -torch.rand(length, generator=gen) * 3
            values[f"{uid}_{s}_0"] = row = {
                "score": score, "acc": float(score >= 1.0), "expert": expert, "length": length, "old_log_probs": old,
                "rollout_log_probs": torch.zeros(length) if expert else old - 0.01,
                "responses": torch.randint(3, 50, (length,), generator=gen)}
            rm = torch.zeros(length)
            rm[-1] = score
            prompt = torch.full((PROMPT_LEN,), 5)
            info = {"score": score, "acc": row["acc"]} if acc else {"acc": score}
            rows.append({
                "uid": uid, "prompts": prompt, "responses": row["responses"],
                "input_ids": torch.cat([prompt, row["responses"]]),
                "attention_mask": torch.ones(PROMPT_LEN + length, dtype=torch.int64),
                "position_ids": torch.arange(PROMPT_LEN + length),
                "response_mask": torch.ones(length, dtype=torch.int64),
                "loss_mask": torch.ones(length, dtype=torch.int64), "rm_scores": rm,
                "old_log_probs": old, "rollout_log_probs": row["rollout_log_probs"], "num_turns": 2,
                "extra_fields": {"is_expert": expert, "expert_truncated": False, "reward_extra_info": info},
            })
            keys.append(f"{uid}_{s}_0")
            tags.append({"status": "success", "seq_len": PROMPT_LEN + length, "global_steps": trainer.global_steps,
                         "min_global_steps": trainer.global_steps - 1, "max_global_steps": trainer.global_steps - 1})
    meta = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(rows), tags=tags)
    meta.tags = tags  # the replay buffer hands the trainer each row's tags with its key
    return meta, values


def _uid(key: str) -> str:
    return key.rsplit("_", 2)[0]


def _expected(cfg: CalibRLConfig, values: dict, acc: bool = True) -> dict[str, dict]:
    """Per key, what the advantage stage must write, from the rules (one expert per group, no padding rows):

    on-policy rows: A = r - mean of the group's on-policy rewards (/ (unbiased std + 1e-6) with norm_adv_by_std),
    0 when those rewards are all equal; expert rows: 0, or for LUFFY / RL-PLUS A_e = r_e - mean (same division) when
    the group uses its expert (``adv`` None: a zero-std group under norm_adv_by_std, left unchecked);
    correct = acc > 0 when the reward has ``acc``, else r > pass_threshold; a group uses its expert when it has one
    and (pass_rate mixing) its on-policy pass rate is in range; then each of its on-policy rows carries the expert's
    old log-probs position-aligned, a mask where the expert has a token (both cut to the row's length) and the
    baseline = sum (or mean) of ALL the expert's old log-probs. Everything else: zeros.
    """
    groups: dict[str, list[str]] = {}
    for key in values:
        groups.setdefault(_uid(key), []).append(key)
    out = {}
    for members in groups.values():
        onpolicy = [k for k in members if not values[k]["expert"]]
        experts = [k for k in members if values[k]["expert"]]
        rewards = [values[k]["score"] for k in onpolicy]
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
        correct = {k: (values[k]["acc"] > 0) if acc else (values[k]["score"] > cfg.pass_threshold) for k in members}
        rate = sum(correct[k] for k in onpolicy) / len(onpolicy)
        lo, hi = cfg.pass_rate_range
        uses_expert = bool(experts) and (cfg.mix_policy != "pass_rate" or lo <= rate <= hi)

        def centred(r: float, std=std, mean=mean) -> float:
            return (r - mean) / (std + 1e-6) if cfg.norm_adv_by_std else r - mean

        for key in members:
            row, n = values[key], values[key]["length"]
            if row["expert"]:
                adv = 0.0
                if uses_expert and cfg.loss_mode in ("luffy", "rlplus"):
                    adv = None if cfg.norm_adv_by_std and std == 0 else centred(row["score"])
            else:
                adv = 0.0 if max(rewards) == min(rewards) else centred(row["score"])
            elp, emask, baseline = [0.0] * n, [False] * n, 0.0
            if uses_expert and not row["expert"]:
                expert = values[experts[0]]
                e_lp = [float(x) for x in expert["old_log_probs"]]
                elp = [e_lp[t] if t < len(e_lp) else 0.0 for t in range(n)]
                emask = [t < len(e_lp) for t in range(n)]
                baseline = sum(e_lp) if cfg.sequence_norm == "sum" else sum(e_lp) / len(e_lp)
            out[key] = {"adv": adv, "correct": correct[key], "elp": elp, "emask": emask, "baseline": baseline,
                        "active": row["expert"] and uses_expert}
    return out


def _read(keys: list[str], fields: list[str]) -> dict[str, torch.Tensor]:
    got = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=fields)
    return dict(got.to_padded_tensor().items())


LOSS_FIELDS = ["advantages", "response_mask", actor_loss.EXPERT_LOG_PROB, actor_loss.EXPERT_MASK,
               actor_loss.EXPERT_BASELINE, actor_loss.CORRECT, actor_loss.IS_EXPERT]


def _assert_written_as_expected(keys: list[str], values: dict, want: dict[str, dict]) -> None:
    """What TransferQueue holds for ``keys`` after the advantage stage equals ``want`` (from ``_expected``)."""
    got = _read(keys, LOSS_FIELDS)
    for i, key in enumerate(keys):
        n, w = values[key]["length"], want[key]
        if w["adv"] is not None and got["response_mask"][i].any():
            torch.testing.assert_close(got["advantages"][i, :n], torch.full((n,), w["adv"]), msg=key)
        torch.testing.assert_close(got[actor_loss.EXPERT_LOG_PROB][i, :n], torch.tensor(w["elp"]), msg=key)
        assert got[actor_loss.EXPERT_MASK][i, :n].bool().tolist() == w["emask"], key
        assert got[actor_loss.EXPERT_BASELINE][i].item() == pytest.approx(w["baseline"], rel=1e-5, abs=1e-6), key
        assert bool(got[actor_loss.CORRECT][i]) == w["correct"], key
        assert bool(got[actor_loss.IS_EXPERT][i]) == w["active"], key


@pytest.mark.parametrize("mode,gap,norm", [("calibrl", "token", False), ("calibrl", "sequence", False),
                                           ("calibrl", "token", True), ("luffy", "token", False),
                                           ("rlplus", "token", False), ("luffy", "token", True),
                                           ("rlplus", "token", True)])
def test_the_advantage_stage_writes_the_rules_values_in_one_get_and_one_put(mode, gap, norm, calls):
    trainer = _trainer(f"calibrl.loss_mode={mode}", f"calibrl.gap={gap}", f"calibrl.norm_adv_by_std={norm}",
                       "calibrl.sequence_norm=mean" if gap == "sequence" else "calibrl.sequence_norm=sum", _onpolicy(4))
    batch, values = _put_step(trainer, prompts=4, seed=1, missing=1, tag=f"{mode}{gap}{norm}",
                              levels=(0.0, 0.1, 1.1) if norm else (0.0, 1.0))
    metrics: dict = {}
    before = dict(calls)
    trainer._compute_advantage(batch, metrics)
    assert calls["get"] - before["get"] == 1 and calls["put"] - before["put"] == 1  # verl's own two calls
    want = _expected(trainer.calibrl, values)
    _assert_written_as_expected(batch.keys, values, want)
    assert any(any(w["emask"]) for w in want.values()) and any(not any(w["emask"]) for w in want.values())
    if mode != "calibrl":  # the active expert rows got their own advantage, not 0
        assert any(w["active"] and w["adv"] for w in want.values())
    if norm:  # a group with non-zero std, where the division changes the values
        assert any(w["adv"] and abs(w["adv"]) > 1.0 for w in want.values())
    assert metrics["calibrl/groups_without_expert"] == 1.0
    assert trainer._step_extra.keys() == set(batch.keys)  # kept for _compute_metrics: no third read


def test_correctness_falls_back_to_the_pass_threshold_without_an_acc_field(calls):
    """A float reward (verl stores it as ``{"acc": score}``): correct = r > 0.1, so a format-only 0.1 is wrong."""
    trainer = _trainer(_onpolicy(4))
    batch, values = _put_step(trainer, prompts=3, seed=6, tag="threshold", levels=(0.0, 0.1, 1.1), acc=False)
    trainer._compute_advantage(batch, {})
    want = _expected(trainer.calibrl, values, acc=False)
    _assert_written_as_expected(batch.keys, values, want)
    assert any(values[k]["score"] == 0.1 for k in batch.keys)


def test_inactive_luffy_expert_rows_get_a_zero_update_mask_in_the_same_put(calls):
    """pass_rate mixing: groups whose on-policy pass rate is outside the range keep their expert row in the step
    but out of the update (the loss and its token-mean never see it)."""
    trainer = _trainer("calibrl.loss_mode=luffy", "calibrl.mix_policy=pass_rate", "calibrl.pass_rate_range=[0,0.5]",
                       _onpolicy(4))
    batch, values = _put_step(trainer, prompts=6, seed=4, tag="inactive")
    metrics: dict = {}
    trainer._compute_advantage(batch, metrics)
    want = _expected(trainer.calibrl, values)
    _assert_written_as_expected(batch.keys, values, want)
    got = _read(batch.keys, ["response_mask"])
    experts = [i for i, k in enumerate(batch.keys) if values[k]["expert"]]
    active = [i for i in experts if want[batch.keys[i]]["active"]]
    assert 0 < len(active) < len(experts)  # both kinds occur with this seed
    for i, key in enumerate(batch.keys):
        assert got["response_mask"][i, : values[key]["length"]].all() == (i not in experts or i in active), key
    assert metrics["calibrl/inactive_expert_rows"] == len(experts) - len(active)


def test_a_group_whose_expert_row_was_dropped_is_a_group_without_expert(calls):
    """``expert_overlong=drop``: the trainer injected the expert but the agent loop stored no row for it. The keys
    lack the expert session, so the group is balanced, scored and counted as one without expert."""
    trainer = _trainer("calibrl.expert_overlong=drop", _onpolicy(4), "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                       dp=2)
    batch, values = _put_step(trainer, prompts=4, seed=5, dropped=1, tag="dropped")
    dropped_uid = f"dropped5p{3}"
    assert dropped_uid in trainer._expert_uids and not any(_uid(k) == dropped_uid and values[k]["expert"]
                                                            for k in values)
    metrics: dict = {}
    batch = trainer._balance_batch(batch, metrics)
    trainer._compute_advantage(batch, metrics)
    real = [k for k in batch.keys if k in values]
    want = _expected(trainer.calibrl, values)
    _assert_written_as_expected(real, values, want)
    assert not any(any(want[k]["emask"]) for k in real if _uid(k) == dropped_uid)
    assert metrics["calibrl/groups_without_expert"] == 1.0
    assert metrics["calibrl/expert_groups_frac"] == pytest.approx(3 / 4)
    assert set(trainer._update_keys[: 16]) == {k for k in real if not values[k]["expert"]}


def test_grpo_with_a_dump_dir_dumps_the_advantages_verl_stored(tmp_path: Path, calls):
    import pandas as pd

    trainer = _trainer("calibrl.loss_mode=grpo", f"calibrl.dump_dir={tmp_path}", _onpolicy(4))
    batch, values = _put_step(trainer, prompts=3, seed=2, tag="grpodump")
    trainer._compute_advantage(batch, {})
    df = pd.read_parquet(tmp_path / "step_000003.parquet")
    stored = _read(batch.keys, ["advantages"])["advantages"][:, 0]
    assert len(df) == len(batch.keys) and not df.is_expert.any() and not df.guided.any()
    assert df.advantage.tolist() == pytest.approx(stored.tolist())
    assert [list(r) for r in df.response_ids] == [values[k]["responses"].tolist() for k in batch.keys]
    assert df.correct.tolist() == [values[k]["score"] > 0 for k in batch.keys]


def test_expert_flags_that_disagree_with_the_agent_loop_are_an_error(calls):
    trainer = _trainer(_onpolicy(4))
    batch, _ = _put_step(trainer, prompts=2, seed=3, tag="disagree")
    trainer._expert_uids = set()  # as if the trainer had not injected what the agent loop did
    with pytest.raises(RuntimeError, match="extra_fields.is_expert"):
        trainer._compute_advantage(batch, {})


def _next_token_log_prob(token: int) -> float:
    """What ``_WorkerGroup.compute_log_prob`` assigns a response token (written out here, not imported)."""
    return -((token % 5) + 1) / 10


def test_old_log_probs_replace_expert_placeholders_and_metrics_cover_onpolicy_rows(calls):
    trainer = _trainer(_onpolicy(4))
    batch, values = _put_step(trainer, prompts=3, seed=7, missing=1, tag="oldlp")
    metrics: dict = {}
    before = dict(calls)
    trainer._compute_old_log_prob(batch, metrics)
    assert calls["get"] - before["get"] == 1 and calls["put"] - before["put"] == 1  # verl's own two calls
    got = _read(batch.keys, ["old_log_probs", "rollout_log_probs", "entropy"])
    ent_sum = ent_n = 0.0
    diffs = []
    for i, key in enumerate(batch.keys):
        row, n = values[key], values[key]["length"]
        old = torch.tensor([_next_token_log_prob(int(t)) for t in row["responses"]])
        ent = torch.tensor([((int(t) % 3) + 1) / 4 for t in row["responses"]])
        torch.testing.assert_close(got["old_log_probs"][i, :n], old, msg=key)
        torch.testing.assert_close(got["entropy"][i, :n], ent, msg=key)
        # expert rows: the placeholder 0s become their old log-probs; sampled rows keep the rollout's
        torch.testing.assert_close(got["rollout_log_probs"][i, :n], old if row["expert"] else row["rollout_log_probs"],
                                   msg=key)
        if not row["expert"]:
            ent_sum, ent_n = ent_sum + float(ent.sum()), ent_n + n
            diffs += [abs(math.exp(a) - math.exp(b)) for a, b in zip(old.tolist(), row["rollout_log_probs"].tolist(),
                                                                       strict=True)]
    assert metrics["actor/entropy"] == pytest.approx(ent_sum / ent_n, rel=1e-5)
    assert metrics["training/rollout_probs_diff_max"] == pytest.approx(max(diffs), rel=1e-5)
    assert metrics["training/rollout_probs_diff_mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-5)
    all_rows = sum(float(got["entropy"][i, : values[k]["length"]].sum()) for i, k in enumerate(batch.keys))
    assert all_rows / sum(v["length"] for v in values.values()) != pytest.approx(ent_sum / ent_n)  # experts differ


@pytest.mark.parametrize("mode", ["calibrl", "luffy"])
def test_the_update_sees_its_rows_with_rollout_n_set_for_them_and_restored(mode, calls):
    trainer = _trainer(f"calibrl.loss_mode={mode}", _onpolicy(3), "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                       dp=2)
    full_n = int(trainer.config.actor_rollout_ref.rollout.n)
    batch, values = _put_step(trainer, prompts=4, seed=8, missing=1, tag=f"update{mode}")
    batch = trainer._balance_batch(batch, {})
    metrics: dict = {}
    trainer._update_actor(batch, metrics)
    (seen,) = trainer.actor_rollout_wg.updates
    onpolicy = {k for k in values if not values[k]["expert"]}
    pads = [k for k in seen["keys"] if k not in values]
    if mode == "calibrl":  # on-policy rows + update padding, mini-batches of ppo_mini_batch_size * n_onpolicy rows
        assert set(seen["keys"]) - set(pads) == onpolicy and (seen["rollout_n"], seen["global_batch_size"]) == (3, 6)
        assert len(seen["keys"]) % 6 == 0 and len(pads) == len(seen["keys"]) - 12
        assert metrics["calibrl/update_rows"] == float(len(seen["keys"]))
    else:  # LUFFY trains on the expert rows too: the whole step, rollout.n as configured
        assert set(seen["keys"]) - set(pads) == set(values) and seen["rollout_n"] == full_n
    assert trainer.config.actor_rollout_ref.rollout.n == full_n
    assert metrics["calibrl/guide_loss"] == 0.125 and "actor/calibrl/guide_loss" not in metrics
    assert metrics["actor/pg_loss"] == 0.25


def test_rollout_n_is_restored_when_the_update_raises(calls):
    trainer = _trainer(_onpolicy(3), "actor_rollout_ref.actor.ppo_mini_batch_size=2")
    full_n = int(trainer.config.actor_rollout_ref.rollout.n)
    batch, _ = _put_step(trainer, prompts=2, seed=9, tag="raises")
    batch = trainer._balance_batch(batch, {})
    trainer.actor_rollout_wg.fail = True
    with pytest.raises(RuntimeError, match="failed on a rank"):
        trainer._update_actor(batch, {})
    assert trainer.actor_rollout_wg.updates[0]["rollout_n"] == 3
    assert trainer.config.actor_rollout_ref.rollout.n == full_n and trainer._fixed_multiple is None


def test_verls_step_metrics_cover_onpolicy_rows_only(calls):
    from verl.trainer.ppo.metric_utils import RolloutMoELoadBalanceMetricsAccumulator

    trainer = _trainer(_onpolicy(4))
    trainer.resource_pool_manager = SimpleNamespace(get_n_gpus=lambda: 1)
    trainer._rollout_moe_lb_metrics_accumulator = RolloutMoELoadBalanceMetricsAccumulator(
        model_config=trainer.config.actor_rollout_ref.model)
    batch, values = _put_step(trainer, prompts=3, seed=10, missing=1, tag="metrics", levels=(0.0, 0.1, 1.1))
    trainer._compute_advantage(batch, metrics := {})
    trainer._compute_metrics(batch, metrics, {"step": 2.0}, global_steps=3, epoch=0)
    onpolicy = [k for k in batch.keys if not values[k]["expert"]]
    want = _expected(trainer.calibrl, values)
    scores = [values[k]["score"] for k in onpolicy]
    lengths = [values[k]["length"] for k in onpolicy]
    assert metrics["critic/score/mean"] == pytest.approx(sum(scores) / len(scores))
    assert sum(scores) / len(scores) != pytest.approx(sum(v["score"] for v in values.values()) / len(values))
    assert metrics["response_length/mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert metrics["critic/advantages/max"] == pytest.approx(max(want[k]["adv"] for k in onpolicy), rel=1e-5)
    assert metrics["critic/advantages/min"] == pytest.approx(min(want[k]["adv"] for k in onpolicy), rel=1e-5)
    assert metrics["perf/total_num_tokens"] == sum(PROMPT_LEN + n for n in lengths)
    assert metrics["calibrl/reward_faults"] == 0.0 and trainer._step_extra == {}


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
        trainer = _trainer(_onpolicy(n - k), f"calibrl.experts_per_group={k}",
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
