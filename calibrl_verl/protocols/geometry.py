"""Geometry3K and GeoQA: the public harnesses' protocols.

Geometry3K, as lmms-eval 0.7.3 evaluates it (``tasks/geometry3k``; four lettered choices): prompt ``{problem}\\n``,
the choices as ``A. ..`` lines, ``\\nAnswer with the option's letter from the given choices directly.``; grade: the
last match of the first of four letter patterns that matches (``answer: X`` / ``answer = (X)``, ``X.`` / ``X)`` /
``X]``, a response that is only ``X`` or ``(X)``, then any standalone letter A-D, case-insensitive, so the article
"a" counts as A), else the first choice whose text occurs in the response; it must equal the row's ``ground_truth``
letter. Our Geometry3K parquet (hiyouga/geometry3k) keeps ``choices`` and ``ground_truth`` in ``extra_info.meta``; a
``<image>`` tag inside the problem text is dropped (the image goes first).

GeoQA has no lmms-eval or VLMEvalKit task. We follow EasyR1's GeoQA baseline (``examples/format_prompt/r1v.jinja``,
``examples/reward_function/r1v.py``): the question, a space and the instruction to reason in ``<think>`` and answer in
``<answer>`` tags; grade: the first single-line ``<answer>`` block's content (else the whole response), stripped, by
``mathruler.grader.grade_answer`` against the ground truth (on answers safe for sympy:
``reward.guarded_grade_answer``). R1-V's own script runs ``math_verify.parse`` on the whole response; the math_verify we
pin finds no answer in ``<answer>140</answer>``, so that rule would grade by library version. A GeoQA file prepared with
its lettered choices (the original release) gets the ``generic`` multiple-choice rules.
"""

from __future__ import annotations

import re
from typing import Any

from calibrl_verl.protocols.base import Item, graded, need, question_text, user_prompt
from calibrl_verl.protocols.rules import Rules
from calibrl_verl.reward import MAX_ANSWER_LEN, guarded_grade_answer

LETTERS = "ABCD"
MC_PROMPT = "Answer with the option's letter from the given choices directly."
GEOQA_SUFFIX = (
    " A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>")
_GEOQA_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>")  # no DOTALL: a one-line answer, as EasyR1
_LETTER_RES = (re.compile(r"[Aa]nswer\s*[:=]\s*\(?([A-Da-d])\)?"), re.compile(r"\b([A-Da-d])\s*[.)\]]"),
               re.compile(r"^\s*\(?([A-Da-d])\)?$"), re.compile(r"\b([A-Da-d])\b"))


def geometry3k_prompt(item: Item) -> list[dict[str, Any]]:
    problem = question_text(item).replace("<image>", "").strip()
    choices = need(item, "choices", "geometry3k")
    lines = "\n".join(f"{letter}. {c}" for letter, c in zip(LETTERS, choices, strict=False))
    return user_prompt(item, f"{problem}\n{lines}\n{MC_PROMPT}")


def letter_of(response: str, choices: list[str]) -> tuple[str, str]:
    """``(letter or "", route)`` by the four patterns, then the choice texts."""
    text = response.strip()
    for pattern in _LETTER_RES:
        letters = [m.upper() for m in pattern.findall(text) if m.upper() in LETTERS]
        if letters:
            return letters[-1], "letter"
    lowered = text.lower()
    for letter, choice in zip(LETTERS, choices, strict=False):
        if str(choice).lower() in lowered:
            return letter, "choice_text"
    return "", "none"


def geometry3k_grade(item: Item, response: str) -> dict[str, Any]:
    truth = str(need(item, "ground_truth", "geometry3k")).strip().upper()
    letter, route = letter_of(response if isinstance(response, str) else "", need(item, "choices", "geometry3k"))
    return graded(bool(letter) and letter == truth, letter or None, route)


def _lettered(item: Item) -> bool:
    """A GeoQA file prepared with its choices (the original release) is graded by option letter."""
    truth = str(item.ground_truth).strip()
    return len(truth) == 1 and truth in "ABCDEFGHIJK"


def geoqa_prompt(item: Item) -> list[dict[str, Any]]:
    if _lettered(item):
        from calibrl_verl.protocols.community import generic_prompt

        return generic_prompt(item)
    question = str(item.meta.get("question") or question_text(item))
    return user_prompt(item, question.replace("<image>", "").strip() + GEOQA_SUFFIX)


def geoqa_grade(item: Item, response: str) -> dict[str, Any]:
    if _lettered(item):
        from calibrl_verl.protocols.community import generic_grade

        return generic_grade(item, response)
    text = response if isinstance(response, str) else ""
    match = _GEOQA_ANSWER_RE.search(text)
    given = (match.group(1) if match else text).strip()
    if not given or len(given) > MAX_ANSWER_LEN:
        return graded(False, None, "none")
    correct = guarded_grade_answer(given, str(item.ground_truth).strip())
    return graded(correct, given, "answer_tag" if match else "raw")


GEOMETRY3K = Rules("geometry3k", "lmms-eval 0.7.3 tasks/geometry3k (geometry3k.yaml, utils.py)", geometry3k_prompt,
                   geometry3k_grade)
GEOQA = Rules("geoqa", "EasyR1 examples/format_prompt/r1v.jinja, examples/reward_function/r1v.py (no lmms-eval / "
              "VLMEvalKit task)", geoqa_prompt, geoqa_grade)
