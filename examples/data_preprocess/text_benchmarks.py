"""Text math benchmarks -> verl RL parquet for ``python -m calibrl_verl.evaluate`` (data_source = benchmark name).

Column defaults follow each dataset card's documented layout (not checked against downloads); the first alias
present is used, every one can be overridden (``--question-column``, ``--answer-column``, ``--id-column``), and a
table without them fails with the list of columns it has:

* math500       (``HuggingFaceH4/MATH-500``, split test): problem, answer, unique_id
* aime24        (``HuggingFaceH4/aime_2024`` or ``AI-MO/aimo-validation-aime``, split train): problem, answer, id
* aime25        (``opencompass/AIME2025``, configs AIME2025-I / AIME2025-II, split test): question (or problem),
  answer
* amc23         (``AI-MO/aimo-validation-amc``, split train): problem, answer (floats such as 27.0 become "27"), id
* minerva       (``math-ai/minervamath``, split test): question, answer
* olympiadbench (``Hothan/OlympiadBench``, e.g. config OE_TO_maths_en_COMP, split train): question, final_answer
  (a list; its items are joined by ", "); ``math-ai/olympiadbench`` (question, answer; pass ``--split test``)

Ground truths lose ``$..$`` / ``\\boxed{}`` wrappers; the prompt is the question plus the think/answer
instruction, with no images.

    python examples/data_preprocess/text_benchmarks.py --benchmark math500 --input data/raw/math500/test.jsonl \
        --output data/math500/test.parquet
    python -m calibrl_verl.evaluate --model MODEL --data data/math500/test.parquet data/eval/aime24.parquet
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from calibrl_verl.data import prep, text_prep


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--benchmark", required=True, choices=sorted(text_prep.BENCHMARK_PRESETS), help="which benchmark's layout"
    )
    prep.add_common_arguments(parser, None)
    return text_prep.run_benchmark(parser.parse_args(argv))


if __name__ == "__main__":
    prep.run_cli(main)
