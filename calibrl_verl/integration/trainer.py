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

``fit`` runs verl's loop under a ``worker_watch.WorkerWatch`` and each stage tells it its name, so a Ray worker that
dies inside a step ends the run with ``WorkerDiedError`` naming it, the step, the stage and the checkpoint to resume
from, instead of verl waiting forever (generation, weight sync).

TransferQueue traffic is what a GRPO step makes: expert rows are known from their keys (no read), and stages 3
and 4 add their reads and writes to verl's own get and put of that stage (``stage_io``), so CalibRL adds no
TransferQueue call to a step (``benchmarks/bench_step.py`` measures the step against GRPO's).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from omegaconf import open_dict
from tensordict import NonTensorStack, TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import agg_loss
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.debug.metrics import calculate_debug_metrics
from verl.workers.utils.padding import response_to_nested

from calibrl_verl import core_algos
from calibrl_verl.config import CalibRLConfig, CalibRLConfigError
from calibrl_verl.data.expert_column import expert_traces
from calibrl_verl.integration import actor_loss, checkpoints, step_dump, tracking, worker_watch
from calibrl_verl.integration.agent_loop import EXPERT_TEXT
from calibrl_verl.integration.registry import ADV_EXTRAS
from calibrl_verl.integration.stage_io import VerlDriftError, stage_io
from calibrl_verl.integration.step_fields import (
    StepRows,
    compute_step_fields,
    fault_metrics,
    inactive_expert_rows,
    update_padding,
)

TRAINER_NAME = "calibrl"


def _in_stage(name: str):
    """A trainer stage the ``WorkerWatch`` names when a worker dies in it."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            with self._stage(name):
                return method(self, *args, **kwargs)
        return run
    return wrap

# the plugin installs it too, but verl's plugin loading swallows errors: here a broken install fails loudly, in the
# process that builds verl's Tracking
tracking.install()
# verl 0.9.1's sync ReplayBuffer polls TransferQueue for finished rollouts every 2 s (a constructor default no
# config key reaches), so a step whose rollouts finish after 2.1 s waits until 4 s. A poll is one metadata read.
REPLAY_POLL_INTERVAL_S = 0.2


@register_trainer(TRAINER_NAME)
class CalibRLTrainer(PPOTrainerSync):
    """verl's sync V1 trainer with CalibRL's data-source hook, advantage, loss and metrics."""

    # while fit runs: names a worker that dies in a step (a class default: the stage tests build the trainer without
    # __init__, and a stage outside fit tells no watch)
    _watch: worker_watch.WorkerWatch | None = None

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
        self._expert_uids: set[str] = set()  # prompts whose expert joins the group this step
        self._short_groups = 0  # of those, prompts with fewer than experts_per_group traces this step
        self._step_extra: dict[str, dict] = {}  # key -> extra_fields, kept by the advantage stage for the metrics

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

    # -- a worker that dies inside a step (worker_watch.py) ----------------------------------------------------
    def fit(self, agent_loop_manager):
        """verl's training loop under a ``WorkerWatch``: a Ray worker that dies inside a step, or a weight sync that
        hangs, ends the run with ``WorkerDiedError`` / ``WorkerTimeoutError`` naming it, the step, the stage and the
        checkpoint to resume from (verl alone waits forever on some of these)."""
        self.agent_loop_manager = agent_loop_manager  # verl's fit sets it first thing; the watch needs its workers
        root = self._checkpoint_root()
        self._watch = worker_watch.WorkerWatch(
            worker_watch.run_workers(self), self.calibrl.worker_check_s, step=lambda: self.global_steps,
            checkpoint=self._last_checkpoint, root=root).start()
        try:
            return super().fit(agent_loop_manager)
        except BaseException as err:
            self._watch.stop()  # no further interrupt may land in this handler
            named = self._watch.named(err)
            if named is None:
                raise
            print(f"[calibrl] {type(named).__name__}: {named}", file=sys.stderr, flush=True)
            raise named from err
        finally:
            self._watch.stop()

    def _stage(self, name: str, limit_s: float | None = None, key: str = ""):
        """Tell the watch which stage the step is in (nothing before ``fit``)."""
        return self._watch.stage(name, limit_s, key) if self._watch is not None else contextlib.nullcontext()

    def _checkpoint_root(self) -> Path:
        return Path.cwd() / self.config.trainer.default_local_dir

    def _last_checkpoint(self) -> Path | None:
        """The checkpoint ``trainer.resume_mode=auto`` would load now, else the last complete one on disk."""
        root, contents = self._checkpoint_root(), self._checkpoint_contents()
        with contextlib.suppress(checkpoints.CheckpointError):
            tracked = checkpoints.check_resume(root, contents)
            if tracked is not None:
                return tracked
        complete = checkpoints.complete_checkpoints(root, contents)
        return complete[-1] if complete else None

    def on_sample_begin(self) -> None:
        if self._watch is not None:
            self._watch.enter("generation")  # until the next stage: the rollout and the reward loop
        super().on_sample_begin()

    def on_step_end(self) -> None:
        """verl's weight sync into the rollout, timed against ``calibrl.weight_sync_timeout_s``."""
        with self._stage("weight sync", self.calibrl.weight_sync_timeout_s, "calibrl.weight_sync_timeout_s"):
            super().on_step_end()

    def _load_checkpoint(self):
        """verl's resume, once ``checkpoints`` has refused a missing or torn checkpoint (why: see that module);
        a resumed run says which checkpoint it loads."""
        folder = self._resume_folder()
        if folder is not None:
            print(f"[calibrl] resuming from {folder}", file=sys.stderr, flush=True)
        return super()._load_checkpoint()

    def _save_checkpoint(self):
        """verl's save; a full disk ends in a ``CheckpointError`` that names the folder and what is still intact."""
        try:
            with self._stage("checkpoint save"):
                return super()._save_checkpoint()
        except Exception as err:
            folder = self._checkpoint_root() / f"global_step_{self.global_steps}"
            named = checkpoints.save_error(err, folder, self._checkpoint_contents())
            if named is None:
                raise
            raise named from err

    def _checkpoint_contents(self) -> list[str] | None:
        """What a checkpoint holds per rank (FSDP shard names); None for another engine's layout."""
        actor = self.config.actor_rollout_ref.actor
        if not str(actor.get("strategy", "fsdp")).startswith("fsdp"):
            return None
        return list(actor.checkpoint.get("load_contents") or ["model", "optimizer", "extra"])

    def _resume_folder(self) -> Path | None:
        trainer, contents = self.config.trainer, self._checkpoint_contents()
        if trainer.resume_mode == "auto":
            return checkpoints.check_resume(self._checkpoint_root(), contents)
        if trainer.resume_mode == "resume_path" and trainer.get("resume_from_path"):
            return checkpoints.check_folder(Path.cwd() / trainer.resume_from_path, contents)
        return None

    # -- 1. which groups get their expert -------------------------------------------------------------------
    def _next_train_batch(self, num_prompts: int | None = None) -> TensorDict:
        batch = super()._next_train_batch(num_prompts)
        uids = [str(uid) for uid in _as_list(batch["uid"])]
        self._prompt_position = {uid: i for i, uid in enumerate(uids)}
        self._expert_uids, self._short_groups = set(), 0
        if self.calibrl.n_expert == 0:
            return batch
        inject = self._expert_injection(batch)
        k = self.calibrl.n_expert
        picks = [self._draw_experts(traces, pos) if on else []
                 for pos, (traces, on) in enumerate(zip(self._expert_traces(batch), inject.tolist(), strict=True))]
        counts = torch.tensor([len(p) for p in picks], dtype=torch.long)
        self._expert_uids = {uid for uid, c in zip(uids, counts.tolist(), strict=True) if c}
        self._short_groups = int(((counts > 0) & (counts < k)).sum())
        batch["__rollout_n__"] = self.n_onpolicy + counts
        batch["calibrl_expert"] = counts > 0
        for j in range(k):  # the agent loop's expert session j answers with column j (agent_loop.expert_text)
            batch[EXPERT_TEXT.format(j)] = _string_column([p[j] if j < len(p) else "" for p in picks])
        return batch

    def _expert_traces(self, batch: TensorDict) -> list[list[str]]:
        """Per prompt, its non-empty expert traces: the expert column holds one trace (a string) or several (a list)."""
        return [expert_traces(value) for value in _as_list(batch[self.calibrl.expert_key])]

    def _draw_experts(self, traces: list[str], position: int) -> list[str]:
        """k distinct traces of one prompt (all of them when it has k or fewer), drawn reproducibly from (seed,
        step, the prompt's place in the data batch), so a resumed step draws what the uninterrupted run drew."""
        k = self.calibrl.n_expert
        if len(traces) <= k:
            return list(traces)
        rng = np.random.default_rng([self.calibrl.seed, self.global_steps, position, 1])
        return [traces[i] for i in rng.choice(len(traces), size=k, replace=False)]

    def _expert_injection(self, batch: TensorDict) -> torch.Tensor:
        """Per prompt: does its expert join the group? Deterministic in (seed, step), so resume-safe."""
        key = self.calibrl.expert_key
        if key not in batch.keys():
            raise CalibRLConfigError(
                f"calibrl.expert_key={key!r}: the training data has no such column (columns: {sorted(batch.keys())})"
            )
        has_text = torch.tensor([bool(t) for t in self._expert_traces(batch)])
        if self.calibrl.in_warmup(self.global_steps):
            return torch.zeros(len(has_text), dtype=torch.bool)
        if self.calibrl.mix_policy == "random":
            draws = np.random.default_rng([self.calibrl.seed, self.global_steps]).random(len(has_text))
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
    @_in_stage("old log-probs")
    def _compute_old_log_prob(self, batch, metrics):
        if self.calibrl.n_expert == 0:
            return super()._compute_old_log_prob(batch, metrics)
        calc = bool(self.config.actor_rollout_ref.rollout.calculate_log_probs)
        expert = torch.tensor(self._expert_flags(batch))
        onpolicy = ~expert & ~torch.tensor(self._padding_flags(batch))
        stage: dict[str, TensorDict] = {}

        def with_expert_rollout_log_probs(put: TensorDict) -> TensorDict:
            """verl's put of old log-probs and entropy, plus (when the rollout logs them) the experts' placeholder
            rollout log-probs replaced by their old log-probs, so no metric or IS weight ever sees the 0s."""
            got = io.got
            names = ["response_mask"] + (["responses", "rollout_log_probs"] if calc else [])
            padded = TensorDict({**{k: got[k] for k in names}, "old_log_probs": put["old_log_probs"],
                                 "entropy": put["entropy"]}, batch_size=len(expert)).to_padded_tensor()
            if calc:
                fixed = torch.where(expert.unsqueeze(-1), padded["old_log_probs"], padded["rollout_log_probs"])
                padded["rollout_log_probs"] = fixed
                put["rollout_log_probs"] = response_to_nested(fixed, got["response_mask"])
            stage["padded"] = padded
            return put

        # verl's stage gets, computes and puts once; the experts' fix rides on its put (stage_io)
        with stage_io(batch.keys, batch.partition_id, on_put=with_expert_rollout_log_probs) as io:
            batch = super()._compute_old_log_prob(batch, metrics)
        if "padded" not in stage:
            raise VerlDriftError("verl's _compute_old_log_prob wrote no old log-probs through TransferQueue: "
                                 "calibrl_verl.integration.stage_io does not match this verl version")
        self._onpolicy_old_log_prob_metrics(stage["padded"], onpolicy, metrics, calc)
        return batch

    def _onpolicy_old_log_prob_metrics(self, padded: TensorDict, onpolicy: torch.Tensor, metrics: dict,
                                       calc: bool) -> None:
        """verl's entropy (and rollout-vs-actor) metrics again, over on-policy rows only (docs/algorithm.md §5)."""
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
    @_in_stage("advantages")
    def _compute_advantage(self, batch, metrics):
        if self.calibrl.n_expert == 0 and not self.calibrl.dump_dir:
            return super()._compute_advantage(batch, metrics)
        stage: dict[str, Any] = {"metrics": metrics}
        extra_get = ["extra_fields"] + (["responses"] if self.calibrl.dump_dir else [])
        if self._offpolicy or self.calibrl.dump_dir:  # the engine's token denominator, zeroed / dumped below
            extra_get.append("loss_mask")
        # verl's stage gets and puts once: CalibRL's inputs ride on its get, its outputs on its put (stage_io)
        with stage_io(batch.keys, batch.partition_id, extra_get, on_get=partial(self._advantage_inputs, batch, stage),
                      on_put=partial(self._advantage_outputs, stage)) as io:
            try:  # verl's own pipeline (KL-in-reward, rollout correction) calls the registered `calibrl` estimator
                batch = super()._compute_advantage(batch, metrics)
            finally:
                if "token" in stage:
                    ADV_EXTRAS.reset(stage["token"])
        if io.put is None:
            raise VerlDriftError("verl's _compute_advantage wrote no advantages through TransferQueue: "
                                 "calibrl_verl.integration.stage_io does not match this verl version")
        if self.calibrl.dump_dir:
            self._dump_step(stage, io.got, io.put)
        return batch

    def _advantage_inputs(self, batch, stage: dict[str, Any], got: TensorDict) -> None:
        """On verl's get: the step's rows, CalibRL's per-row fields and the estimator's extras (before it runs)."""
        rows = self._step_rows(batch, got)
        stage["rows"], stage["response_mask"] = rows, got["response_mask"]
        if "loss_mask" in got.keys():
            stage["loss_mask"] = got["loss_mask"]
        if self.calibrl.n_expert == 0:  # GRPO with a dump: correctness only
            stage["correct"] = core_algos.correctness_sign(rows.scores, rows.acc, self.calibrl.pass_threshold)
            return
        fields = compute_step_fields(self.calibrl, rows)
        stage["metrics"].update(fields.metrics)
        stage["metrics"]["calibrl/groups_short_of_experts"] = float(self._short_groups)
        stage["fields"] = fields
        excluded = rows.is_expert | rows.is_padding
        token = ADV_EXTRAS.set({"is_expert": excluded, "norm_adv_by_std": self.calibrl.norm_adv_by_std,
                                "expert_rows": fields.active_expert if self._offpolicy else None,
                                "is_padding": rows.is_padding})
        stage["token"] = token

    def _advantage_outputs(self, stage: dict[str, Any], put: TensorDict) -> TensorDict:
        """On verl's put of advantages: CalibRL's fields for the loss join it (one TransferQueue write)."""
        if "fields" not in stage:
            return put
        rows, fields, response_mask = stage["rows"], stage["fields"], stage["response_mask"]
        if self._offpolicy:  # inactive expert rows would otherwise still count in the update (inactive_expert_rows)
            self._mask_inactive_experts(stage, put, inactive_expert_rows(rows, fields.active_expert))
        put[actor_loss.EXPERT_LOG_PROB] = response_to_nested(fields.expert_log_prob, response_mask)
        put[actor_loss.EXPERT_MASK] = response_to_nested(fields.expert_mask.float(), response_mask)
        put[actor_loss.EXPERT_BASELINE] = fields.expert_baseline.float()
        put[actor_loss.CORRECT] = fields.correct.float()
        put[actor_loss.IS_EXPERT] = fields.active_expert.float()
        return put

    def _mask_inactive_experts(self, stage: dict[str, Any], put: TensorDict, inactive: torch.Tensor) -> None:
        """Zero ``response_mask`` and ``loss_mask`` of inactive expert rows in verl's put of this stage.

        verl's loss sums over ``response_mask`` and its engine divides by the sum of ``loss_mask`` over the
        mini-batch, two fields written at rollout: both must be zero for a row to be a no-op, as verl's own padding
        rows are. A rejection verl's rollout correction wrote into ``response_mask`` in this put is kept.
        """
        response_mask, keep = stage["response_mask"], (~inactive).unsqueeze(-1)
        stage["metrics"]["calibrl/inactive_expert_rows"] = float((stage["rows"].response_mask.any(-1) & inactive).sum())
        mask = stage["rows"].response_mask * keep
        if "response_mask" in put.keys():  # verl's rollout correction rejected tokens or rows: keep that too
            mask = mask * _padded(put["response_mask"], len(mask)).to(mask.dtype)
        put["response_mask"] = response_to_nested(mask.to(response_mask.dtype), response_mask)
        loss_mask = stage["loss_mask"]
        put["loss_mask"] = response_to_nested(_padded(loss_mask, len(mask)) * keep.to(loss_mask.dtype), loss_mask)

    @property
    def _offpolicy(self) -> bool:
        return self.calibrl.loss_mode in ("luffy", "rlplus")

    def _dump_step(self, stage: dict[str, Any], got: TensorDict, put: TensorDict) -> None:
        """``calibrl.dump_dir``: the step's rows with the advantages verl stored for the update (step_dump.py)."""
        rows = stage["rows"]
        loss_mask = put["loss_mask"] if "loss_mask" in put.keys() else got["loss_mask"]
        padded = TensorDict({"advantages": put["advantages"], "responses": got["responses"], "loss_mask": loss_mask},
                            batch_size=len(rows.uids)).to_padded_tensor()
        if "fields" in stage:
            fields = stage["fields"]
            correct, active = fields.correct, fields.active_expert
            guided = rows.onpolicy & fields.expert_mask.any(-1) & (self.calibrl.loss_mode == "calibrl")
            baseline = torch.where(guided, fields.expert_baseline, 0.0)  # the sequence gap's S(l^e) on guided rows
        else:
            correct = stage["correct"]
            baseline, active, guided = torch.zeros(len(correct)), torch.zeros_like(correct), torch.zeros_like(correct)
        # the tokens verl's update counts for a row: its loss_mask as stored after this put, on the update's rows
        in_update = ~rows.is_expert if self.drops_experts else torch.ones_like(rows.is_expert)
        update_tokens = padded["loss_mask"].bool().sum(-1) * in_update
        table = step_dump.step_table(self.global_steps, rows.uids, rows.is_expert, rows.is_padding,
                                     padded["responses"], rows.response_mask, rows.old_log_probs, rows.scores,
                                     rows.acc, correct, padded["advantages"], guided, baseline, active, update_tokens)
        step_dump.write_step_dump(self.calibrl.dump_dir, self.global_steps, table)

    def _step_rows(self, batch, data: TensorDict) -> StepRows:
        """The step's rows (as verl's advantage stage read them) in the plain tensors ``compute_step_fields`` takes.

        Also checks the expert flags the trainer derives from the keys against the ones the agent loop wrote, and
        keeps ``extra_fields`` for ``_compute_metrics``.
        """
        extra = _as_list(data["extra_fields"])
        self._step_extra = dict(zip(batch.keys, extra, strict=True))
        is_expert = self._expert_flags(batch)
        written = [bool(e.get("is_expert", False)) and not p
                   for e, p in zip(extra, self._padding_flags(batch), strict=True)]
        if written != is_expert:
            bad = [k for k, a, b in zip(batch.keys, is_expert, written, strict=True) if a != b][:5]
            raise RuntimeError(f"expert rows disagree between the trainer's injection and the agent loop's "
                               f"extra_fields.is_expert for keys {bad}: the agent loop must mark the last "
                               f"calibrl.experts_per_group sessions of an injected group (agent_loop.py)")
        padded = data.select("response_mask", "rm_scores", "old_log_probs").to_padded_tensor()
        return StepRows(
            uids=np.array(_as_list(data["uid"]), dtype=object), is_expert=torch.tensor(is_expert),
            is_padding=torch.tensor(self._padding_flags(batch)), scores=padded["rm_scores"].sum(-1).float(),
            acc=_reward_acc(extra), response_mask=padded["response_mask"].float(),
            old_log_probs=padded["old_log_probs"].float(),
            expert_truncated=torch.tensor([bool(e.get("expert_truncated", False)) for e in extra]),
        )

    # -- 5. the update ---------------------------------------------------------------------------------------
    @_in_stage("actor update")
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

    @_in_stage("reference log-probs")
    def _compute_ref_log_prob(self, batch, metrics):
        return super()._compute_ref_log_prob(batch, metrics)

    # -- 6. metrics -------------------------------------------------------------------------------------------
    @_in_stage("metrics")
    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        extra = [self._step_extra.get(k) for k in batch.keys]
        if any(e is None for e in extra):  # the advantage stage kept none (GRPO without a dump)
            got = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
            extra = _as_list(got["extra_fields"])
        self._step_extra = {}
        metrics.update(fault_metrics(extra, self._padding_flags(batch), metrics.get("actor/grad_norm")))
        if self.calibrl.n_expert:
            batch = batch.select_keys(self._onpolicy_keys(batch, keep_padding=True))
        return super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)

    # -- helpers ----------------------------------------------------------------------------------------------
    def _expert_flags(self, batch) -> list[bool]:
        """Per key: an expert row. Known from the key alone, with no TransferQueue read: the agent loop makes the
        last ``experts_per_group`` sessions of each group the trainer injected (``_next_train_batch``) expert
        sessions, and verl's keys are ``{uid}_{session}_{turn}``. Padding rows are never experts.
        ``_step_rows`` checks these flags against the ``is_expert`` the agent loop wrote."""
        flags = []
        for key, pad in zip(batch.keys, self._padding_flags(batch), strict=True):
            if pad or not self._expert_uids:
                flags.append(False)
                continue
            uid, session, _ = key.rsplit("_", 2)
            flags.append(uid in self._expert_uids and int(session) >= self.n_onpolicy)
        return flags

    @staticmethod
    def _padding_flags(batch) -> list[bool]:
        return [bool(tag.get("is_padding", False)) for tag in batch.tags]

    def _onpolicy_keys(self, batch, keep_padding: bool = False) -> list[str]:
        expert = self._expert_flags(batch)
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


def _string_column(values: list[str]) -> NonTensorStack:
    """A per-row string column as verl's dataset batches carry them (the type verl's agent loop passes on)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return tu.get_tensordict({"value": column}).get("value")


def _padded(nested: torch.Tensor, rows: int) -> torch.Tensor:
    """A (rows, T) zero-padded tensor from a per-row (nested) TransferQueue field."""
    return TensorDict({"value": nested}, batch_size=rows).to_padded_tensor()["value"]


def _as_list(value: Any) -> list:
    """Per-row Python objects from a TensorDict: a NonTensorStack (``tolist``) or tensordict's list type."""
    return list(value.tolist()) if hasattr(value, "tolist") else list(value)


def _reward_acc(extra: list[dict]) -> torch.Tensor | None:
    """The reward's own ``acc`` per row, when the reward function returned a dict with one (docs/algorithm.md §1.6).

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
