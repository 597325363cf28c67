"""OpenR1-Math (DeepSeek-R1 traces as experts) -> verl RL parquet for text-only CalibRL training.

Written against the dataset card's layout of ``open-r1/OpenR1-Math-220k`` (LUFFY's source set, which LUFFY filters
to ~46k problems with traces within 8192 tokens; not checked against a download): ``problem`` -> prompt (+ the
think/answer instruction), ``answer`` -> ground truth, ``uuid`` -> id, and as expert ``solution`` the first trace in
``generations`` that ``correctness_math_verify`` marks correct, ``is_reasoning_complete`` marks complete, that wraps
into ``<think>{R1 think part}</think><answer>{final boxed answer}</answer>`` and that CalibRL's reward grades
correct. Skipped traces are counted per reason (trace_unverified, trace_incomplete, trace_unparsable,
trace_reward_rejected); rows without a usable trace keep an empty ``solution`` (expert_missing) or are dropped with
``--require-expert``. The card's own ``solution`` column (human-written) is not used. A table without the needed
columns fails with the list of columns it has.

    python examples/data_preprocess/openr1_math.py --input data/raw/openr1_math/default \
        --output data/openr1_math/train.parquet
    # or straight from the hub (needs network): --input open-r1/OpenR1-Math-220k --subset default --split train
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from calibrl_verl.data import prep, text_prep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_common_arguments(parser, text_prep.OPENR1_PRESET)
    text_prep.add_trace_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    return text_prep.run_openr1(build_parser().parse_args(argv))


if __name__ == "__main__":
    prep.run_cli(main)
