"""k > 1 experts per group (calibrl.experts_per_group): the trainer draws k DISTINCT traces per prompt.

The expert column holds one trace (a string) or several (a list, e.g. ``calibrl_verl.experts generate --samples N``).
``CalibRLTrainer._next_train_batch`` runs on verl's own ``_next_train_batch`` (its dataloader fetch and uid
assignment) over a batch collated by verl's ``collate_fn``; only verl's __init__ (Ray workers) is skipped.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf
from verl.utils.dataset.rl_dataset import collate_fn

from calibrl_verl.config import CalibRLConfig
from calibrl_verl.integration.trainer import CalibRLTrainer

TRACES = [[f"<think>p{p} t{t}</think><answer>{p}</answer>" for t in range(n)] for p, n in enumerate([5, 2, 1, 0, 3])]


def _trainer(step: int, k: int, n_onpolicy: int = 3, seed: int = 0) -> CalibRLTrainer:
    trainer = object.__new__(CalibRLTrainer)
    trainer.calibrl = CalibRLConfig(experts_per_group=k, seed=seed)
    trainer.config = OmegaConf.create({"data": {"train_batch_size": len(TRACES), "gen_batch_size": None},
                                       "actor_rollout_ref": {"rollout": {"n": n_onpolicy + k}}})
    trainer.global_steps = step
    rows = [{"index": torch.tensor(i), "raw_prompt": [{"role": "user", "content": f"q{i}"}], "solution": traces}
            for i, traces in enumerate(TRACES)]
    trainer.train_dataloader_it = iter([collate_fn(rows)])
    return trainer


def _drawn(batch, k: int) -> list[list[str]]:
    columns = [list(batch[f"calibrl_expert_{j}"]) for j in range(k)]
    return [[c[p] for c in columns if c[p]] for p in range(len(TRACES))]


def test_k_distinct_traces_are_drawn_per_prompt_and_prompts_with_fewer_get_what_they_have():
    trainer = _trainer(step=4, k=2)
    batch = trainer._next_train_batch()
    drawn = _drawn(batch, 2)
    assert len(drawn[0]) == 2 and len(set(drawn[0])) == 2 and set(drawn[0]) <= set(TRACES[0])
    assert drawn[1] == TRACES[1] and drawn[2] == TRACES[2] and drawn[3] == []
    assert len(set(drawn[4])) == 2 and set(drawn[4]) <= set(TRACES[4])
    assert batch["__rollout_n__"].tolist() == [5, 5, 4, 3, 5]  # 3 on-policy + the experts the prompt has
    assert batch["calibrl_expert"].tolist() == [True, True, True, False, True]
    assert trainer._short_groups == 1  # prompt 2: one trace for k = 2 (prompt 3 has none: a group without expert)
    assert len(trainer._expert_uids) == 4


def test_the_draw_is_reproducible_per_seed_and_step_and_changes_across_steps():
    def draw(step: int, seed: int = 0) -> list[list[str]]:
        return _drawn(_trainer(step, k=2, seed=seed)._next_train_batch(), 2)

    assert draw(7) == draw(7)  # a resumed step draws what the uninterrupted run drew
    over_steps = {tuple(draw(step)[0]) for step in range(1, 13)}
    assert len(over_steps) > 3  # prompt 0 (5 traces) sees different pairs over the run
    assert {t for pair in over_steps for t in pair} == set(TRACES[0])  # and every one of its traces


def test_one_expert_per_group_keeps_a_single_trace_column():
    batch = _trainer(step=1, k=1)._next_train_batch()
    assert "calibrl_expert_1" not in batch.keys()
    drawn = _drawn(batch, 1)
    assert [len(d) for d in drawn] == [1, 1, 1, 0, 1]
    assert all(d[0] in t for d, t in zip(drawn, TRACES, strict=True) if d)
    assert np.array_equal(batch["__rollout_n__"].numpy(), [4, 4, 4, 3, 4])
