"""verl SFT parquet from our RL parquet: the expert chain-of-thought as the assistant turn (SFT-then-RL baseline).

    python -m calibrl_verl.data.sft --input data/virl39k/train.parquet --output data/virl39k/sft.parquet

Input: the RL parquet the prep scripts write (docs/data.md): ``prompt`` (chat messages, ``<image>`` placeholders),
``images`` (``[{"bytes": PNG}, ...]``), the expert column (``solution`` by default: one trace, or a list of them
after ``experts generate --keep all``), plus ``data_source`` and ``extra_info``.

Output: the layout of verl 0.9.1's ``MultiTurnSFTDataset`` (``verl/utils/dataset/multiturn_sft_dataset.py``, the
dataset of ``python -m verl.trainer.sft_trainer``), one row per (prompt, expert trace):

    messages      the prompt's messages + {"role": "assistant", "content": <expert trace>}   (data.messages_key)
    images        the row's images, unchanged  (data.image_key, default "images"; the dataset turns each
                  ``<image>`` of the messages into the next image, in order, with qwen-vl-utils as the RL side does)
    data_source, id   carried for reference (the dataset ignores them)

Only the assistant turn is trained (the dataset's loss mask covers assistant messages only). When no row of the
input has an image, the ``images`` column is left out: with the column present, verl requires a multimodal
processor, which a text-only model (Qwen2.5-Math) does not have.

Rows are dropped and counted, never stopped on: ``no_expert`` (empty expert column; these rows train as plain GRPO
groups in CalibRL, but have nothing to imitate), and ``image_token_in_expert`` (a trace containing the literal
``<image>``, which verl would take for an image placeholder and then fail on the image count). ``--traces first``
(default) keeps each row's first trace; ``--traces all`` writes one SFT row per distinct trace.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from calibrl_verl.data.expert_column import expert_traces

IMAGE_TOKEN = "<image>"
REQUIRED = ("prompt",)
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_IMAGES = pa.list_(pa.struct([("bytes", pa.binary())]))


class SFTDataError(ValueError):
    """The input cannot be converted; the message names the file, and the row and column where one is at fault."""


def sft_rows(rows: Sequence[dict], expert_key: str = "solution", traces: str = "first",
             source: str = "<rows>") -> tuple[list[dict], Counter]:
    """The SFT rows of RL rows, and the counts (rows_read, rows_written, dropped_no_expert, ...)."""
    if traces not in ("first", "all"):
        raise ValueError(f"traces must be 'first' or 'all', not {traces!r}")
    stats: Counter = Counter()
    out: list[dict] = []
    for index, row in enumerate(rows):
        stats["rows_read"] += 1
        messages = _messages(row.get("prompt"), source, index)
        found = expert_traces(row.get(expert_key))
        if not found:
            stats["dropped_no_expert"] += 1
            continue
        kept = list(dict.fromkeys(found)) if traces == "all" else found[:1]
        images = [_image(item, source, index) for item in (row.get("images") or [])]
        n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if n_placeholders != len(images):
            raise SFTDataError(f"{source}: row {index}, column 'prompt': {n_placeholders} {IMAGE_TOKEN} placeholders "
                               f"but {len(images)} images in column 'images'")
        for trace in kept:
            if IMAGE_TOKEN in trace:
                stats["dropped_image_token_in_expert"] += 1
                continue
            out.append({
                "messages": [*messages, {"role": "assistant", "content": trace}],
                "images": images,
                "data_source": str(row.get("data_source") or ""),
                "id": _row_id(row, index),
            })
            stats["rows_written"] += 1
        stats["rows_with_expert"] += 1
    return out, stats


def _messages(value: Any, source: str, index: int) -> list[dict]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise SFTDataError(f"{source}: row {index}, column 'prompt': expected a non-empty list of chat messages "
                           f"({{'role', 'content'}}), got {type(value).__name__}")
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise SFTDataError(f"{source}: row {index}, column 'prompt': a message is not "
                               f"{{'role': str, 'content': str}}: {str(message)[:80]!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] == "assistant":
        raise SFTDataError(f"{source}: row {index}, column 'prompt': the prompt already ends with an assistant turn")
    return messages


def _image(item: Any, source: str, index: int) -> dict:
    if isinstance(item, dict) and isinstance(item.get("bytes"), bytes | bytearray) and item["bytes"]:
        return {"bytes": bytes(item["bytes"])}
    raise SFTDataError(f"{source}: row {index}, column 'images': expected {{'bytes': PNG bytes}} per image "
                       f"(the prep scripts' layout), got {str(item)[:80]!r}")


def _row_id(row: dict, index: int) -> str:
    extra = row.get("extra_info")
    if isinstance(extra, dict) and extra.get("id") not in (None, ""):
        return str(extra["id"])
    return str(index)


def convert(input_path: Path, output_path: Path, expert_key: str = "solution", traces: str = "first") -> Counter:
    """Read the RL parquet, write the SFT parquet; returns the counts. Raises SFTDataError naming file and column."""
    if not input_path.is_file():
        raise SFTDataError(f"{input_path}: no such file (the RL training parquet, e.g. data/virl39k/train.parquet)")
    try:
        table = pq.read_table(input_path)
    except (pa.ArrowInvalid, OSError) as error:
        raise SFTDataError(f"{input_path}: not a readable parquet file: {error}") from error
    columns = table.column_names
    for column in (*REQUIRED, expert_key):
        if column not in columns:
            raise SFTDataError(f"{input_path}: no column {column!r} (columns: {', '.join(columns)})"
                               + (" -- pass --expert-key NAME for another expert column" if column == expert_key
                                  else ""))
    rows, stats = sft_rows(table.to_pylist(), expert_key, traces, source=str(input_path))
    if not rows:
        raise SFTDataError(f"{input_path}: no row has an expert trace in column {expert_key!r} "
                           f"({stats['rows_read']} rows read); nothing to train on")
    fields = [("messages", _MESSAGES)]
    if any(row["images"] for row in rows):
        fields.append(("images", _IMAGES))
    else:  # text-only: no images column (verl would require a multimodal processor)
        stats["images_column_omitted"] = 1
    fields += [("data_source", pa.string()), ("id", pa.string())]
    schema = pa.schema(fields)
    out = pa.Table.from_pylist([{name: row[name] for name, _ in fields} for row in rows], schema=schema)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, output_path)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrl_verl.data.sft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, required=True, help="RL training parquet (prompt, images, solution)")
    parser.add_argument("--output", type=Path, required=True, help="SFT parquet to write (messages, images)")
    parser.add_argument("--expert-key", default="solution", help="the expert column (default: solution)")
    parser.add_argument("--traces", choices=("first", "all"), default="first",
                        help="a row's first expert trace (default), or one SFT row per distinct trace")
    args = parser.parse_args(argv)
    try:
        stats = convert(args.input, args.output, args.expert_key, args.traces)
    except SFTDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    counts = " ".join(f"{key}={stats[key]}" for key in ("rows_read", "rows_written", "dropped_no_expert",
                                                        "dropped_image_token_in_expert"))
    print(f"{args.output}: {counts}" + (" (text-only: no images column)" if stats["images_column_omitted"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
