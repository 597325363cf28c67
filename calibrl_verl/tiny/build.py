"""CLI: build the tiny Qwen2.5-VL, its processor, the synthetic task parquet and an SFT warm-start, in seconds.

    python -m calibrl_verl.tiny.build --out DIR [--n-train N --n-val N --seed S --warmstart-steps K]
                                      [--family qwen2_5_vl|qwen3_vl]   (the VL model in DIR/model)
                                      [--family text]   (the text task instead: calibrl_verl.tiny.text_task)
                                      [--family wall]   (the coverage study's navigation task:
                                                         calibrl_verl.tiny.wall_task)

Writes DIR/model (VL model + processor), DIR/text_model (text-only Qwen2 + tokenizer), DIR/data/train.parquet,
DIR/data/val.parquet and DIR/build_info.json (sizes, timings, warm-start loss and measured accuracy).
Everything is local and deterministic given the seed; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from calibrl_verl import tiny
from calibrl_verl.tiny.models import build_processor, build_text_model, build_tokenizer, build_vl_model
from calibrl_verl.tiny.task import make_items, tokenizer_corpus, write_parquet
from calibrl_verl.tiny.warmstart import torch_threads, warm_start_and_probe

# 300 steps: with head_dim 32 (2 heads, for vLLM's CPU attention) 150 steps left greedy accuracy at 0.20; 300 give
# 0.33 greedy / 0.34 sampled on seed 0 (0.55 on seed 1), ~13 s on one core
DEFAULT_WARMSTART_STEPS = 300
DEFAULT_WARMSTART_ITEMS = 256
# the tiny VL models (calibrl_verl.tiny.models: Qwen2.5-VL, the default; calibrl_verl.tiny.qwen3_vl: Qwen3-VL)
VL_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
# text: a text-only Qwen2 on a text-only task, no VL model (calibrl_verl.tiny.text_task.build_text)
# wall: the published navigation task and model of the coverage study (calibrl_verl.tiny.wall_task.build_wall)
FAMILIES = tiny.FAMILIES


def build(
    out: Path,
    n_train: int = 64,
    n_val: int = 32,
    seed: int = 0,
    warmstart_steps: int | None = None,
    n_warmstart: int | None = None,
    eval_samples: int = 64,
    threads: int = 1,
    family: str = "qwen2_5_vl",
) -> dict[str, Any]:
    """Build every tiny asset under ``out`` and return (and save) a summary of what was built.

    ``family`` picks the VL model saved in ``out/model``: the tiny Qwen2.5-VL (default) or Qwen3-VL; ``text`` and
    ``wall`` build a text-only model and task instead. For ``wall``, ``n_warmstart`` is the SFT split's size
    (default ``wall_task.DEFAULT_SFT_ITEMS``; the SFT is one epoch, so ``warmstart_steps`` does not apply) and
    ``eval_samples`` the samples per problem of its pass@1 / coverage probe (0: no probe)."""
    with torch_threads(threads):
        if family == "wall":
            from calibrl_verl.tiny import wall_task

            if warmstart_steps is not None:
                raise ValueError("--warmstart-steps: the wall task's SFT is one epoch; size it with --warmstart-items")
            n_sft = wall_task.DEFAULT_SFT_ITEMS if n_warmstart is None else n_warmstart
            return wall_task.build_wall(out, n_train, n_val, seed, n_sft, eval_samples)
        n_warmstart = DEFAULT_WARMSTART_ITEMS if n_warmstart is None else n_warmstart
        if family == "text":  # its own tokenizer corpus, model, task and warm-start length; no VL model
            from calibrl_verl.tiny import text_task

            steps = text_task.DEFAULT_WARMSTART_STEPS if warmstart_steps is None else warmstart_steps
            return text_task.build_text(out, n_train, n_val, seed, steps, n_warmstart, eval_samples)
        steps = DEFAULT_WARMSTART_STEPS if warmstart_steps is None else warmstart_steps
        return _build(out, n_train, n_val, seed, steps, n_warmstart, eval_samples, family)


def _build(
    out: Path, n_train: int, n_val: int, seed: int, warmstart_steps: int, n_warmstart: int, eval_samples: int,
    family: str = "qwen2_5_vl",
) -> dict[str, Any]:
    """The build proper (see ``build``): assets, data, warm-start, accuracy probe, save, summary."""
    t0 = time.perf_counter()
    out = Path(out)
    tokenizer = build_tokenizer(tokenizer_corpus(seed))
    processor, model = build_vl(family, tokenizer, seed)
    train = write_parquet(make_items(n_train, seed, "train"), "train", out / "data" / "train.parquet")
    val = write_parquet(make_items(n_val, seed, "val"), "val", out / "data" / "val.parquet")
    t1 = time.perf_counter()
    probe = make_items(max(n_val, eval_samples), seed, "val")[:eval_samples]  # the val split's first items
    trained = warm_start_and_probe(model, processor, make_items(n_warmstart, seed, "warmstart"), probe,
                                   warmstart_steps, seed)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    text_model = build_text_model(tokenizer, seed)
    text_model.save_pretrained(out / "text_model")
    tokenizer.save_pretrained(out / "text_model")
    info = {
        "family": family,
        "seed": seed,
        "model_dir": str(out / "model"),
        "text_model_dir": str(out / "text_model"),
        "train_files": str(train),
        "val_files": str(val),
        "n_train": n_train,
        "n_val": n_val,
        "vl_params": sum(p.numel() for p in model.parameters()),
        "text_params": sum(p.numel() for p in text_model.parameters()),
        "vocab_size": len(tokenizer),
        **trained,
    }
    info["seconds"].update(assets=t1 - t0, total=time.perf_counter() - t0)
    (out / "build_info.json").write_text(json.dumps(info, indent=2))
    return info


def build_vl(family: str, tokenizer: Any, seed: int) -> tuple[Any, Any]:
    """(processor, randomly initialised model) of the tiny VL ``family``, sharing ``tokenizer``."""
    if family == "qwen2_5_vl":
        return build_processor(tokenizer), build_vl_model(tokenizer, seed)
    if family == "qwen3_vl":
        from calibrl_verl.tiny import qwen3_vl

        return qwen3_vl.build_processor(tokenizer), qwen3_vl.build_model(tokenizer, seed)
    raise ValueError(f"--family {family!r}: expected one of {', '.join(VL_FAMILIES)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults give a build of about 20-30 s on 2 CPU cores."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=64, help="RL train prompts")
    parser.add_argument("--n-val", type=int, default=32, help="RL validation prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmstart-steps", type=int, default=None,
                        help=f"SFT steps (0: random; default {DEFAULT_WARMSTART_STEPS}, 200 for --family text)")
    parser.add_argument("--warmstart-items", type=int, default=None,
                        help=f"SFT split size (default {DEFAULT_WARMSTART_ITEMS}; --family wall: one epoch over "
                             "24000 problems)")
    parser.add_argument("--eval-samples", type=int, default=64,
                        help="val items for the accuracy probe (--family wall: samples per problem; 0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on shared cores)")
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILIES,
                        help="the tiny VL model's family, text or wall")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point: build, then print the summary as JSON."""
    args = parse_args(argv)
    info = build(
        args.out,
        n_train=args.n_train,
        n_val=args.n_val,
        seed=args.seed,
        warmstart_steps=args.warmstart_steps,
        n_warmstart=args.warmstart_items,
        eval_samples=args.eval_samples,
        threads=args.threads,
        family=args.family,
    )
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
