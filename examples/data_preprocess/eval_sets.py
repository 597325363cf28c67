"""Evaluation benchmarks -> verl RL parquet: MathVista, MathVerse, MathVision, WeMath (test / testmini).

Column defaults per benchmark (all overridable):

* mathvista  (``AI4Math/MathVista``): pid, question, decoded_image|image, choices, answer (choice text -> letter)
* mathverse  (``AI4Math/MathVerse``, config ``testmini``): sample_index, question (choices already inside),
  image, answer (letter for multiple choice)
* mathvision (``MathLLMs/MathVision``): id, question (``<image1>`` tags become placeholders), decoded_image|image,
  options, answer (letter when options exist)
* wemath     (``We-Math/We-Math``): ID, question, image_path|image, option ("A. ..; B. .." string), answer (letter)

When a row has choices they are appended to the question as ``A. ..`` lines and the ground truth becomes the
option letter. Rows without a ground truth (e.g. MathVista's hidden ``test`` answers) are skipped and counted.

    python examples/data_preprocess/eval_sets.py --benchmark mathvista --input AI4Math/MathVista \
        --split testmini --output data/eval/mathvista_testmini.parquet
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from calibrl_verl.data import prep

PRESETS = {
    "mathvista": prep.Preset(
        data_source="mathvista",
        split="testmini",
        id="pid",
        question="question",
        answer="answer",
        image="decoded_image,image",
        choices="choices",
    ),
    "mathverse": prep.Preset(
        data_source="mathverse",
        split="testmini",
        id="sample_index,problem_index",
        question="question,query_wo",
        answer="answer",
        image="image,decoded_image",
    ),
    "mathvision": prep.Preset(
        data_source="mathvision",
        split="testmini",
        id="id",
        question="question",
        answer="answer",
        image="decoded_image,image",
        choices="options",
    ),
    "wemath": prep.Preset(
        data_source="wemath",
        split="testmini",
        id="ID,id",
        question="question",
        answer="answer",
        image="image_path,image",
        choices="option,options",
    ),
}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, choices=sorted(PRESETS), help="which benchmark's schema")
    prep.add_common_arguments(parser, None)
    args = parser.parse_args(argv)
    return prep.run(args, PRESETS[args.benchmark])


if __name__ == "__main__":
    prep.run_cli(main)
