"""MathVista testmini, as lmms-eval 0.7.3 evaluates it (``tasks/mathvista``: ``mathvista_testmini_cot``).

Prompt (``MathVistaEvaluator.create_one_query``, shot type "step-by-step", no demos): ``Question: {question}`` (plus
`` (Unit: {unit})`` when the row has one), then ``Choices:`` with ``(A) ...`` lines for multiple choice, then a hint
that names the answer type, joined by newlines.

Grade: the harness extracts the answer with a GPT model unless the response is already a bare choice text, integer
or float. Our rule-based path keeps those fast paths and replaces the GPT step by ``lenient_answer`` (``<answer>``,
``\\boxed{}``, "answer is", a lone letter); ``--judge-*`` runs the GPT step itself through any OpenAI-compatible
endpoint. The extraction is then normalised as the harness does (``normalize_extracted_answer``): multiple choice maps
``(X)`` or a bare capital option letter to the choice text, anything else to the choice nearest in edit distance;
integers are truncated (``int(float(x))``), floats rounded to the row's ``precision``; and the result must equal the
ground truth as a string (``safe_equal``).
"""

from __future__ import annotations

import re
import string
from typing import Any

from calibrl_verl.protocols.base import Item, graded, need, user_prompt
from calibrl_verl.protocols.extract import lenient_answer
from calibrl_verl.protocols.rules import Rules

LETTERS = string.ascii_uppercase  # option letters, in order
HINTS = {
    "multi_choice": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at "
                    "the end.",
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, "
               "3, at the end.",
    "float1": "Hint: Please answer the question requiring a floating-point number with one decimal place and provide "
              "the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    "float2": "Hint: Please answer the question requiring a floating-point number with two decimal places and provide "
              "the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., "
            "[1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}
# The judge's extraction prompt follows the harness's structure (an instruction, worked examples of "Model response"
# -> "Extracted answer", then the row's query and the response); the wording of the examples is ours.
JUDGE_INSTRUCTION = ("Please read the following examples. Then extract the answer from the model response and type "
                     "it at the end of the prompt.")
JUDGE_EXAMPLES = (
    ("Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the "
     "end.\nQuestion: How many cubes are in the picture?", "There are 7 cubes in the front row and 7 behind, so 14.",
     "14"),
    ("Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final "
     "value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: What is the ratio of the two bars?",
     "The ratio is 3 to 5, which is 0.6.", "0.6"),
    ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
     "Question: Which angle is the largest?\nChoices:\n(A) 30\n(B) 60\n(C) 90", "The largest angle is (C) 90 degrees.",
     "C"),
    ("Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., [1, 2, "
     "3], [1.2, 1.3, 1.4], at the end.\nQuestion: Which years had a drop?", "Sales fell in 2007 and in 2008.",
     "[2007, 2008]"),
)


def answer_type(item: Item) -> str:
    """The hint key: multi_choice, integer, float1 / float2 (by precision), list or text."""
    if need(item, "question_type", "mathvista") == "multi_choice":
        return "multi_choice"
    kind = need(item, "answer_type", "mathvista")
    if kind == "float":
        return f"float{int(float(item.meta.get('precision') or 1))}"
    return kind


def query(item: Item) -> str:
    """The step-by-step query: question (+ unit), choices as ``(A) ..`` lines, hint."""
    question = f"Question: {need(item, 'question', 'mathvista')}"
    if item.meta.get("unit"):
        question += f" (Unit: {item.meta['unit']})"
    parts = [question]
    choices = item.meta.get("choices") or []
    if choices:
        parts.append("Choices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)))
    hint = HINTS.get(answer_type(item))
    if hint:
        parts.append(hint)
    return "\n".join(parts)


def prompt(item: Item) -> list[dict[str, Any]]:
    return user_prompt(item, query(item))


def fast_extract(item: Item, response: str) -> str | None:
    """The harness's extractions without a model: a response that is a choice, an integer or a float."""
    text = response.strip()
    if not text:
        return None
    if item.meta.get("question_type") == "multi_choice" and text in (item.meta.get("choices") or []):
        return text
    kind = item.meta.get("answer_type")
    try:
        if kind == "integer":
            return str(int(text))
        if kind == "float":
            return str(float(text))
    except ValueError:
        return None
    return None


def normalize(item: Item, extraction: str) -> str | None:
    """``normalize_extracted_answer``: a choice text for multiple choice, a truncated integer, a rounded float."""
    if item.meta.get("question_type") == "multi_choice":
        return nearest_choice(str(extraction).strip(), item.meta.get("choices") or [])
    kind = item.meta.get("answer_type")
    try:
        if kind == "integer":
            return str(int(float(extraction)))
        if kind == "float":
            return str(round(float(extraction), int(float(item.meta.get("precision") or 0))))
    except (ValueError, OverflowError):
        return None
    return str(extraction)


def nearest_choice(extraction: str, choices: list[str]) -> str | None:
    """``(X)`` anywhere or a bare capital letter -> that choice; otherwise the choice nearest in edit distance."""
    if not choices:
        return None
    marked = re.search(r"\(([a-zA-Z])\)", extraction)
    letter = marked.group(1).upper() if marked else extraction
    options = LETTERS[: len(choices)]
    if len(letter) == 1 and letter in options:
        return choices[options.index(letter)]
    distances = [levenshtein(extraction, c) for c in choices]
    return choices[distances.index(min(distances))]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def is_correct(item: Item, extraction: str | None) -> tuple[str | None, bool]:
    prediction = normalize(item, extraction) if extraction else None
    truth = need(item, "answer", "mathvista")
    return prediction, prediction is not None and str(prediction).strip() == str(truth).strip()


def grade(item: Item, response: str) -> dict[str, Any]:
    extraction, route = fast_extract(item, response), "exact"
    if extraction is None:
        extraction, route = lenient_answer(response)
    if extraction is None and item.meta.get("question_type") == "multi_choice" and response.strip():
        # nothing recognisable: the harness's normaliser still maps "(b) 8/11" to (B) and anything else to the
        # nearest choice, so the whole response goes to it
        extraction, route = response.strip(), "raw"
    prediction, correct = is_correct(item, extraction)
    return graded(correct, prediction, route if prediction is not None else "none")


def judge_prompt(item: Item, response: str) -> str:
    examples = "\n\n".join(f"{q}\n\nModel response: {r}\n\nExtracted answer: {a}" for q, r, a in JUDGE_EXAMPLES)
    return f"{JUDGE_INSTRUCTION}\n\n{examples}\n\n{query(item)}\n\nModel response: {response}\n\nExtracted answer: "


def judge_grade(item: Item, reply: str) -> tuple[str | None, bool]:
    return is_correct(item, reply.strip() or None)


RULES = Rules("mathvista", "lmms-eval 0.7.3 tasks/mathvista (mathvista_testmini_cot: mathvista_evals.py, utils.py)",
              prompt, grade, judge_prompt, judge_grade)
