"""The CalibRL trainer: verl 0.9.1's synchronous V1 trainer with expert rows, CalibRL advantages and the guide loss.

Registered as ``trainer.v1.trainer_mode=calibrl``. A step is verl's step (``PPOTrainer._step_once``) with these
stages overridden, each calling verl's own implementation for the work verl already does:

1. ``_next_train_batch``: decides per prompt whether its expert joins the group this step (warm-up,
   ``mix_policy: random``, a missing expert) and tells the agent loop through ``__rollout_n__`` and
   ``calibrl_expert`` (see ``agent_loop``).
2. ``_balance_batch``: pads so that both the full batch (old log-probs) and the on-policy subset (the update)
   split evenly over data-parallel ranks and mini-batches.
3. ``_compute_old_log_prob``: verl recomputes old log-probs for every row, experts included (their
   calibration baseline); expert rows' placeholder rollout log-probs are replaced by them, and entropy and
   rollout-vs-actor metrics are recomputed over on-policy rows only.
4. ``_compute_advantage``: CalibRL advantages through verl's own ``compute_advantage`` (the registered
   ``calibrl`` estimator, with expert and padding rows out of the statistics), then per-row correctness and
   each on-policy row's group-expert log-probs, mask and whole-expert baseline (sequence gap), written to
   TransferQueue for the loss; LUFFY / RL-PLUS expert rows whose group does not use its expert get a zero update
   mask. With ``calibrl.dump_dir`` the step's rows are also written to a parquet file (``step_dump``).
5. ``_update_actor``: the update sees only on-policy rows (``calibrl``); LUFFY / RL-PLUS train on the expert
   rows too. The loss is installed once with ``set_loss_fn`` (``actor_loss.calibrl_actor_loss``).
6. ``_compute_metrics``: verl's metrics over on-policy rows, plus the ``calibrl/*`` metrics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from omegaconf import open_dict
from tensordict import TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import agg_loss
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.debug.metrics import calculate_debug_metrics
from verl.workers.utils.padding import response_to_nested

from calibrl_verl import core_algos
from calibrl_verl.config import CalibRLConfig, CalibRLConfigError
from calibrl_verl.integration import actor_loss, step_dump
from calibrl_verl.integration.registry import ADV_EXTRAS
from calibrl_verl.integration.step_fields import (
    StepFields,
    StepRows,
    compute_step_fields,
    fault_metrics,
    update_padding,
    update_response_mask,
)

TRAINER_NAME = "calibrl"
# verl 0.9.1's sync ReplayBuffer polls TransferQueue for finished rollouts every 2 s (a constructor default no
# config key reaches), so a step whose rollouts finish after 2.1 s waits until 4 s. A poll is one metadata read.
REPLAY_POLL_INTERVAL_S = 0.2


@register_trainer(TRAINER_NAME)
class CalibRLTrainer(PPOTrainerSync):
    """verl's sync V1 trainer with CalibRL's data-source hook, advantage, loss and metrics."""

    def __init__(self, config: Any) -> None:
        self.calibrl = CalibRLConfig.from_config(config.get("calibrl"))
        # verl 0.9.1 (trainer_base.py ~129) picks sync vs async code paths by the trainer_mode *name*; ours is
        # only the registry key, so run verl's sync paths under it.
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)
        self._update_keys: list[str] | None = None
        self._balance_target: tuple[int, int] | None = None
        self._fixed_multiple: int | None = None
        self._prompt_position: dict[str, int] = {}

    # -- set-up -------------------------------------------------------------------------------------------
    @property
    def n_onpolicy(self) -> int:
        return int(self.config.actor_rollout_ref.rollout.n) - self.calibrl.n_expert

    @property
    def drops_experts(self) -> bool:
        """CalibRL never trains on expert rows: they are left out of the update (LUFFY / RL-PLUS keep them)."""
        return self.calibrl.loss_mode == "calibrl"

    def _build_replay_buffer(self):
        buffer = super()._build_replay_buffer()
        if hasattr(buffer, "poll_interval"):
            buffer.poll_interval = min(buffer.poll_interval, REPLAY_POLL_INTERVAL_S)
        return buffer

    def on_init_end(self) -> None:
        self.calibrl.check_run_length(self.total_training_steps)
        if self.calibrl.loss_mode != "grpo":
            actor_cfg = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            self.actor_rollout_wg.set_loss_fn(partial(actor_loss.calibrl_actor_loss, config=actor_cfg,
                                                      calibrl=self.calibrl))
        super().on_init_end()

    # -- 1. which groups get their expert -------------------------------------------------------------------
    def _next_train_batch(self, num_prompts: int | None = None) -> TensorDict:
        batch = super()._next_train_batch(num_prompts)
        self._prompt_position = {str(uid): i for i, uid in enumerate(_as_list(batch["uid"]))}
        if self.calibrl.n_expert == 0:
            return batch
        inject = self._expert_injection(batch)
        k = self.calibrl.n_expert
        batch["__rollout_n__"] = torch.where(inject, self.n_onpolicy + k, self.n_onpolicy).long()
        batch["calibrl_expert"] = inject
        return batch

    def _expert_injection(self, batch: TensorDict) -> torch.Tensor:
        """Per prompt: does its expert join the group? Deterministic in (seed, step), so resume-safe."""
        key = self.calibrl.expert_key
        if key not in batch.keys():
            raise CalibRLConfigError(
                f"calibrl.expert_key={key!r}: the training data has no such column (columns: {sorted(batch.keys())})"
            )
        texts = _as_list(batch[key])
        has_text = torch.tensor([isinstance(t, str) and bool(t.strip()) for t in texts])
        if self.calibrl.in_warmup(self.global_steps):
            return torch.zeros(len(texts), dtype=torch.bool)
        if self.calibrl.mix_policy == "random":
            draws = np.random.default_rng([self.calibrl.seed, self.global_steps]).random(len(texts))
            has_text &= torch.from_numpy(draws < self.calibrl.mix_ratio)
        return has_text

    # -- 2. padding for the on-policy update ------------------------------------------------------------------
    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        if self._balance_target is None and self._fixed_multiple is None:  # the step's batch, as generated
            batch.reorder(canonical_row_order(batch.keys, self._prompt_position))
        if not self.drops_experts or self._balance_target is not None:
            return super()._balance_batch(batch, metrics, logging_prefix, keep_minibatch)
        expert = self._expert_flags(batch)
        onpolicy_keys = [key for key, e in zip(batch.keys, expert, strict=True) if not e]
        self._balance_target = (len(onpolicy_keys), len(batch) - len(onpolicy_keys))
        try:
            batch = super()._balance_batch(batch, metrics, logging_prefix, keep_minibatch)
        finally:
            n_update = self._balance_target[0]  # on-policy + update padding, set by _get_required_batch_multiple
            self._balance_target = None
        pads = sorted(k for k, t in zip(batch.keys, batch.tags, strict=True) if t.get("is_padding"))
        self._update_keys = onpolicy_keys + pads[: n_update - len(onpolicy_keys)]
        return batch

    def _get_required_batch_multiple(self, dp_size: int) -> int:
        """While balancing a CalibRL batch, pad to a size whose on-policy part fills whole update mini-batches.

        verl pads the step to lcm(dp, ppo_mini_batch_size * rollout.n). We update on the on-policy rows plus
        p_sub padding rows, which must fill whole mini-batches of ppo_mini_batch_size * n_onpolicy rows on
        every rank, while the full batch (experts included) must split evenly over the dp ranks.
        """
        if self._fixed_multiple is not None:
            return self._fixed_multiple
        if self._balance_target is None:
            multiple = super()._get_required_batch_multiple(dp_size)
            # groups of n or n - k rows (mixing, missing experts): also whole log-prob micro-batches per rank
            return math.lcm(multiple, dp_size * self._log_prob_micro_batch()) if self.calibrl.n_expert else multiple
        n_on, n_expert = self._balance_target
        mini = int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size) * self.n_onpolicy
        p_update, p_total = update_padding(n_on, n_expert, dp_size, mini, dp_size * self._log_prob_micro_batch())
        self._balance_target = (n_on + p_update, n_expert)
        return n_on + n_expert + p_total  # verl pads to a multiple of this: exactly p_total rows

    def _log_prob_micro_batch(self) -> int:
        """Rows per log-prob micro-batch per rank when fixed (verl asserts each rank's rows divide by it)."""
        rollout = self.config.actor_rollout_ref.rollout
        if rollout.get("log_prob_use_dynamic_bsz", False):
            return 1
        return int(rollout.get("log_prob_micro_batch_size_per_gpu") or 1)

    # -- 3. old log-probs: expert baseline, on-policy entropy ---------------------------------------------------
    def _compute_old_log_prob(self, batch, metrics):
        batch = super()._compute_old_log_prob(batch, metrics)
        if self.calibrl.n_expert == 0:
            return batch
        calc = bool(self.config.actor_rollout_ref.rollout.calculate_log_probs)
        fields = ["old_log_probs", "entropy", "response_mask"] + (["rollout_log_probs", "responses"] if calc else [])
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        expert = torch.tensor(self._expert_flags(batch))
        onpolicy = ~expert & ~torch.tensor(self._padding_flags(batch))
        padded = data.to_padded_tensor()
        if calc:  # experts have placeholder rollout log-probs: make them "on-policy" so no metric or weight sees 0s
            fixed = torch.where(expert.unsqueeze(-1), padded["old_log_probs"], padded["rollout_log_probs"])
            batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(
                {"rollout_log_probs": response_to_nested(fixed, data["response_mask"])}, batch_size=len(batch)))
        self._onpolicy_old_log_prob_metrics(padded, onpolicy, metrics, calc)
        return batch

    def _onpolicy_old_log_prob_metrics(self, padded: TensorDict, onpolicy: torch.Tensor, metrics: dict,
                                       calc: bool) -> None:
        """verl's entropy (and rollout-vs-actor) metrics again, over on-policy rows only (SPEC §5)."""
        if not onpolicy.any():
            return
        actor_cfg = self.config.actor_rollout_ref.actor
        sub = padded[onpolicy]
        metrics["actor/entropy"] = agg_loss(loss_mat=sub["entropy"], loss_mask=sub["response_mask"],
                                            loss_agg_mode=actor_cfg.loss_agg_mode,
                                            loss_scale_factor=actor_cfg.loss_scale_factor).item()
        if calc:
            metrics.update(calculate_debug_metrics(DataProto(batch=sub)))

    # -- 4. advantages, correctness, expert alignment ---------------------------------------------------------
    def _compute_advantage(self, batch, metrics):
        if self.calibrl.n_expert == 0:
            batch = super()._compute_advantage(batch, metrics)
            if self.calibrl.dump_dir:
                rows, _ = self._step_rows(batch)
                correct = core_algos.correctness_sign(rows.scores, rows.acc, self.calibrl.pass_threshold)
                self._dump_step(batch, rows, correct, torch.zeros_like(correct), torch.zeros(len(correct)))
            return batch
        keys, partition_id = list(batch.keys), batch.partition_id
        rows, response_mask = self._step_rows(batch)
        fields = compute_step_fields(self.calibrl, rows)
        metrics.update(fields.metrics)
        excluded = rows.is_expert | rows.is_padding
        offpolicy = self.calibrl.loss_mode in ("luffy", "rlplus")
        token = ADV_EXTRAS.set({"is_expert": excluded, "norm_adv_by_std": self.calibrl.norm_adv_by_std,
                                "expert_rows": fields.active_expert if offpolicy else None,
                                "is_padding": rows.is_padding})
        try:  # verl's own pipeline (KL-in-reward, rollout correction) calls the registered `calibrl` estimator
            batch = super()._compute_advantage(batch, metrics)
        finally:
            ADV_EXTRAS.reset(token)
        fields_out = {}
        if offpolicy:  # inactive expert rows would otherwise still count in the update (see update_response_mask)
            mask = update_response_mask(rows, fields.active_expert)
            metrics["calibrl/inactive_expert_rows"] = float((rows.response_mask.any(-1) & ~mask.any(-1)).sum())
            fields_out["response_mask"] = response_to_nested(mask.to(response_mask.dtype), response_mask)
        out = TensorDict({
            **fields_out,
            actor_loss.EXPERT_LOG_PROB: response_to_nested(fields.expert_log_prob, response_mask),
            actor_loss.EXPERT_MASK: response_to_nested(fields.expert_mask.float(), response_mask),
            actor_loss.EXPERT_BASELINE: fields.expert_baseline.float(),
            actor_loss.CORRECT: fields.correct.float(),
            actor_loss.IS_EXPERT: fields.active_expert.float(),
        }, batch_size=len(keys))
        batch = tq.kv_batch_put(keys=keys, partition_id=partition_id, fields=out)
        if self.calibrl.dump_dir:
            guided = rows.onpolicy & fields.expert_mask.any(-1) & (self.calibrl.loss_mode == "calibrl")
            self._dump_step(batch, rows, fields, guided)
        return batch

    def _dump_step(self, batch, rows: StepRows, fields: StepFields, guided: torch.Tensor) -> None:
        """``calibrl.dump_dir``: the step's rows with the advantages verl stored for the update (step_dump.py)."""
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["advantages", "responses"])
        padded = data.to_padded_tensor()
        table = step_dump.step_table(self.global_steps, rows.uids, rows.is_expert, rows.is_padding,
                                     padded["responses"], rows.response_mask, rows.old_log_probs, rows.scores,
                                     rows.acc, fields.correct, padded["advantages"], guided,
                                     fields.expert_baseline, fields.active_expert)
        step_dump.write_step_dump(self.calibrl.dump_dir, self.global_steps, table)

    def _step_rows(self, batch) -> tuple[StepRows, Any]:
        """Read the step's rows from TransferQueue into the plain tensors ``compute_step_fields`` takes."""
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["uid", "response_mask", "rm_scores", "old_log_probs", "extra_fields"])
        extra = _as_list(data["extra_fields"])
        uids = np.array(_as_list(data["uid"]), dtype=object)
        response_mask = data["response_mask"]
        padded = data.select("response_mask", "rm_scores", "old_log_probs").to_padded_tensor()
        rows = StepRows(
            uids=uids, is_expert=torch.tensor(self._expert_flags(batch, extra)),
            is_padding=torch.tensor(self._padding_flags(batch)), scores=padded["rm_scores"].sum(-1).float(),
            acc=_reward_acc(extra), response_mask=padded["response_mask"].float(),
            old_log_probs=padded["old_log_probs"].float(),
            expert_truncated=torch.tensor([bool(e.get("expert_truncated", False)) for e in extra]),
        )
        return rows, response_mask

    # -- 5. the update ---------------------------------------------------------------------------------------
    def _update_actor(self, batch, metrics):
        if self.calibrl.n_expert == 0 or not self.drops_experts:
            super()._update_actor(batch, metrics)
            _move_loss_metrics(metrics)
            return batch
        keys = self._update_keys if self._update_keys is not None else self._onpolicy_keys(batch)
        sub = batch.select_keys(keys)
        # already sized for the update (whole mini-batches on every rank, see _get_required_batch_multiple):
        # verl's balancer must only reorder the rows over ranks, never pad them to the log-prob pass's multiple
        self._fixed_multiple = len(sub)
        try:
            sub = super()._balance_batch(sub, metrics, logging_prefix="calibrl/update_seqlen")
        finally:
            self._fixed_multiple = None
        with self._rollout_n(self.n_onpolicy):
            super()._update_actor(sub, metrics)
        _move_loss_metrics(metrics)
        metrics["calibrl/update_rows"] = float(len(sub))
        return batch  # the full batch: verl clears TransferQueue for the keys a step returns

    @contextlib.contextmanager
    def _rollout_n(self, n: int) -> Iterator[None]:
        """verl 0.9.1 sizes actor mini-batches as ppo_mini_batch_size * rollout.n (trainer_base.py ~1829);
        the update without experts has n_onpolicy rows per prompt. The one place we set a config value."""
        node = self.config.actor_rollout_ref.rollout
        saved = node.n
        with open_dict(node):
            node.n = n
        try:
            yield
        finally:
            with open_dict(node):
                node.n = saved

    # -- 6. metrics -------------------------------------------------------------------------------------------
    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        got = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        extra = _as_list(got["extra_fields"])  # read once: fault counts and the on-policy selection
        metrics.update(fault_metrics(extra, self._padding_flags(batch), metrics.get("actor/grad_norm")))
        if self.calibrl.n_expert:
            batch = batch.select_keys(self._onpolicy_keys(batch, keep_padding=True, extra=extra))
        return super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _expert_flags(self, batch, extra: list[dict] | None = None) -> list[bool]:
        """Per key: an expert row (padding rows copy row 0's fields, so they never count as experts)."""
        if extra is None:
            got = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
            extra = _as_list(got["extra_fields"])
        padding = self._padding_flags(batch)
        return [bool(e.get("is_expert", False)) and not p for e, p in zip(extra, padding, strict=True)]

    @staticmethod
    def _padding_flags(batch) -> list[bool]:
        return [bool(tag.get("is_padding", False)) for tag in batch.tags]

    def _onpolicy_keys(self, batch, keep_padding: bool = False, extra: list[dict] | None = None) -> list[str]:
        expert = self._expert_flags(batch, extra)
        padding = self._padding_flags(batch)
        return [k for k, e, p in zip(batch.keys, expert, padding, strict=True) if not e and (keep_padding or not p)]


def canonical_row_order(keys: list[str], prompt_position: dict[str, int]) -> list[int]:
    """Indexes that sort a step's rows by (prompt's place in the data batch, sample's session, turn).

    Rows reach TransferQueue in the order the rollout finishes them (agent_loop_tq.py), and verl's balancer
    (``get_seqlen_balanced_partitions``) breaks ties between equal lengths by position, so the same samples
    could land in other micro-batches on another run, and gradients were summed in another order (Adam then
    turns float noise on near-zero gradients into visible updates). Sorted first, a resumed run repeats the
    uninterrupted run's update. Keys are verl's ``{uid}_{session_id}_{turn}``; uids are random per run, so the
    prompt's position in ``_next_train_batch`` stands for them (unknown uids sort last, by uid).
    """
    def sort_key(i: int) -> tuple[int, str, int, int]:
        uid, session, turn = keys[i].rsplit("_", 2)
        return prompt_position.get(uid, len(prompt_position)), uid, int(session), int(turn)

    return sorted(range(len(keys)), key=sort_key)


def _as_list(value: Any) -> list:
    """Per-row Python objects from a TensorDict: a NonTensorStack (``tolist``) or tensordict's list type."""
    return list(value.tolist()) if hasattr(value, "tolist") else list(value)


def _reward_acc(extra: list[dict]) -> torch.Tensor | None:
    """The reward's own ``acc`` per row, when the reward function returned a dict with one (SPEC §1.6).

    verl 0.9.1's reward manager stores a float result as ``{"acc": score}`` too, so ``acc`` counts only when
    the same dict also has ``score`` (a dict result); otherwise correctness falls back to the threshold.
    """
    infos = [e.get("reward_extra_info") or {} for e in extra]
    if not infos or not all("acc" in i and "score" in i for i in infos):
        return None
    return torch.tensor([float(i["acc"]) for i in infos])


def _move_loss_metrics(metrics: dict[str, Any]) -> None:
    """verl prefixes every loss metric with ``actor/``; ours belong under ``calibrl/``."""
    for key in [k for k in metrics if k.startswith("actor/calibrl/")]:
        metrics[key.removeprefix("actor/")] = metrics.pop(key)
