"""The ``calibrl`` protocol: the parquet's training prompt and the training reward (what the paper reports)."""

from __future__ import annotations

from typing import Any

from calibrl_verl.protocols.base import Item, Protocol
from calibrl_verl.reward import compute_score, graded_text


class CalibRLProtocol(Protocol):
    name = "calibrl"

    def rules(self, data_source: str) -> str:
        return "calibrl_reward"

    def prompt(self, item: Item) -> list[dict[str, Any]]:
        return item.prompt

    def grade(self, item: Item, response: str) -> dict[str, Any]:
        score = compute_score(item.data_source, response, item.ground_truth, item.extra_info)
        extracted = graded_text(item.data_source, response) if isinstance(response, str) else None
        return {**score, "extracted": extracted, "route": "reward" if extracted is not None else "none"}
