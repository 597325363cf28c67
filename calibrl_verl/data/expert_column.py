"""The expert column of a training row (``calibrl.expert_key``, default ``solution``): one trace or several.

A row holds a single expert chain-of-thought (a string) or a list of them (``calibrl_verl.experts generate
--samples N`` keeps every verified trace). With ``calibrl.experts_per_group = k`` the trainer draws k distinct
traces per prompt and step from that list (``integration.trainer``); the data checks, the agent loop and the trainer
all read the column through ``expert_traces``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def expert_traces(value: Any) -> list[str]:
    """The non-empty traces of one expert-column value: a string (one trace) or a list / array of strings.

    Empty or whitespace-only strings and non-strings (None, NaN from a parquet null) are no trace.
    """
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, Sequence) or hasattr(value, "tolist"):  # a list, or the numpy array a dataset gives
        items = list(value)
    else:
        items = []
    return [t for t in items if isinstance(t, str) and t.strip()]
