"""Evaluation benchmarks -> verl RL parquet: MathVista, MathVerse, MathVision, WeMath, ScienceQA, MMMU.

Column defaults per benchmark (all overridable):

* mathvista  (``AI4Math/MathVista``): pid, question, decoded_image|image, choices, answer (choice text -> letter)
* mathverse  (``CaraJ/MathVerse-lmmseval`` as lmms-eval reads it, or ``AI4Math/MathVerse``; config ``testmini``, or
  ``testmini_version_split`` with ``--split vision_only``): sample_index, question (choices already inside), image,
  answer (letter for multiple choice). Vision-only rows have an empty ``question`` (it is in the image): add
  ``--question-column query_wo``
* mathvision (``MathLLMs/MathVision``): id, question (``<image1>`` tags become placeholders), decoded_image|image,
  options, answer (letter when options exist)
* wemath     (``We-Math/We-Math``): ID, question, image_path|image, option ("A. ..; B. .." string), answer (letter)
* scienceqa  (``lmms-lab/ScienceQA``, config ``ScienceQA-IMG``, split test): question, image, choices, answer (index)
* mmmu       (``lmms-lab/MMMU``, split validation): id, question, options (a Python list literal), answer (letter or
  text), image_1 .. image_7 (those the question's ``<image k>`` tags name, in tag order)

Each benchmark's own fields (MathVista's ``query``, ``precision``; WeMath's ``ID``, ``key``; ScienceQA's ``hint``...)
are kept in ``extra_info.meta`` for ``calibrl_verl.evaluate --protocol community`` (docs/evaluation.md).

When a row has choices they are appended to the question as ``A. ..`` lines and the ground truth becomes the
option letter. Rows without a ground truth (e.g. MathVista's hidden ``test`` answers) are skipped and counted.

    python examples/data_preprocess/eval_sets.py --benchmark mathvista --input AI4Math/MathVista \
        --split testmini --output data/eval/mathvista_testmini.parquet
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence

from calibrl_verl.data import prep

MMMU_IMAGES = "images"  # built from image_1 .. image_7 by mmmu_images
_IMAGE_TAG_RE = re.compile(r"<image (\d+)>")


def mmmu_images(source: prep.Source) -> prep.Source:
    """MMMU keeps up to seven images in ``image_1`` .. ``image_7``, referred to as ``<image k>`` in the question and
    options; the images named there are kept in the order the tags first appear, since the prompt puts each image at
    its tag (``image_1`` alone when nothing names one). lmms-eval sorts them by number instead: the two differ only
    for a question that names a later image first."""

    def with_images(row: dict) -> dict:
        text = f"{row.get('question') or ''} {row.get('options') or ''}"
        numbers = list(dict.fromkeys(int(k) for k in _IMAGE_TAG_RE.findall(text))) or [1]
        images = [row.get(f"image_{k}") for k in numbers]
        return {**row, MMMU_IMAGES: [image for image in images if image is not None]}

    return dataclasses.replace(source, columns=[*source.columns, MMMU_IMAGES], rows=map(with_images, source.rows))


PRESETS = {
    "mathvista": prep.Preset(
        data_source="mathvista",
        split="testmini",
        id="pid",
        question="question",
        answer="answer",
        image="decoded_image,image",
        choices="choices",
        meta="query,question_type,answer_type,precision,unit",
    ),
    "mathverse": prep.Preset(
        data_source="mathverse",
        split="testmini",
        id="sample_index,problem_index",
        question="question,query_wo",
        answer="answer",
        image="image,decoded_image",
        meta="query_wo,query_cot,question_for_eval,question_type,problem_version",
    ),
    "mathvision": prep.Preset(
        data_source="mathvision",
        split="testmini",
        id="id",
        question="question",
        answer="answer",
        image="decoded_image,image",
        choices="options",
        meta="level,subject",
    ),
    "wemath": prep.Preset(
        data_source="wemath",
        split="testmini",
        id="ID,id",
        question="question",
        answer="answer",
        image="image_path,image",
        choices="option,options",
        meta="ID,key,option,knowledge concept,question number",
    ),
    "scienceqa": prep.Preset(
        data_source="scienceqa",
        split="test",
        id="id,pid",
        question="question",
        answer="answer",
        image="image",
        choices="choices",
        label="answer",
        meta="hint,subject,grade,category",
    ),
    "mmmu": prep.Preset(
        data_source="mmmu",
        split="validation",
        id="id",
        question="question",
        answer="answer",
        image=MMMU_IMAGES,
        choices="options",
        meta="question_type,subfield,img_type,topic_difficulty",
    ),
}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, choices=sorted(PRESETS), help="which benchmark's schema")
    prep.add_common_arguments(parser, None)
    args = parser.parse_args(argv)
    transform = mmmu_images if args.benchmark == "mmmu" else None
    return prep.run(args, PRESETS[args.benchmark], source_transform=transform)


if __name__ == "__main__":
    prep.run_cli(main)
