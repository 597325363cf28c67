"""GeoQA -> verl RL parquet (train / test).

Defaults accept the common GeoQA layouts: the original release / ``hz2475/geoQA`` (``subject`` = question text,
``choices`` list, ``label`` = index of the correct choice, ``image``) and R1-V style tables (``problem``,
``solution``/``answer``, ``image``). When choices are present they are appended to the question as
``A. ..`` lines and the ground truth becomes the option letter; ``--choices-column ''`` keeps the free-form answer.

    python examples/data_preprocess/geoqa.py --input data/raw/geoqa_test.jsonl --image-dir data/raw/geoqa_images \
        --split test --output data/geoqa/test.parquet
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from calibrl_verl.data import prep

PRESET = prep.Preset(
    data_source="geoqa",
    split="test",
    id="id,qid,question_id",
    question="question,subject,problem",
    answer="answer,ground_truth,solution",
    image="image,images,image_path",
    choices="choices,options",
    label="label",
)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_common_arguments(parser, PRESET)
    return prep.run(parser.parse_args(argv), PRESET)


if __name__ == "__main__":
    prep.run_cli(main)
