"""Text-only reasoning data: OpenR1-Math with DeepSeek-R1 expert traces, and the text math benchmarks.

Both write the same verl RL parquet as the vision scripts (``prep.OUTPUT_SCHEMA``, docs/algorithm.md §6) with an empty
``images`` list and no ``<image>`` placeholder in the prompt; reading, column resolution, chunked writing and the
counts summary are :mod:`calibrl_verl.data.prep`'s.

Column names follow the datasets' cards (the hub cannot be reached from the machines this was written on, so they
are the documented layouts, not checked against downloads); a table without a required column fails with a
message listing the columns it has, and every name can be overridden on the command line.

OpenR1-Math-220k (``open-r1/OpenR1-Math-220k``, LUFFY's source set, which LUFFY filters to ~46k problems with traces
within 8192 tokens): ``problem``, ``solution`` (the human-written solution, NOT used), ``answer``, ``uuid``,
``generations`` (list of DeepSeek-R1 traces, ``<think>..</think>`` then a summary), ``correctness_math_verify``
(list of bool), ``is_reasoning_complete`` (list of bool), plus ``problem_type``, ``question_type``, ``source``,
``correctness_llama``, ``finish_reasons``, ``correctness_count``, ``messages`` (unused). The expert of a row is its
first trace that

1. math_verify marked correct (``correctness_math_verify[i]``) and that finished its reasoning
   (``is_reasoning_complete[i]``),
2. splits into a think part (text before ``</think>``) and a final answer (the last ``\\boxed{}`` of the summary
   after ``</think>``, else of the think part), wrapped as ``<think>{think}</think><answer>{answer}</answer>``,
3. and that CalibRL's own reward (``calibrl_verl.reward.compute_score``) grades correct against ``answer``.

Traces failing a rule are skipped and counted (``trace_unverified``, ``trace_incomplete``, ``trace_unparsable``,
``trace_reward_rejected``); a row with no passing trace keeps an empty ``solution`` (``expert_missing``; it
trains as plain GRPO) unless ``--require-expert`` drops it.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from calibrl_verl.data import prep
from calibrl_verl.reward import compute_score, format_reward

OPENR1_PRESET = prep.Preset(
    data_source="openr1_math",
    split="train",
    id="uuid,id",
    question="problem,question",
    answer="answer",
    image="",
)

# Text benchmarks: column aliases per the dataset cards (first present wins), data_source = the benchmark name.
BENCHMARK_PRESETS = {
    # HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id
    "math500": prep.Preset("math500", "test", "problem", "answer", "", id="unique_id,id"),
    # HuggingFaceH4/aime_2024 (id, problem, solution, answer, url, year) / AI-MO/aimo-validation-aime (id, problem,
    # solution, answer, url)
    "aime24": prep.Preset("aime24", "train", "problem,question", "answer", "", id="id,ID"),
    # opencompass/AIME2025 (configs AIME2025-I / AIME2025-II): question, answer; problem/answer also accepted
    "aime25": prep.Preset("aime25", "test", "question,problem", "answer", "", id="id,ID"),
    # AI-MO/aimo-validation-amc: id, problem, answer (a float such as 27.0 -> "27"), url
    "amc23": prep.Preset("amc23", "train", "problem,question", "answer", "", id="id"),
    # math-ai/minervamath: question, answer
    "minerva": prep.Preset("minerva", "test", "question,problem", "answer", "", id="id,idx"),
    # Hothan/OlympiadBench (config e.g. OE_TO_maths_en_COMP): id, question, final_answer (list of str, joined by
    # ", "), ...; math-ai/olympiadbench: question, answer
    "olympiadbench": prep.Preset("olympiadbench", "train", "question,problem", "final_answer,answer", "", id="id"),
}

_THINK_CLOSE = "</think>"
_TAGS_RE = re.compile(r"</?(?:think|answer)>")


@dataclass(frozen=True)
class TraceColumns:
    """Where a row's R1 traces and their per-trace flags are."""

    generations: str
    verified: str
    complete: str


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """OpenR1-specific arguments (column names of the traces and their flags)."""
    parser.add_argument("--generations-column", default="generations", help="R1 traces (default: generations)")
    parser.add_argument(
        "--verified-column",
        default="correctness_math_verify",
        help="per-trace math_verify flags (default: %(default)s)",
    )
    parser.add_argument(
        "--complete-column", default="is_reasoning_complete", help="per-trace completeness (default: %(default)s)"
    )
    parser.add_argument("--require-expert", action="store_true", help="drop rows without a usable R1 trace")


def resolve_trace_columns(args: argparse.Namespace, source: prep.Source) -> TraceColumns:
    """The trace columns of ``source``; PrepError listing the available columns when one is missing."""

    def pick(spec: str, what: str) -> str:
        column = prep.resolve_column(source.columns, spec, what, True, source.name)
        if column is None:
            raise prep.PrepError(f"--{what}-column cannot be empty")
        return column

    return TraceColumns(
        generations=pick(args.generations_column, "generations"),
        verified=pick(args.verified_column, "verified"),
        complete=pick(args.complete_column, "complete"),
    )


def wrap_r1_trace(trace: str) -> str | None:
    """``<think>{think part}</think><answer>{final boxed answer}</answer>``, or None when the trace has no
    ``</think>``, an empty think part, no final answer, or stray think/answer tags inside."""
    head, sep, summary = trace.partition(_THINK_CLOSE)
    if not sep:
        return None
    think = head.strip().removeprefix("<think>").strip()
    answer = prep.extract_final_answer(summary) or prep.extract_final_answer(think)
    if not think or not answer or _TAGS_RE.search(think) or _TAGS_RE.search(answer):
        return None
    solution = f"<think>{think}</think><answer>{answer}</answer>"
    return solution if format_reward(solution) == 1.0 else None


class R1ExpertPicker:
    """``prep.RowExpert`` for OpenR1-Math: the first verified, complete, parsable, reward-correct trace."""

    def __init__(self, columns: TraceColumns) -> None:
        self.columns = columns

    def __call__(self, record: dict, truth: str, stats: Counter) -> tuple[str, str]:
        traces = _as_list(record.get(self.columns.generations))
        verified = _as_list(record.get(self.columns.verified))
        complete = _as_list(record.get(self.columns.complete))
        for i, trace in enumerate(traces):
            stats["traces_checked"] += 1
            solution = self._check(i, trace, verified, complete, truth, stats)
            if solution is not None:
                return solution, "expert_r1_trace"
        return "", "expert_missing"

    @staticmethod
    def _check(i: int, trace: Any, verified: list, complete: list, truth: str, stats: Counter) -> str | None:
        # A flag list shorter than the traces leaves the trace unflagged: treated as not verified / not complete.
        if not (i < len(verified) and verified[i] is True):
            stats["trace_unverified"] += 1
            return None
        if not (i < len(complete) and complete[i] is True):
            stats["trace_incomplete"] += 1
            return None
        solution = wrap_r1_trace(trace) if isinstance(trace, str) else None
        if solution is None:
            stats["trace_unparsable"] += 1
            return None
        if compute_score("openr1_math", solution, truth, strict_format=True)["acc"] != 1.0:
            stats["trace_reward_rejected"] += 1
            return None
        return solution


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    if hasattr(value, "tolist"):  # numpy arrays from pandas / datasets
        return list(value.tolist())
    return [value]


def run_openr1(args: argparse.Namespace) -> dict:
    """OpenR1-Math -> verl RL parquet with R1 experts (see the module docstring)."""
    return prep.run(
        args,
        OPENR1_PRESET,
        row_expert=lambda source: R1ExpertPicker(resolve_trace_columns(args, source)),
        require_expert=args.require_expert,
    )


def run_benchmark(args: argparse.Namespace) -> dict:
    """One text benchmark -> eval parquet (``data_source`` = the benchmark name)."""
    return prep.run(args, BENCHMARK_PRESETS[args.benchmark])
