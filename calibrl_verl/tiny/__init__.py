"""Tiny local assets for tests, the CPU demo and CI: a 200k-parameter Qwen2.5-VL and a synthetic image task.

Build them with ``python -m calibrl_verl.tiny.build --out DIR`` (about 20-30 s on 2 CPU cores, no downloads);
``--family text`` builds a text-only Qwen2 and a synthetic arithmetic task instead (``text_task``).
``--family wall`` builds the coverage study's navigation task and model (``wall_task``).
``--family qwen3_vl`` builds a tiny Qwen3-VL instead of the Qwen2.5-VL (``qwen3_vl``); ``load_vl`` reloads either.
Submodules import torch/transformers lazily through this package so ``import calibrl_verl.tiny`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "load_vl", "model_dir", "text_model_dir", "train_files", "val_files"]

# what ``python -m calibrl_verl.tiny.build --family`` builds (kept here so callers need not import torch)
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "text", "wall")


def model_dir(root: str | Path) -> Path:
    """The VL model + processor directory of a build (``actor_rollout_ref.model.path``)."""
    return Path(root) / "model"


def text_model_dir(root: str | Path) -> Path:
    """The text-only model + tokenizer directory of a build (``--family text``: warm-started on the text task)."""
    return Path(root) / "text_model"


def train_files(root: str | Path) -> Path:
    """The RL train parquet of a build (``data.train_files``)."""
    return Path(root) / "data" / "train.parquet"


def val_files(root: str | Path) -> Path:
    """The RL validation parquet of a build (``data.val_files``)."""
    return Path(root) / "data" / "val.parquet"


def load_vl(root: str | Path) -> tuple[Any, Any]:
    """Reload (model, processor) through the Auto classes, as verl does, to prove the saved files suffice."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = model_dir(root)
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
