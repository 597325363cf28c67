"""``calibrl.dump_dir``: one parquet file per training step with what the trainer did to every row.

    <dump_dir>/step_<global step, 6 digits>.parquet

One row per trajectory row of the step (on-policy and expert rows; verl's padding rows left out), with the
values exactly as the update uses them, so the step can be checked and analysed from the file alone
(docs/architecture.md, "Per-step dump"). Built from the same tensors the trainer writes to TransferQueue; pyarrow only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("uid", pa.string()),
    ("is_expert", pa.bool_()),
    ("response_ids", pa.list_(pa.int64())),
    ("old_log_probs", pa.list_(pa.float32())),
    ("score", pa.float64()),
    ("acc", pa.float64()),  # null when the reward returned no `acc`
    ("correct", pa.bool_()),
    ("advantage", pa.float64()),  # A_i as the loss uses it: 0 for CalibRL's expert rows
    ("guided", pa.bool_()),  # this on-policy row gets the guide term this step
    ("expert_baseline", pa.float64()),  # S(l^e) of the group expert (sequence gap); 0 when not guided
    ("expert_active", pa.bool_()),  # an expert row its group uses this step (mixing); false for on-policy rows
    # tokens of the row verl's update counts: its stored loss_mask (the engine's token-mean denominator) after
    # CalibRL's put; 0 for rows the update leaves out (CalibRL's expert rows, LUFFY's inactive expert rows)
    ("update_tokens", pa.int64()),
])


def dump_path(dump_dir: str | Path, step: int) -> Path:
    return Path(dump_dir) / f"step_{int(step):06d}.parquet"


def step_table(step: int, uids: np.ndarray, is_expert: torch.Tensor, is_padding: torch.Tensor,
               responses: torch.Tensor, response_mask: torch.Tensor, old_log_probs: torch.Tensor,
               scores: torch.Tensor, acc: torch.Tensor | None, correct: torch.Tensor, advantages: torch.Tensor,
               guided: torch.Tensor, expert_baseline: torch.Tensor, expert_active: torch.Tensor,
               update_tokens: torch.Tensor) -> pa.Table:
    """The dump of one step from (B,) / padded (B, T) tensors in the step's row order; padding rows dropped.

    ``advantages`` is verl's (B, T) tensor (A_i broadcast over the response); a row's value is read at its
    first response token, which every row has.
    """
    keep = (~is_padding.bool()).tolist()
    lengths = response_mask.bool().sum(-1).tolist()
    rows = [i for i, k in enumerate(keep) if k]
    columns = {
        "step": [int(step)] * len(rows),
        "uid": [str(uids[i]) for i in rows],
        "is_expert": [bool(is_expert[i]) for i in rows],
        "response_ids": [responses[i, : lengths[i]].long().tolist() for i in rows],
        "old_log_probs": [old_log_probs[i, : lengths[i]].float().tolist() for i in rows],
        "score": [float(scores[i]) for i in rows],
        "acc": [None if acc is None or torch.isnan(acc[i]) else float(acc[i]) for i in rows],
        "correct": [bool(correct[i]) for i in rows],
        "advantage": [float(advantages[i, 0]) for i in rows],
        "guided": [bool(guided[i]) for i in rows],
        "expert_baseline": [float(expert_baseline[i]) for i in rows],
        "expert_active": [bool(expert_active[i]) for i in rows],
        "update_tokens": [int(update_tokens[i]) for i in rows],
    }
    return pa.table(columns, schema=SCHEMA)


class StepDumpError(RuntimeError):
    """A step's dump could not be written (a full disk, a read-only folder); nothing partial is left behind."""


def write_step_dump(dump_dir: str | Path, step: int, table: pa.Table) -> Path:
    """Write (atomically: a reader never sees half a file) and return the path; on a failed write the partial
    file is removed and ``StepDumpError`` names the step, the path and the cause."""
    path = dump_path(dump_dir, step)
    tmp = path.with_suffix(".parquet.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StepDumpError(f"calibrl.dump_dir: step {step}'s dump could not be written to {path} ({err}); no "
                            "partial file was left. Free space there, or set calibrl.dump_dir=null") from err
    return path
