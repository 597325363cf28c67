"""The input and output parquets of ``python -m calibrl_verl.experts generate``.

The input is a verl RL parquet as the prep scripts write it (docs/algorithm.md §6). Rows are grouped into *problems*
by a content key (prompt + image bytes + ground truth), so a row duplicated in the input is sent once, and the
attempt cache stays valid when the file is re-prepared with its rows in another order. The outputs are the input
table with ``solution`` filled and a ``solution_model`` column added (``--out``), and the rows no sample solved,
with a ``failure_reason`` column (``--failures``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from calibrl_verl.data.expert_column import expert_traces
from calibrl_verl.generation import IMAGE_PLACEHOLDER

REQUIRED_COLUMNS = ("prompt", "reward_model")
BATCH_ROWS = 256
KEY_HEX_CHARS = 24  # 96 bits: no collision among millions of problems


class ExpertsError(Exception):
    """A user-facing problem with the inputs or flags; reported as ``experts: error: ...`` without a traceback."""


@dataclass
class Problem:
    """One unique problem of the input: what is sent (prompt, images) and what verifies the answer."""

    key: str
    row_id: str
    positions: list[int]
    prompt: Any
    ground_truth: Any
    data_source: str
    extra_info: dict | None
    source: InputTable = field(repr=False)
    input_error: str | None = None

    def images(self) -> list[Any]:
        """The stored image entries of the problem (read on demand: the whole file's images stay in arrow)."""
        return self.source.images(self.positions[0])


@dataclass
class InputTable:
    """The ``--data`` table (first ``--limit`` rows)."""

    path: Path
    table: pa.Table

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def images(self, position: int) -> list[Any]:
        if "images" not in self.table.column_names:
            return []
        return _as_list(self.table.column("images")[position].as_py())

    def column(self, name: str) -> list[Any]:
        """A column as Python values, or Nones when the input has no such column."""
        if name not in self.table.column_names:
            return [None] * self.num_rows
        return self.table.column(name).to_pylist()


def read_input(path: Path, limit: int | None = None) -> InputTable:
    """Read ``--data``; clear errors for a missing or unreadable file and for missing columns."""
    if not path.is_file():
        raise ExpertsError(f"--data: no such file: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ExpertsError(f"--data: {path} is not a readable parquet file ({exc})") from exc
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise ExpertsError(
            f"--data: {path} has no column(s) {missing}; it has {table.column_names} (a verl RL parquet with "
            "prompt, images, reward_model.ground_truth, ... as the prep scripts write it is expected)"
        )
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise ExpertsError(f"--data: {path} has no rows")
    return InputTable(path=path, table=table)


def has_solution(value: Any) -> bool:
    """A row already has an expert: a non-empty trace, or a list holding one (``--keep all`` output)."""
    return bool(expert_traces(value))


def collect_problems(source: InputTable, overwrite: bool) -> tuple[list[Problem], list[int]]:
    """Unique problems of the rows to send, in input order, and the positions kept as they are (not sent)."""
    by_key: dict[str, Problem] = {}
    kept: list[int] = []
    solutions = source.column("solution")
    for position, record in _records(source):
        if has_solution(solutions[position]) and not overwrite:
            kept.append(position)
            continue
        problem = _problem(source, position, record)
        if problem.key in by_key:
            by_key[problem.key].positions.append(position)
        else:
            by_key[problem.key] = problem
    return list(by_key.values()), kept


def _records(source: InputTable) -> Iterator[tuple[int, dict]]:
    names = [n for n in ("data_source", "prompt", "reward_model", "extra_info") if n in source.table.column_names]
    position = 0
    for batch in source.table.select(names).to_batches(max_chunksize=BATCH_ROWS):
        for record in batch.to_pylist():
            yield position, record
            position += 1


def _problem(source: InputTable, position: int, record: dict) -> Problem:
    reward_model = record.get("reward_model")
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    extra_info = record.get("extra_info") if isinstance(record.get("extra_info"), dict) else None
    images = source.images(position)
    return Problem(
        key=problem_key(record.get("prompt"), images, truth),
        row_id=_row_id(extra_info, position),
        positions=[position],
        prompt=record.get("prompt"),
        ground_truth=truth,
        data_source=str(record.get("data_source") or ""),
        extra_info=extra_info,
        source=source,
        input_error=input_error(record.get("prompt"), images, truth),
    )


def problem_key(prompt: Any, images: list[Any], ground_truth: Any) -> str:
    """Content hash of a problem: the same prompt, image bytes and ground truth give the same key in any file.

    The ground truth is in the key because a verdict is only valid for the truth it was graded against.
    """
    digest = hashlib.sha256(json.dumps({"prompt": prompt, "truth": ground_truth}, sort_keys=True, default=str).encode())
    for image in images:
        payload = image.get("bytes") if isinstance(image, dict) else image
        raw = payload if isinstance(payload, bytes | bytearray) else json.dumps(image, default=str).encode()
        digest.update(hashlib.sha256(raw).digest())
    return digest.hexdigest()[:KEY_HEX_CHARS]


def input_error(prompt: Any, images: list[Any], ground_truth: Any) -> str | None:
    """Why a row cannot be sent or verified (it then ends in the failures file), or None."""
    if ground_truth is None or (isinstance(ground_truth, str) and not ground_truth.strip()):
        return "bad input: no reward_model.ground_truth (an answer cannot be verified)"
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return "bad input: prompt is not a list of chat messages ({role, content})"
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in prompt if isinstance(m["content"], str))
    if placeholders != len(images):
        return f"bad input: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)"
    return None


def _row_id(extra_info: dict | None, position: int) -> str:
    for name in ("id", "index"):
        value = (extra_info or {}).get(name)
        if value is not None and value != "":
            return str(value)
    return str(position)


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value)


# ----------------------------------------------------------------------------------------------------- outputs


@dataclass
class RowResult:
    """What one output row gets: its solution, the model that wrote it, and why it failed (None: it did not)."""

    solution: str | list[str]  # a list of traces with --keep all
    solution_model: str
    failure_reason: str | None = None


def write_outputs(source: InputTable, results: list[RowResult], out: Path, failures: Path) -> int:
    """Every input row (input order) to ``out``; the failed ones plus ``failure_reason`` to ``failures``."""
    table = source.table
    if "failure_reason" in table.column_names:  # the input is an earlier run's failures file: its reasons are stale
        table = table.drop_columns(["failure_reason"])
    solutions = [r.solution for r in results]
    table = _with_column(table, "solution", solutions, pa.list_(pa.string()) if solutions and isinstance(
        solutions[0], list) else pa.string())
    table = _with_column(table, "solution_model", [r.solution_model for r in results])
    failed = [i for i, r in enumerate(results) if r.failure_reason is not None]
    failed_table = _with_column(table.take(pa.array(failed, pa.int64())), "failure_reason",
                                [results[i].failure_reason for i in failed])  # fmt: skip
    write_table(table, out)
    write_table(failed_table, failures)  # written also when empty: "no failures" is an answer, not a missing file
    return len(failed)


def _with_column(table: pa.Table, name: str, values: list[Any], kind: pa.DataType | None = None) -> pa.Table:
    array = pa.array(values, kind or pa.string())
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


def write_table(table: pa.Table, path: Path) -> None:
    """Write atomically (temporary file + rename): a kill never leaves a half-written parquet behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
