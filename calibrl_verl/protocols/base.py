"""What an evaluation protocol sees of a benchmark row, and what it must provide."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class ProtocolError(ValueError):
    """A benchmark row lacks what the protocol needs (named: file row, field, expected value)."""


@dataclass(frozen=True)
class Item:
    """One benchmark row as a protocol sees it."""

    data_source: str
    prompt: list[dict[str, Any]]  # the parquet's chat prompt (CalibRL's training prompt)
    ground_truth: Any
    extra_info: dict[str, Any] | None
    meta: dict[str, Any] = field(default_factory=dict)  # extra_info.meta parsed ({} when absent)
    n_images: int = 0
    where: str = "a row"  # "bench: row 3", for errors


def parse_meta(extra_info: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """``extra_info.meta`` (a JSON object written by the data prep) as a dict; {} when the row has none."""
    raw = (extra_info or {}).get("meta")
    if raw is None or raw == "":
        return {}
    try:
        meta = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"{where}: extra_info.meta is not a JSON object ({err}): {str(raw)[:80]!r}") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"{where}: extra_info.meta must be a JSON object, got {type(meta).__name__}")
    return meta


class Protocol:
    """A prompt builder and a grader; ``extras`` adds benchmark-level figures (WeMath's four dimensions)."""

    name = "?"

    def rules(self, data_source: str) -> str:
        """The name of the rule set this protocol applies to ``data_source`` (reported in summary.json)."""
        raise NotImplementedError

    def prompt(self, item: Item) -> list[dict[str, Any]]:
        """Chat messages with one ``<image>`` placeholder per image."""
        raise NotImplementedError

    def grade(self, item: Item, response: str) -> dict[str, Any]:
        """``{"score", "acc", "format", "extracted", "route"}`` (acc/format 0 or 1; never raises on model output)."""
        raise NotImplementedError

    def extras(self, rules: str, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Benchmark-level figures computed from ``samples.parquet`` rows of one benchmark ({} by default)."""
        return {}


def user_prompt(item: Item, text: str, system: str | None = None) -> list[dict[str, Any]]:
    """One user turn: the row's images first (as the harness passes visuals before the text), then ``text``."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": "<image>" * item.n_images + text}]


def need(item: Item, key: str, rules: str) -> Any:
    """``extra_info.meta[key]``; a ProtocolError names the row, the field and how to get it."""
    if key not in item.meta:
        raise ProtocolError(
            f"{item.where}: the community {rules} rules need extra_info.meta[{key!r}] (the benchmark's own column), "
            f"which this row lacks; prepare the file with examples/data_preprocess/eval_sets.py --benchmark {rules}")
    return item.meta[key]


def question_text(item: Item) -> str:
    """The source question as given (``meta.question``), else ``extra_info.question`` (choices appended by prep)."""
    return str(item.meta.get("question") or (item.extra_info or {}).get("question") or "")


def graded(acc: bool, extracted: str | None, route: str) -> dict[str, Any]:
    """A grade in the shape every protocol returns (``format``: an answer was found at all)."""
    value = float(bool(acc))
    return {"score": value, "acc": value, "format": float(extracted is not None), "extracted": extracted,
            "route": route}


def tags_of(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample's ``tags`` (a JSON object string in samples.parquet, written from ``Rules.tags``); {} if none."""
    raw = sample.get("tags")
    return json.loads(raw) if isinstance(raw, str) and raw else {}
