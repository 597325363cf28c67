"""One benchmark's community rule set: its prompt, its rule-based grade, and (where the harness uses one) its judge."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from calibrl_verl.protocols.base import Item


@dataclass(frozen=True)
class Rules:
    """``prompt(item)`` -> chat messages; ``grade(item, response)`` -> ``base.graded(...)``.

    ``judge_prompt(item, response)`` -> the text sent to the judge; ``judge_grade(item, reply)`` -> ``(extracted,
    correct)`` from the judge's reply. ``tags(item)`` -> the fields ``samples.parquet`` keeps per sample (its
    ``tags`` column) so that ``extras(samples)``, the benchmark-level figures, can be recomputed from that file."""

    name: str
    source: str  # the public file each rule follows, for the docs and summary.json
    prompt: Callable[[Item], list[dict[str, Any]]]
    grade: Callable[[Item, str], dict[str, Any]]
    judge_prompt: Callable[[Item, str], str] | None = None
    judge_grade: Callable[[Item, str], tuple[str | None, bool]] | None = None
    tags: Callable[[Item], dict[str, Any]] | None = None
    extras: Callable[[Sequence[dict[str, Any]]], dict[str, Any]] | None = None
