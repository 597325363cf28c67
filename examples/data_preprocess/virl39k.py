"""ViRL39K-style problems + expert chains of thought -> verl RL parquet for CalibRL training.

Problems: a local json/jsonl/parquet file (or folder) with an image folder, or a HF dataset name
(``TIGER-Lab/ViRL39K``: qid, question, answer, image = list of relative paths, category, ...).
Experts: a jsonl file of ``{"id": ..., "cot": ...}`` records (field names: ``--expert-id-field``,
``--expert-text-field``), joined on the problem id. CoTs already in ``<think>..</think><answer>..</answer>``
form are kept; plain CoTs are wrapped as ``<think>{cot}</think><answer>{final answer}</answer>`` where the
final answer is the CoT's last ``\\boxed{}`` or an "answer is X" / "Answer: X" last line. The ground truth is
never used as the expert's answer: CoTs without an extractable answer leave ``solution`` empty and are counted
as ``expert_unparsable``; rows without an expert are kept with an empty ``solution`` (``--require-expert``
drops them). ``expert_correct`` counts experts whose own answer matches the ground truth.

    python examples/data_preprocess/virl39k.py --input data/raw/virl39k.parquet --image-dir data/raw \
        --experts data/raw/gpt4o_cots.jsonl --categories geometr --output data/virl39k/train.parquet
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from calibrl_verl.data import prep

PRESET = prep.Preset(
    data_source="virl39k",
    split="train",
    id="qid,id",
    question="question,problem",
    answer="answer",
    image="image,images",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_common_arguments(parser, PRESET)
    parser.add_argument("--experts", default=None, help="expert CoT jsonl (or json list) file")
    parser.add_argument("--expert-id-field", default="id", help="id field of the expert records (default: id)")
    parser.add_argument("--expert-text-field", default="cot", help="CoT field of the expert records (default: cot)")
    parser.add_argument("--require-expert", action="store_true", help="drop rows without a usable expert CoT")
    parser.add_argument(
        "--categories", default="", help="keep rows whose category contains one of these comma-separated words"
    )
    parser.add_argument("--category-column", default="category", help="category column (default: category)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    stats: Counter = Counter()
    experts: dict[str, str] = {}  # without a file every row counts as expert_missing
    if args.experts:
        experts = prep.load_experts(Path(args.experts), args.expert_id_field, args.expert_text_field, stats)
    if args.require_expert and not args.experts:
        raise prep.PrepError("--require-expert needs --experts")
    categories = tuple(word.strip() for word in args.categories.split(",") if word.strip())
    return prep.run(
        args,
        PRESET,
        experts=experts,
        require_expert=args.require_expert,
        categories=categories,
        category_column=args.category_column if categories else None,
        stats=stats,
    )


if __name__ == "__main__":
    prep.run_cli(main)
