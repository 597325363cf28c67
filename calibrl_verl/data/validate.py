"""Load-time validation of a verl RL parquet (docs/algorithm.md §6) before any GPU time is spent on it.

Every finding names the file, the row (0-based position in the file) and the column at fault. Two severities:

* errors (the run cannot train correctly on this file): a missing required column, a prompt that is not a list
  of chat messages, a missing / undecodable image or an image path that leaves the parquet's folder, a number of
  images that differs from the number of ``<image>`` placeholders, a missing ground truth. All errors of the file
  are collected and raised together as one :class:`DataValidationError` (the first 20 listed plus a count).
* counted fallbacks (the run trains, with a documented behaviour): ``expert_missing`` (group trains as plain
  GRPO), ``expert_bad_format`` (expert not in ``<think>..</think><answer>..</answer>`` form), ``expert_overlong``
  (cut or dropped at run time per ``calibrl.expert_overlong``), ``prompt_overlong`` (text tokens alone exceed
  the limit), ``duplicate_ids`` (``extra_info.index`` / ``extra_info.id`` repeated). They go to the report.

Data is never eval'ed, exec'ed or unpickled; images are checked with PIL only. Usage::

    python -m calibrl_verl.data.validate data/train.parquet --tokenizer Qwen/Qwen2.5-VL-7B-Instruct \\
        --max-prompt-tokens 20480 --max-response-tokens 4096
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from calibrl_verl.data.expert_column import expert_traces
from calibrl_verl.reward import EXACT_MATCH_SOURCES, exact_match_score, format_reward

IMAGE_TOKEN = "<image>"
MAX_LISTED_ERRORS = 20
MAX_EXAMPLES = 5
BATCH_ROWS = 256
ID_FIELDS = ("index", "id")

ERROR_KINDS = (
    "missing_column",
    "prompt_not_chat",
    "image_missing",
    "image_undecodable",
    "image_path_escape",
    "image_count_mismatch",
    "ground_truth_missing",
)
COUNTED_KINDS = ("expert_missing", "expert_bad_format", "expert_overlong", "prompt_overlong", "duplicate_ids")
FALLBACKS = {
    "expert_missing": "these groups train as plain GRPO (no expert row, no guide term)",
    "expert_bad_format": "the expert is used as is; its format reward will be 0",
    "expert_overlong": "cut to max_response_length or dropped at run time, per calibrl.expert_overlong",
    "prompt_overlong": "verl filters or truncates these prompts per data.filter_overlong_prompts / truncation",
    "duplicate_ids": "rows are kept; per-id logs and evaluation joins become ambiguous",
}


@dataclass(frozen=True)
class Finding:
    """One problem: where it is (file, row, column) and what it is."""

    kind: str
    path: str
    row: int | None
    column: str
    message: str

    def __str__(self) -> str:
        where = "all rows" if self.row is None else f"row {self.row}"
        return f"{self.path}: {where}, column {self.column!r}: {self.message} [{self.kind}]"


@dataclass
class ValidationReport:
    """Result of :func:`validate_parquet`: row count, counts per kind and the first findings of each kind."""

    path: str
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[Finding]] = field(default_factory=dict)
    errors: list[Finding] = field(default_factory=list)

    def add(self, finding: Finding) -> None:
        """Count a finding, keep it as an example (first few per kind), and keep every error."""
        self.counts[finding.kind] = self.counts.get(finding.kind, 0) + 1
        examples = self.examples.setdefault(finding.kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(finding)
        if finding.kind in ERROR_KINDS:
            self.errors.append(finding)

    @property
    def ok(self) -> bool:
        """True when the file has no error findings (counted fallbacks allowed)."""
        return not self.errors

    def summary(self) -> str:
        """One printable block: rows, then each kind once with its count, fallback and first example."""
        lines = [f"{self.path}: {self.rows} rows, {len(self.errors)} errors"]
        if not self.counts:
            lines.append("  no findings")
        for kind in sorted(self.counts, key=lambda k: (k not in ERROR_KINDS, k)):
            severity = "ERROR" if kind in ERROR_KINDS else "counted"
            note = f" ({FALLBACKS[kind]})" if kind in FALLBACKS else ""
            lines.append(f"  {severity} {kind}: {self.counts[kind]}{note}")
            lines.append(f"    e.g. {self.examples[kind][0]}")
        return "\n".join(lines)


class DataValidationError(ValueError):
    """A data file cannot be trained on; the message lists every error (file, row, column), first 20 in full."""

    def __init__(self, path: str, findings: Sequence[Finding], report: ValidationReport | None = None) -> None:
        self.path = path
        self.findings = list(findings)
        self.report = report
        listed = "\n".join(f"  {f}" for f in self.findings[:MAX_LISTED_ERRORS])
        more = len(self.findings) - MAX_LISTED_ERRORS
        tail = f"\n  ... and {more} more errors" if more > 0 else ""
        super().__init__(f"{path}: {len(self.findings)} data errors:\n{listed}{tail}")


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def _open(path: Path) -> pq.ParquetFile:
    """The parquet file, or a DataValidationError naming it."""
    if not path.is_file():
        raise DataValidationError(str(path), [Finding("missing_file", str(path), None, "-", "file not found")])
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        finding = Finding("unreadable_file", str(path), None, "-", f"not a readable parquet file ({exc})")
        raise DataValidationError(str(path), [finding]) from exc


def _rows(parquet: pq.ParquetFile, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """(row position, row dict) over the file, reading only ``columns``, a batch at a time."""
    position = 0
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        for row in batch.to_pylist():
            yield position, row
            position += 1


# --------------------------------------------------------------------------------------------------------------------
# Per-column checks (each returns findings; ``where`` is (path, row))
# --------------------------------------------------------------------------------------------------------------------


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_prompt(value: Any, column: str, where: tuple[str, int]) -> tuple[list[Finding], int | None]:
    """A non-empty list of {"role": str, "content": str | list} messages; returns (findings, placeholder count)."""
    path, row = where
    if not isinstance(value, list) or not value:
        kind = type(value).__name__ if not isinstance(value, list) else "empty list"
        return [Finding("prompt_not_chat", path, row, column, f"expected a list of chat messages, got {kind}")], None
    placeholders = 0
    for i, message in enumerate(value):
        problem = _message_problem(message)
        if problem:
            return [Finding("prompt_not_chat", path, row, column, f"message {i}: {problem}")], None
        placeholders += _count_placeholders(message["content"])
    return [], placeholders


def _message_problem(message: Any) -> str | None:
    if not isinstance(message, dict):
        return f"expected a dict with 'role' and 'content', got {type(message).__name__}"
    if not _is_text(message.get("role")):
        return "missing or empty 'role'"
    content = message.get("content")
    if not isinstance(content, str | list):
        return f"'content' must be a string or a list of parts, got {type(content).__name__}"
    return None


def _count_placeholders(content: str | list) -> int:
    """``<image>`` markers in a string, or image parts (plus markers in text parts) of a content list."""
    if isinstance(content, str):
        return content.count(IMAGE_TOKEN)
    count = 0
    for part in content:
        if isinstance(part, dict):
            count += int(part.get("type") == "image")
            count += str(part.get("text") or "").count(IMAGE_TOKEN) if part.get("type") == "text" else 0
    return count


def check_images(value: Any, column: str, where: tuple[str, int], base: Path) -> tuple[list[Finding], int]:
    """Decode every image of a row with PIL; returns (findings, number of images)."""
    items = [] if value is None else value if isinstance(value, list) else [value]
    findings = []
    for i, item in enumerate(items):
        problem = _image_problem(item, base)
        if problem:
            kind, message = problem
            findings.append(Finding(kind, where[0], where[1], column, f"image {i}: {message}"))
    return findings, len(items)


def _image_problem(item: Any, base: Path) -> tuple[str, str] | None:
    """(kind, message) when an image entry cannot be loaded, else None."""
    if isinstance(item, dict):
        if item.get("bytes"):
            return _decode_problem(bytes(item["bytes"]))
        if item.get("path"):
            return _path_problem(str(item["path"]), base)
        return "image_missing", f"entry has neither 'bytes' nor 'path' (keys {sorted(item)})"
    if isinstance(item, bytes | bytearray):
        return _decode_problem(bytes(item)) if item else ("image_missing", "empty bytes")
    if isinstance(item, str) and item:
        return _path_problem(item, base)
    return "image_missing", f"no image ({type(item).__name__} {item!r:.40})"


def resolve_inside(path: str, base: Path) -> Path | None:
    """``base / path`` normalised, or None when it leaves ``base`` (``..`` or an absolute path elsewhere)."""
    root = os.path.abspath(base)
    full = os.path.normpath(os.path.join(root, path))
    return Path(full) if os.path.commonpath([root, full]) == root else None


def _path_problem(path: str, base: Path) -> tuple[str, str] | None:
    full = resolve_inside(path, base)
    if full is None:
        return "image_path_escape", f"path {path!r} leaves the parquet's folder {os.path.abspath(base)}"
    if not full.is_file():
        return "image_missing", f"file not found: {full}"
    return _decode_problem(full.read_bytes())


def _decode_problem(payload: bytes) -> tuple[str, str] | None:
    try:
        with Image.open(BytesIO(payload)) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return "image_undecodable", f"cannot decode ({type(exc).__name__}: {exc})"
    return None


def check_ground_truth(value: Any, column: str, where: tuple[str, int]) -> list[Finding]:
    """``reward_model.ground_truth`` must be present and non-empty."""
    truth = value.get("ground_truth") if isinstance(value, dict) else None
    empty = truth is None or (isinstance(truth, str) and not truth.strip()) or (isinstance(truth, list) and not truth)
    if not empty:
        return []
    detail = "no reward_model dict" if not isinstance(value, dict) else f"ground_truth is {truth!r}"
    return [Finding("ground_truth_missing", where[0], where[1], f"{column}.ground_truth", detail)]


def check_expert(value: Any, column: str, where: tuple[str, int], tokenizer: Any, max_tokens: int | None,
                 data_source: Any = None) -> list:
    """Counted expert findings: missing, not in the reward's format, longer than the response budget.

    The column holds one trace or a list of them (``data.expert_column``); each trace is checked, a finding names
    the trace's place in the list. The format is think/answer, or for an exact-match task
    (``reward.EXACT_MATCH_SOURCES``) that task's own grammar.
    """
    path, row = where
    traces = expert_traces(value)
    if not traces:
        shown = f"{type(value).__name__} {value!r:.40}"
        return [Finding("expert_missing", path, row, column, f"no expert CoT ({shown}): trains as plain GRPO")]
    findings = []
    for i, trace in enumerate(traces):
        which = f"{column}[{i}]" if not isinstance(value, str) else column
        if data_source in EXACT_MATCH_SOURCES:
            if exact_match_score(trace, trace)["format"] != 1.0:
                findings.append(Finding("expert_bad_format", path, row, which, f"not in {data_source}'s format"))
        elif format_reward(trace) != 1.0:
            findings.append(Finding("expert_bad_format", path, row, which, "not <think>..</think><answer>..</answer>"))
        if tokenizer is not None and max_tokens is not None:
            n = len(tokenizer.encode(trace, add_special_tokens=False)) + 1  # + end-of-turn, as the agent loop does
            if n > max_tokens:
                findings.append(Finding("expert_overlong", path, row, which, f"{n} tokens > {max_tokens}"))
    return findings


def prompt_tokens(tokenizer: Any, messages: list[dict]) -> int:
    """Text tokens of a prompt with the chat template when the tokenizer has one (image tokens not counted)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "\n".join(m["content"] if isinstance(m["content"], str) else "" for m in messages)
    return len(tokenizer.encode(text, add_special_tokens=False))


def check_ids(value: Any, column: str, where: tuple[str, int], seen: dict[tuple[str, Any], int]) -> list[Finding]:
    """Counted ``duplicate_ids``: an ``extra_info.index`` / ``extra_info.id`` already used by an earlier row."""
    if not isinstance(value, dict):
        return []
    findings = []
    for name in ID_FIELDS:
        key = value.get(name)
        if key is None or key == "":
            continue
        first = seen.setdefault((name, key), where[1])
        if first != where[1]:
            message = f"{name} {key!r} already used by row {first}"
            findings.append(Finding("duplicate_ids", where[0], where[1], f"{column}.{name}", message))
    return findings


# --------------------------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    expert_key: str | None
    image_key: str | None
    prompt_key: str
    tokenizer: Any
    max_prompt_tokens: int | None
    max_response_tokens: int | None


def _missing_columns(path: str, names: list[str], needed: list[str]) -> list[Finding]:
    return [
        Finding("missing_column", path, None, name, f"column missing; available columns: {sorted(names)}")
        for name in needed
        if name not in names
    ]


def _check_row(row: dict, where: tuple[str, int], s: _Settings, seen: dict, base: Path) -> list[Finding]:
    """All findings of one row."""
    findings, placeholders = check_prompt(row.get(s.prompt_key), s.prompt_key, where)
    if placeholders is not None and s.tokenizer is not None and s.max_prompt_tokens is not None:
        n = prompt_tokens(s.tokenizer, row[s.prompt_key])
        if n > s.max_prompt_tokens:
            message = f"{n} text tokens > {s.max_prompt_tokens} (image tokens not counted)"
            findings.append(Finding("prompt_overlong", where[0], where[1], s.prompt_key, message))
    n_images = 0
    if s.image_key is not None:
        image_findings, n_images = check_images(row.get(s.image_key), s.image_key, where, base)
        findings += image_findings
    if placeholders is not None and placeholders != n_images:
        message = f"{n_images} images but {placeholders} {IMAGE_TOKEN} placeholders in {s.prompt_key!r}"
        findings.append(Finding("image_count_mismatch", where[0], where[1], s.image_key or "images", message))
    findings += check_ground_truth(row.get("reward_model"), "reward_model", where)
    if s.expert_key is not None:
        findings += check_expert(row.get(s.expert_key), s.expert_key, where, s.tokenizer, s.max_response_tokens,
                                 row.get("data_source"))
    findings += check_ids(row.get("extra_info"), "extra_info", where, seen)
    return findings


def validate_parquet(
    path: str | os.PathLike,
    *,
    expert_key: str = "solution",
    needs_expert: bool = True,
    image_key: str = "images",
    prompt_key: str = "prompt",
    max_response_tokens: int | None = None,
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
) -> ValidationReport:
    """Check a verl RL parquet; return the counted findings, raise :class:`DataValidationError` on any error.

    ``needs_expert``: the loss mode uses the expert column (every mode but ``grpo``); without it the expert column
    is neither required nor checked. ``tokenizer`` (anything with ``encode``) enables ``expert_overlong`` (with
    ``max_response_tokens``, i.e. ``data.max_response_length``) and ``prompt_overlong`` (with
    ``max_prompt_tokens``). Image paths are resolved inside the parquet's folder.
    """
    file = Path(path)
    parquet = _open(file)
    names = list(parquet.schema_arrow.names)
    report = ValidationReport(path=str(file), rows=0)
    needed = [prompt_key, "reward_model"] + ([expert_key] if needs_expert else [])
    for finding in _missing_columns(str(file), names, needed):
        report.add(finding)
    settings = _Settings(
        expert_key=expert_key if needs_expert and expert_key in names else None,
        image_key=image_key if image_key in names else None,
        prompt_key=prompt_key,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
    )
    if prompt_key in names:
        _check_rows(parquet, names, settings, report, file.parent)
    else:
        report.rows = parquet.metadata.num_rows
    if report.errors:
        raise DataValidationError(str(file), report.errors, report)
    return report


def _check_rows(parquet: pq.ParquetFile, names: list[str], s: _Settings, report: ValidationReport, base: Path) -> None:
    wanted = [s.prompt_key, s.image_key, s.expert_key, "reward_model", "extra_info", "data_source"]
    columns = [name for name in dict.fromkeys(wanted) if name is not None and name in names]
    seen: dict[tuple[str, Any], int] = {}
    for position, row in _rows(parquet, columns):
        report.rows += 1
        for finding in _check_row(row, (report.path, position), s, seen, base):
            report.add(finding)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Validate verl RL parquet files for CalibRL training.")
    parser.add_argument("files", nargs="+", help="parquet files")
    parser.add_argument("--expert-key", default="solution", help="expert CoT column (calibrl.expert_key)")
    parser.add_argument("--no-expert", action="store_true", help="loss_mode=grpo: the expert column is not needed")
    parser.add_argument("--image-key", default="images")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or name (for the length checks)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="data.max_prompt_length")
    parser.add_argument("--max-response-tokens", type=int, default=None, help="data.max_response_length")
    return parser.parse_args(argv)


def _load_tokenizer(name: str | None) -> Any:
    if name is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def main(argv: Sequence[str] | None = None) -> int:
    """Validate each file, print its summary; 0 when no file has errors, 1 otherwise."""
    args = _parse(argv)
    tokenizer = _load_tokenizer(args.tokenizer)
    status = 0
    for name in args.files:
        try:
            report = validate_parquet(
                name,
                expert_key=args.expert_key,
                needs_expert=not args.no_expert,
                image_key=args.image_key,
                prompt_key=args.prompt_key,
                max_response_tokens=args.max_response_tokens,
                tokenizer=tokenizer,
                max_prompt_tokens=args.max_prompt_tokens,
            )
            print(report.summary())
        except DataValidationError as exc:
            status = 1
            if exc.report is not None:
                print(exc.report.summary())
            print(exc, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
