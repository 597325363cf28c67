"""Shared logic of the data-preparation scripts in ``examples/data_preprocess``.

Every script turns one source table (a local json / jsonl / parquet file, a folder of such files, or a Hugging Face
dataset name) into verl's RL parquet, one row per prompt (docs/algorithm.md §6)::

    data_source   str
    prompt        [{"role": "user", "content": "<image>" * n_images + question + "\\n" + INSTRUCTION}]
    images        [{"bytes": PNG bytes}, ...]        (decoded by verl's RLHFDataset / qwen-vl-utils; [] for text)
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": str}
    extra_info    {"split", "index", "id", "question", "answer", "meta"}
    solution      expert CoT in "<think>..</think><answer>..</answer>" form, "" when there is none

``--max-pixels N`` (and ``--min-pixels``) resizes every image once, here, to the size Qwen2.5-VL's image processing
would give it under that cap (``smart_resize``: aspect ratio kept, sides multiples of ``--image-factor``, 28), so the
stored PNG is what the model sees and each image costs at most N / 28² visual tokens (docs/data.md, "Image size").

Input files are read with json / pyarrow only (never pickle or eval). Image paths are resolved inside
``--image-dir`` and must not escape it. Text-only sources (``text_prep``: OpenR1-Math, MATH-500, AIME, ...) use the
same code with no image column. While converting, stderr shows rows read and kept / dropped counts
(``calibrl_verl.progress``: a tqdm bar on a terminal, periodic lines in logs); the summary goes to stdout.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from calibrl_verl.progress import progress
from calibrl_verl.reward import (
    compute_score,
    extract_answer,
    extract_boxed_content,
    format_reward,
    normalize_answer,
    option_letter,
)

INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in <answer> </answer> tags."
)
IMAGE_TOKEN = "<image>"
ABILITY = "math"
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
WRITE_CHUNK_ROWS = 256
LETTERS = string.ascii_uppercase  # option letters, in order
# pixels per side of one visual token: Qwen2.5-VL's 14-px patches merged 2 x 2 (Qwen3-VL: 16-px patches, 32)
IMAGE_FACTOR = 28

OUTPUT_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("split", pa.string()),
                    ("index", pa.int64()),
                    ("id", pa.string()),
                    ("question", pa.string()),
                    ("answer", pa.string()),
                    ("meta", pa.string()),
                ]
            ),
        ),
        ("solution", pa.string()),
    ]
)

_IMAGE_TAG_RE = re.compile(r"<image\s*\d*>")
_THINK_ANSWER_TAG_RE = re.compile(r"</?(?:think|answer)>")
_ANSWER_BLOCK_RE = re.compile(r"<answer>.*?</answer>", re.DOTALL)
_FINAL_LINE_RE = re.compile(r"(?:final answer|the answer|answer)\s*(?:is\s*:?|:|=|：)\s*(.+)$", re.IGNORECASE)
_INTEGRAL_FLOAT_RE = re.compile(r"[-+]?\d+\.0+")
_INLINE_OPTION_RE = re.compile(r"(?:^|[;\n]\s*)([A-Z])\s*[.:：)]\s*")


class PrepError(ValueError):
    """Bad input data or arguments; the message names the file / row / column at fault."""


class ImageError(PrepError):
    """An image file is missing or cannot be decoded (skippable with ``--skip-missing-images``)."""


# --------------------------------------------------------------------------------------------------------------------
# Presets and columns
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Default column names of one public dataset; comma-separated names are tried in order."""

    data_source: str
    split: str
    question: str
    answer: str
    image: str
    id: str | None = None
    choices: str | None = None
    label: str | None = None
    meta: str | None = None  # benchmark fields the community protocol needs (calibrl_verl.protocols); kept if present


@dataclass(frozen=True)
class Columns:
    """Column names resolved against the actual source table (None: feature not used)."""

    question: str
    answer: str
    image: str | None
    id: str | None
    choices: str | None
    label: str | None
    category: str | None = None
    meta: tuple[str, ...] = ()


def resolve_column(available: Sequence[str], spec: str | None, what: str, required: bool, source: str) -> str | None:
    """First candidate of ``spec`` ("a,b") present in ``available``; PrepError if required and none is."""
    if spec is None or spec.strip() == "":
        return None
    candidates = [name.strip() for name in spec.split(",") if name.strip()]
    for name in candidates:
        if name in available:
            return name
    if not required:
        return None
    raise PrepError(
        f"{source}: missing {what} column (tried {', '.join(repr(c) for c in candidates)}); "
        f"available columns: {sorted(available)}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A table to convert: its name (for messages), column names, row iterator and default image folder."""

    name: str
    columns: list[str]
    rows: Iterable[dict]
    base_dir: Path
    total: int | None = None  # row count when known cheaply (parquet metadata, jsonl lines, hub length)


def open_source(spec: str, split: str | None, subset: str | None = None) -> Source:
    """Open a local json/jsonl/parquet file or folder, else try ``datasets.load_dataset(spec)``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _data_files_in(path, split)
        return _open_files(files, name=str(path), base_dir=path)
    if path.is_file():
        return _open_files([path], name=str(path), base_dir=path.parent)
    if path.suffix.lower() in DATA_SUFFIXES or spec.startswith((".", "/", "~")):
        raise PrepError(f"input file not found: {spec}")
    return _open_hub(spec, split, subset)


def _data_files_in(folder: Path, split: str | None) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if split:
        files = [p for p in files if p.stem == split or p.name.startswith(f"{split}-")]
    if not files:
        raise PrepError(f"{folder}: no {'/'.join(DATA_SUFFIXES)} files{f' for split {split!r}' if split else ''}")
    return files


def _open_files(files: list[Path], name: str, base_dir: Path) -> Source:
    columns = _file_columns(files[0])
    for other in files[1:]:
        missing = set(columns) - set(_file_columns(other))
        if missing:
            raise PrepError(f"{other}: columns {sorted(missing)} of {files[0]} are missing")

    def rows() -> Iterator[dict]:
        for file in files:
            yield from _read_file(file)

    return Source(name=name, columns=columns, rows=rows(), base_dir=base_dir, total=_count_rows(files))


def _count_rows(files: list[Path]) -> int | None:
    """Rows of parquet (metadata) and jsonl (non-blank lines) files; None when a json file is among them."""
    total = 0
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            total += pq.ParquetFile(path).metadata.num_rows
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                total += sum(1 for line in handle if line.strip())
        else:
            return None
    return total


def _file_columns(path: Path) -> list[str]:
    if path.suffix.lower() == ".parquet":
        try:
            return list(pq.read_schema(path).names)
        except (pa.ArrowInvalid, OSError) as exc:
            raise PrepError(f"{path}: not a readable parquet file ({exc})") from exc
    columns: dict[str, None] = {}
    for record in _read_file(path):
        columns.update(dict.fromkeys(record))
    if not columns:
        raise PrepError(f"{path}: no rows")
    return list(columns)


def _read_file(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".jsonl":
        yield from read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    else:
        raise PrepError(f"{path}: unsupported file type (use {', '.join(DATA_SUFFIXES)})")


def _read_parquet(path: Path) -> Iterator[dict]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PrepError(f"{path}: not a readable parquet file ({exc})") from exc
    for batch in parquet.iter_batches(batch_size=WRITE_CHUNK_ROWS):
        yield from batch.to_pylist()


def read_jsonl(path: Path) -> Iterator[dict]:
    """Rows of a jsonl file; PrepError naming the line for invalid json or non-object lines."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PrepError(f"{path}:{number}: invalid json ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise PrepError(f"{path}:{number}: expected a json object, got {type(record).__name__}")
            yield record


def _read_json(path: Path) -> Iterator[dict]:
    """A json list of objects, or an object mapping ids to objects (e.g. MathVista's annotation files)."""
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise PrepError(f"{path}: invalid json ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        data = [{"__key__": key, **value} for key, value in data.items()]
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise PrepError(f"{path}: expected a json list of objects (or an object of objects)")
    yield from data


def _open_hub(name: str, split: str | None, subset: str | None) -> Source:
    try:
        import datasets

        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # offline, unknown name, bad split ...: one clear message
        raise PrepError(
            f"{name!r} is not a local file or folder and could not be loaded with datasets.load_dataset "
            f"(split={split!r}): {type(exc).__name__}: {exc}"
        ) from exc
    if not hasattr(dataset, "column_names") or isinstance(dataset.column_names, dict):
        raise PrepError(f"{name}: pass --split (available: {list(dataset.keys())})")
    columns = list(dataset.column_names)
    return Source(name=name, columns=columns, rows=iter(dataset), base_dir=Path.cwd(), total=len(dataset))


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelCap:
    """Bounds on an image's pixel count, applied as qwen-vl-utils' ``smart_resize`` applies them.

    ``max_pixels`` / ``min_pixels``: None leaves that side open; ``factor``: the side lengths' multiple (28 for
    Qwen2.5-VL, 32 for Qwen3-VL)."""

    max_pixels: int | None = None
    min_pixels: int | None = None
    factor: int = IMAGE_FACTOR

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise PrepError(f"--image-factor must be >= 1, got {self.factor}")
        if self.max_pixels is not None and self.max_pixels < self.factor**2:
            raise PrepError(f"--max-pixels must be >= {self.factor**2} (one {self.factor} x {self.factor} token), "
                            f"got {self.max_pixels}")  # fmt: skip
        if self.min_pixels is not None and self.min_pixels < 1:
            raise PrepError(f"--min-pixels must be >= 1, got {self.min_pixels}")
        if self.max_pixels is not None and self.min_pixels is not None and self.min_pixels > self.max_pixels:
            raise PrepError(f"--min-pixels {self.min_pixels} is above --max-pixels {self.max_pixels}")

    def new_size(self, width: int, height: int) -> tuple[int, int] | None:
        """``(width, height)`` to resize to, or None when the image is within the bounds and is kept as it is."""
        lo, hi = self.min_pixels or 0, self.max_pixels or float("inf")
        f = self.factor
        rounded = max(f, round(height / f) * f) * max(f, round(width / f) * f)
        if lo <= rounded <= hi:
            return None
        new_height, new_width = smart_resize(height, width, f, self.min_pixels, self.max_pixels)
        return new_width, new_height


def smart_resize(
    height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[int, int]:
    """``(height, width)`` as ``qwen_vl_utils.smart_resize`` computes it (vision_process.py, qwen-vl-utils 0.0.14):
    both sides multiples of ``factor``, the aspect ratio kept as closely as possible, the area within
    ``[min_pixels, max_pixels]`` (None: unbounded). Unlike it, extreme aspect ratios (> 200) are not refused and a
    side never drops below ``factor``."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if max_pixels is not None and h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif min_pixels is not None and h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resolve_image_path(path: str | os.PathLike, image_dir: Path, row_id: str) -> Path:
    """``image_dir / path`` (lexically normalised); PrepError when the path escapes ``image_dir``."""
    base = os.path.abspath(image_dir)
    full = os.path.normpath(os.path.join(base, os.fspath(path)))
    if os.path.commonpath([base, full]) != base:
        raise PrepError(f"row {row_id}: image path {os.fspath(path)!r} escapes --image-dir {base}")
    return Path(full)


def load_images(
    value: Any, image_dir: Path, row_id: str, cap: PixelCap | None = None, stats: Counter | None = None
) -> list[bytes]:
    """All images of a row as PNG bytes; accepts paths, {"bytes"/"path"} dicts, raw bytes, PIL images, lists.

    With ``cap``, an image outside its bounds is resized to ``cap.new_size`` (counted in ``stats["images_resized"]``).
    """
    items = [item for item in _as_list(value) if item is not None and item != ""]
    return [encode_png(_image_payload(item, image_dir, row_id), row_id, cap, stats) for item in items]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, bytes | bytearray | Image.Image):
        return list(value.tolist())
    return [value]


def _image_payload(item: Any, image_dir: Path, row_id: str) -> bytes | Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    if isinstance(item, dict):
        if item.get("bytes"):
            return bytes(item["bytes"])
        if item.get("path"):
            return _read_image_file(item["path"], image_dir, row_id)
        raise PrepError(f"row {row_id}: image dict without 'bytes' or 'path': keys {sorted(item)}")
    if isinstance(item, str | os.PathLike):
        return _read_image_file(item, image_dir, row_id)
    raise PrepError(f"row {row_id}: unsupported image value of type {type(item).__name__}")


def _read_image_file(path: str | os.PathLike, image_dir: Path, row_id: str) -> bytes:
    full = resolve_image_path(path, image_dir, row_id)
    if not full.is_file():
        raise ImageError(f"row {row_id}: image file not found: {full}")
    return full.read_bytes()


def encode_png(
    payload: bytes | Image.Image, row_id: str, cap: PixelCap | None = None, stats: Counter | None = None
) -> bytes:
    """Decode and re-encode as RGB PNG (transparency flattened onto white, as diagrams expect), resized into
    ``cap``'s bounds with the bicubic filter ``qwen_vl_utils.fetch_image`` resizes with (PIL's default)."""
    try:
        image = payload if isinstance(payload, Image.Image) else Image.open(BytesIO(payload))
        image.load()
        image = _to_rgb(image)
        size = cap.new_size(*image.size) if cap is not None else None
        if size is not None:
            image = image.resize(size, Image.Resampling.BICUBIC)
            if stats is not None:
                stats["images_resized"] += 1
        buffer = BytesIO()
        image.save(buffer, format="PNG")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"row {row_id}: cannot decode image ({exc})") from exc
    return buffer.getvalue()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# Questions, choices, answers
# --------------------------------------------------------------------------------------------------------------------


def build_prompt(question: str, n_images: int, instruction: str) -> list[dict]:
    """User turn: one ``<image>`` per image (kept in place when the question already has exactly that many)."""
    text = _IMAGE_TAG_RE.sub(IMAGE_TOKEN, question.strip())
    if text.count(IMAGE_TOKEN) != n_images:
        text = IMAGE_TOKEN * n_images + text.replace(IMAGE_TOKEN, " ").strip()
    content = f"{text}\n{instruction}" if instruction else text
    return [{"role": "user", "content": content}]


def parse_choices(value: Any) -> list[str]:
    """Options as a list of texts; accepts lists, json-list strings and "A. x; B. y" strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return _parse_choice_string(value)
    options = [str(item).strip() for item in _as_list(value)]
    return [_strip_option_prefix(text, LETTERS[i]) for i, text in enumerate(options) if i < len(LETTERS)]


def _parse_choice_string(value: str) -> list[str]:
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if parsed is None:  # MMMU stores its options as a Python list literal: "['a', 'b']"
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                parsed = None
        if isinstance(parsed, list):
            return parse_choices(parsed)
    parts = _INLINE_OPTION_RE.split(text)
    if len(parts) < 3:
        return [text]
    return [parts[i + 1].strip().rstrip(";").strip() for i in range(1, len(parts) - 1, 2)]


def _strip_option_prefix(text: str, letter: str) -> str:
    match = re.match(rf"^\(?{letter}\)?\s*[.:：)]\s*(.+)$", text, re.DOTALL)
    return match.group(1).strip() if match else text


def format_choices(choices: Sequence[str]) -> str:
    """``A. first\\nB. second``."""
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(choices))


def clean_ground_truth(value: Any) -> str:
    """Ground truth as a string: ``<answer>`` / ``\\boxed{}`` / ``$..$`` wrappers removed, ``27.0`` -> ``27``.

    A list (e.g. OlympiadBench's ``final_answer``) becomes its cleaned items joined by ``", "``.
    """
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(text for text in (clean_ground_truth(item) for item in value) if text)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    tagged = extract_answer(text)
    if tagged is not None:
        text = tagged.strip()
    if "\\boxed" in text and extract_boxed_content is not None:
        boxed = extract_boxed_content(text)
        text = boxed if boxed != "None" else text
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    if _INTEGRAL_FLOAT_RE.fullmatch(text):  # AMC's answers are stored as floats ("27.0"), also in text files
        text = text.split(".")[0]
    return text


def choice_ground_truth(answer: str, choices: Sequence[str], label: Any, row_id: str) -> str | None:
    """Option letter of the correct choice (from ``label`` index, the answer letter or the answer text)."""
    if label is not None and label != "":
        try:
            index = int(label)
        except (TypeError, ValueError) as exc:
            raise PrepError(f"row {row_id}: label {label!r} is not an option index") from exc
        if not 0 <= index < len(choices):
            raise PrepError(f"row {row_id}: label {index} out of range for {len(choices)} choices")
        return LETTERS[index]
    for i, text in enumerate(choices):
        if text.strip() == answer:
            return LETTERS[i]
    letter = option_letter(answer)
    if letter is not None and LETTERS.index(letter) < len(choices):
        return letter
    wanted = normalize_answer(answer).casefold()
    for i, text in enumerate(choices):
        if normalize_answer(text).casefold() == wanted:
            return LETTERS[i]
    return None


# --------------------------------------------------------------------------------------------------------------------
# Expert chains of thought
# --------------------------------------------------------------------------------------------------------------------


def load_experts(path: Path, id_field: str, text_field: str, stats: Counter) -> dict[str, str]:
    """``{id: cot}`` from a jsonl (or json list) file; the first CoT of a duplicated id wins."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"expert file not found: {path}")
    rows = read_jsonl(path) if path.suffix.lower() != ".json" else _read_json(path)
    experts: dict[str, str] = {}
    for number, record in enumerate(rows, start=1):
        for name in (id_field, text_field):
            if name not in record:
                raise PrepError(f"{path}: record {number} has no field {name!r}; fields: {sorted(record)}")
        key = str(record[id_field])
        if key in experts:
            stats["expert_duplicate_ids"] += 1
            continue
        experts[key] = "" if record[text_field] is None else str(record[text_field])
    stats["expert_records"] = len(experts)
    return experts


def extract_final_answer(cot: str) -> str | None:
    """Final answer of a plain CoT: the last ``\\boxed{}``, else an "answer is X" / "Answer: X" last line."""
    if "\\boxed" in cot and extract_boxed_content is not None:
        boxed = extract_boxed_content(cot).strip()
        if boxed and boxed != "None":
            return boxed
    lines = [line.strip() for line in cot.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _FINAL_LINE_RE.search(lines[-1].replace("**", ""))
    if match is None:
        return None
    answer = match.group(1).strip().rstrip(".").strip()
    return answer or None


def prepare_expert(cot: str | None) -> tuple[str, str]:
    """``(solution, status)``; status is expert_formatted / expert_wrapped / expert_unparsable / expert_missing.

    A CoT already in ``<think>..</think><answer>..</answer>`` form is kept. A plain CoT becomes
    ``<think>{cot}</think><answer>{final answer}</answer>`` when its final answer can be extracted; the ground
    truth is never substituted (that would fake expert quality), so unparsable CoTs give an empty solution.
    """
    text = (cot or "").strip()
    if not text:
        return "", "expert_missing"
    if format_reward(text) == 1.0:
        return text, "expert_formatted"
    tagged_answer = extract_answer(text)
    body = _THINK_ANSWER_TAG_RE.sub("", _ANSWER_BLOCK_RE.sub("", text)).strip()
    answer = tagged_answer.strip() if tagged_answer else extract_final_answer(body)
    if not answer or not body:
        return "", "expert_unparsable"
    return f"<think>{body}</think><answer>{answer}</answer>", "expert_wrapped"


# --------------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------------


# (record, ground truth, stats) -> (solution, status): picks a row's expert from its own columns
RowExpert = Callable[[dict, str, Counter], tuple[str, str]]


@dataclass
class Options:
    """How to convert a source (everything but the column names)."""

    data_source: str
    split: str
    image_dir: Path
    instruction: str = INSTRUCTION
    skip_missing_images: bool = False
    limit: int | None = None
    experts: dict[str, str] | None = None
    require_expert: bool = False
    categories: tuple[str, ...] = ()
    stats: Counter = field(default_factory=Counter)
    row_expert: RowExpert | None = None  # expert taken from the row itself (R1 traces), instead of ``experts``
    pixel_cap: PixelCap | None = None  # --max-pixels / --min-pixels: images resized into these bounds


def convert_rows(source: Source, columns: Columns, options: Options) -> Iterator[dict]:
    """Yield output rows (docs/algorithm.md §6); counts go to ``options.stats``, progress to stderr."""
    stats, written, seen_ids = options.stats, 0, set()
    with progress(source.rows, total=source.total, desc=f"prep {options.data_source}", unit="rows") as bar:
        for position, record in enumerate(bar):
            if options.limit is not None and written >= options.limit:
                break
            stats["rows_read"] += 1
            row = _convert_one(record, position, columns, options, written)
            if row is not None:
                seen_ids.add(row["extra_info"]["id"])
                written += 1
            bar.set_postfix(kept=written, dropped=stats["rows_read"] - written)
            if row is not None:
                yield row
    if options.experts is not None:
        stats["expert_ids_not_in_data"] = len(set(options.experts) - seen_ids)


def _convert_one(record: dict, position: int, columns: Columns, options: Options, index: int) -> dict | None:
    stats = options.stats
    row_id = _row_id(record, columns, position)
    if not _category_selected(record, columns, options):
        stats["skipped_category"] += 1
        return None
    question, ground_truth = _question_and_truth(record, columns, row_id, stats)
    if not ground_truth:
        stats["skipped_no_answer"] += 1
        return None
    solution, status = _expert_solution(record, row_id, ground_truth, options)
    if not solution and options.require_expert:
        stats["skipped_no_expert"] += 1
        return None
    try:
        images = (
            load_images(record.get(columns.image), options.image_dir, row_id, options.pixel_cap, stats)
            if columns.image
            else []
        )
    except ImageError:
        if not options.skip_missing_images:
            raise
        stats["skipped_missing_image"] += 1
        return None
    _count_row(stats, images, solution, status, ground_truth)
    row = _output_row(options, index, row_id, question, ground_truth, images, solution)
    row["extra_info"]["meta"] = row_meta(record, columns)
    return row


def row_meta(record: dict, columns: Columns) -> str:
    """``extra_info.meta``: a JSON object with the source question and choices as given and the preset's ``meta``
    columns (MathVista's ``query`` and ``precision``, WeMath's ``key``...), which the community evaluation protocol
    builds its prompts and scoring from; "" when there is nothing to keep (training sets)."""
    meta = {name: _jsonable(record.get(name)) for name in columns.meta}
    if meta and columns.choices:
        meta["choices"] = parse_choices(record.get(columns.choices))
    if meta:
        meta.setdefault("question", str(record.get(columns.question) or "").strip())
        meta.setdefault("answer", _jsonable(record.get(columns.answer)))
    return json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else ""


def _jsonable(value: Any) -> Any:
    """A source value as JSON data: numpy arrays and scalars become lists and numbers, images are dropped."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not isinstance(v, bytes)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _count_row(stats: Counter, images: list[bytes], solution: str, status: str | None, truth: str) -> None:
    stats["images"] += len(images)
    stats["rows_without_images"] += int(not images)
    if status is not None:
        stats[status] += 1
    if solution:
        stats["expert_correct"] += int(compute_score("expert", solution, truth, strict_format=True)["acc"] == 1.0)


def _row_id(record: dict, columns: Columns, position: int) -> str:
    value = record.get(columns.id) if columns.id else None
    return str(position) if value is None or value == "" else str(value)


def _category_selected(record: dict, columns: Columns, options: Options) -> bool:
    if not options.categories:
        return True
    category = str(record.get(columns.category) or "").casefold()
    return any(wanted.casefold() in category for wanted in options.categories)


def _question_and_truth(record: dict, columns: Columns, row_id: str, stats: Counter) -> tuple[str, str]:
    question = record.get(columns.question)
    if question is None or not str(question).strip():
        raise PrepError(f"row {row_id}: empty {columns.question!r}")
    question = str(question).strip()
    answer = clean_ground_truth(record.get(columns.answer))
    choices = parse_choices(record.get(columns.choices)) if columns.choices else []
    if not choices:
        return question, answer
    label = record.get(columns.label) if columns.label else None
    letter = choice_ground_truth(answer, choices, label, row_id)
    if letter is None:
        stats["choice_answer_unmatched"] += 1
    return f"{question}\n{format_choices(choices)}", letter or answer


def _expert_solution(record: dict, row_id: str, truth: str, options: Options) -> tuple[str, str | None]:
    """``(solution, status)``: from the row (``row_expert``) or the expert file; "" and None without either."""
    if options.row_expert is not None:
        return options.row_expert(record, truth, options.stats)
    if options.experts is None:
        return "", None
    return prepare_expert(options.experts.get(row_id))


def _output_row(
    options: Options, index: int, row_id: str, question: str, truth: str, images: list[bytes], solution: str
) -> dict:
    return {
        "data_source": options.data_source,
        "prompt": build_prompt(question, len(images), options.instruction),
        "images": [{"bytes": data} for data in images],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {
            "split": options.split,
            "index": index,
            "id": row_id,
            "question": _IMAGE_TAG_RE.sub("", question).strip(),
            "answer": truth,
            "meta": "",
        },
        "solution": solution,
    }


def write_parquet(rows: Iterable[dict], output: Path) -> int:
    """Write rows in chunks to ``output`` (atomically, via a temporary file); returns the row count."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    count = 0
    try:
        with pq.ParquetWriter(tmp, OUTPUT_SCHEMA) as writer:
            for chunk in _chunks(rows, WRITE_CHUNK_ROWS):
                writer.write_table(pa.Table.from_pylist(chunk, schema=OUTPUT_SCHEMA))
                count += len(chunk)
        if count == 0:
            raise PrepError(f"no rows to write to {output} (see the counts above)")
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def _chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, preset: Preset | None) -> None:
    """Arguments shared by every script; column defaults come from ``preset`` (help shows them)."""

    def default(name: str) -> str:
        value = getattr(preset, name, None) if preset else None
        return f" (default: {value})" if value else ""

    parser.add_argument("--input", required=True, help="local .json/.jsonl/.parquet file or folder, or HF name")
    parser.add_argument("--output", required=True, help="output parquet file")
    parser.add_argument("--image-dir", default=None, help="root of relative image paths (default: input's folder)")
    parser.add_argument("--split", default=None, help=f"split name{default('split')}")
    parser.add_argument("--subset", default=None, help="HF dataset config name (hub loading only)")
    parser.add_argument("--data-source", default=None, help=f"data_source value{default('data_source')}")
    for name in ("id", "question", "answer", "image", "choices", "label"):
        parser.add_argument(
            f"--{name}-column", default=None, help=f"{name} column, comma-separated candidates{default(name)}"
        )
    parser.add_argument("--instruction", default=INSTRUCTION, help="text appended to the question ('' for none)")
    parser.add_argument("--skip-missing-images", action="store_true", help="skip (and count) rows with bad images")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many output rows")
    parser.add_argument(
        "--max-pixels", type=int, default=None,
        help="resize images above this many pixels down (aspect kept, sides multiples of --image-factor), as "
             "qwen-vl-utils' smart_resize does; e.g. 1003520 = 1280 visual tokens of 28 x 28 (default: keep size)",
    )  # fmt: skip
    parser.add_argument("--min-pixels", type=int, default=None, help="resize images below this many pixels up")
    parser.add_argument(
        "--image-factor", type=int, default=IMAGE_FACTOR,
        help=f"pixels per side of a visual token for the resizing: {IMAGE_FACTOR} for Qwen2.5-VL, 32 for Qwen3-VL",
    )  # fmt: skip


def pixel_cap(args: argparse.Namespace) -> PixelCap | None:
    """The ``PixelCap`` of ``--max-pixels`` / ``--min-pixels`` (None when neither is given)."""
    max_pixels, min_pixels = getattr(args, "max_pixels", None), getattr(args, "min_pixels", None)
    if max_pixels is None and min_pixels is None:
        return None
    return PixelCap(max_pixels, min_pixels, getattr(args, "image_factor", IMAGE_FACTOR))


def resolve_columns(args: argparse.Namespace, preset: Preset, source: Source, category: str | None = None) -> Columns:
    """Columns from CLI values (required when given) or preset defaults (id/choices/label optional)."""

    def pick(name: str, required_default: bool) -> str | None:
        given = getattr(args, f"{name}_column", None)
        spec = given if given is not None else getattr(preset, name)
        column = resolve_column(source.columns, spec, name, bool(given) or required_default, source.name)
        if column is None and name in ("question", "answer"):
            raise PrepError(f"--{name}-column cannot be empty")
        return column

    return Columns(
        question=pick("question", True),
        answer=pick("answer", True),
        image=pick("image", True),
        id=pick("id", False),
        choices=pick("choices", False),
        label=pick("label", False),
        category=resolve_column(source.columns, category, "category", True, source.name) if category else None,
        meta=tuple(c for c in (preset.meta or "").split(",") if c and c in source.columns),
    )


def run(
    args: argparse.Namespace,
    preset: Preset,
    row_expert: Callable[[Source], RowExpert] | None = None,
    source_transform: Callable[[Source], Source] | None = None,
    **option_overrides: Any,
) -> dict:
    """Convert ``args.input`` to ``args.output``; prints and returns the summary counts.

    ``row_expert`` builds, from the opened source (so it can check its columns first), the function that takes
    each row's expert from the row itself. ``source_transform`` reshapes the opened source first (MMMU: its
    ``image_1`` .. ``image_7`` columns become one ``images`` list).
    """
    split = args.split or preset.split
    cap = pixel_cap(args)  # bad bounds fail before the source is read
    source = open_source(args.input, split, args.subset)
    if source_transform is not None:
        source = source_transform(source)
    category_column = option_overrides.pop("category_column", None)
    columns = resolve_columns(args, preset, source, category_column)
    if row_expert is not None:
        option_overrides["row_expert"] = row_expert(source)
    options = Options(
        data_source=args.data_source or preset.data_source,
        split=split,
        image_dir=Path(args.image_dir).expanduser() if args.image_dir else source.base_dir,
        instruction=args.instruction,
        skip_missing_images=args.skip_missing_images,
        limit=args.limit,
        pixel_cap=cap,
        **option_overrides,
    )
    if cap is not None:
        options.stats["images_resized"] += 0  # shown in the summary even when no image needed it
    written = write_parquet(convert_rows(source, columns, options), Path(args.output))
    summary = {"output": str(args.output), "rows_written": written, **dict(sorted(options.stats.items()))}
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")


def run_cli(main: Callable[[Sequence[str] | None], dict], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main``; PrepError becomes ``error: ...`` on stderr and exit status 2."""
    try:
        main(argv)
    except PrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
