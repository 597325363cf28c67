"""Opt-in runs, left out of the default run to keep CI under 30 minutes and selected with ``-m <marker>`` (or any -m
naming it): ``families`` (the smoke runs of the other model families, and the other opt-in launches: RL-PLUS, the
shipped recipes one step each, verl's SFT trainer and merge), ``studies`` (the toy and coverage studies' fast
presets end to end), ``serve`` (vLLM's OpenAI server on the tiny model),
``faults`` (workers killed mid-step, then resumed) and ``nodes`` (the tiny recipe on a two-node Ray cluster on this
machine)."""

from __future__ import annotations

import pytest

OPT_IN = {
    "families": "opt-in launch (model families, RL-PLUS, real recipes, SFT + merge): select with -m families "
                "(bash scripts/test.sh -m families)",
    "studies": "the studies' fast presets end to end (3 launches, ~7 min): select with -m studies "
               "(bash scripts/test.sh -m studies)",
    "nodes": "starts a two-node Ray cluster on this machine: select with -m nodes (bash scripts/test.sh -m nodes)",
    "serve": "starts vLLM's OpenAI server: select with -m serve (bash scripts/test.sh -m serve)",
    "faults": "kills Ray workers of two tiny runs mid-step and resumes them (~8 min): select with -m faults "
              "(bash scripts/test.sh -m faults)",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    chosen = config.getoption("-m") or ""
    for marker, reason in OPT_IN.items():
        if marker in chosen:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
