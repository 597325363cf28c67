"""Geometry3K -> verl RL parquet (train / validation / test).

Defaults follow the Hugging Face ``hiyouga/geometry3k`` schema (images, problem, answer, id, choices,
ground_truth): the free-form ``answer`` is the ground truth, as in verl's and EasyR1's geo3k recipes. Pass
``--choices-column choices --answer-column ground_truth`` to grade by option letter instead.

    python examples/data_preprocess/geometry3k.py --input hiyouga/geometry3k --split train \
        --output data/geometry3k/train.parquet
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from calibrl_verl.data import prep

PRESET = prep.Preset(
    data_source="geometry3k",
    split="train",
    id="id",
    question="problem,question",
    answer="answer",
    image="images,image",
    meta="choices,ground_truth",  # the community protocol grades lmms-eval's lettered form (docs/evaluation.md)
)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_common_arguments(parser, PRESET)
    return prep.run(parser.parse_args(argv), PRESET)


if __name__ == "__main__":
    prep.run_cli(main)
