"""Evaluation protocols: how a benchmark row becomes the model's prompt and how its answer is graded.

* ``calibrl``: the training prompt stored in the parquet (``<think>``/``<answer>`` instruction) and the training
  reward (``calibrl_verl.reward.compute_score``): what the paper reports.
* ``community``: per benchmark, the prompt and the rule-based scoring of the public harness (lmms-eval), with lenient
  answer extraction so any model can be graded (``calibrl_verl.protocols.community``, docs/evaluation.md).

``calibrl_verl.evaluate --protocol NAME`` picks one; ``summary.json`` names it per benchmark with the rule set used.
"""

from __future__ import annotations

from calibrl_verl.protocols.base import Item, Protocol
from calibrl_verl.protocols.calibrl import CalibRLProtocol
from calibrl_verl.protocols.community import CommunityProtocol

PROTOCOLS: dict[str, type[Protocol]] = {"calibrl": CalibRLProtocol, "community": CommunityProtocol}


def get_protocol(name: str) -> Protocol:
    """A protocol by name; a ValueError lists the known ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]()


__all__ = ["PROTOCOLS", "Item", "Protocol", "get_protocol"]
