"""ScienceQA (image questions) and MMMU validation, as lmms-eval 0.7.3 evaluates them (``tasks/scienceqa``:
``scienceqa_img``; ``tasks/mmmu``: ``mmmu_val``).

ScienceQA. Prompt: ``Context: {hint}\\n`` (when the row has a hint), the question, ``\\n``, the choices as ``A. ..``
lines and ``\\nAnswer with the option's letter from the given choices directly.``. Grade (LLaVA's rule): the stripped
response equals the letter (any case), or starts with a capital letter and a period (``B.``, ``B. whale``) and that
letter is the answer; nothing else counts (``(B)``, ``The answer is B``).

MMMU. Prompt: multiple choice ``{question}\\n{A. ..\\nB. ..}\\n\\nAnswer with the option's letter from the given choices
directly.``; open questions ``{question}\\n\\nAnswer the question using a single word or phrase.``; the ``<image k>``
tags stay in the text and the images come first. Grade, multiple choice (MMMU's ``parse_multi_choice_response``):
``(X)`` in the response, else ``X `` , else ``X.``, else (responses over 5 words) an option's text; several
candidates: the one mentioned last; none: a random option. The harness draws it from Python's global generator (seeded
once per run, so a pick depends on the call order); ours is seeded by the problem id and the response, so every pick
reproduces (``route`` "random"; the expected accuracy is the same). Open questions (``parse_open_response`` /
``eval_open``): key phrases after "is ", "so ", "thus ", ... (and "=" in the last line), the numbers in them rounded to
2 decimals; a numeric truth must equal one of them, a text truth must occur in one of them. Accuracy is over all
samples (micro average), as the harness reports ``mmmu_acc``.
"""

from __future__ import annotations

import random
import re
import string
from typing import Any

from calibrl_verl.protocols.base import Item, graded, need, user_prompt
from calibrl_verl.protocols.rules import Rules

LETTERS = string.ascii_uppercase  # option letters, in order
MC_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."
_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUMBER_RES = (re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"), re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),
               re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"))


def _choices_text(choices: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


# ---------------------------------------------------------------------------------------------------- ScienceQA


def scienceqa_prompt(item: Item) -> list[dict[str, Any]]:
    hint = item.meta.get("hint") or ""
    context = f"Context: {hint}\n" if hint else ""
    text = f"{context}{need(item, 'question', 'scienceqa')}\n{_choices_text(need(item, 'choices', 'scienceqa'))}"
    return user_prompt(item, f"{text}\n{MC_PROMPT}")


def scienceqa_grade(item: Item, response: str) -> dict[str, Any]:
    target = str(item.ground_truth).strip().lower()
    pred = response.strip() if isinstance(response, str) else ""
    if pred.lower() == target:
        return graded(True, pred.upper(), "letter")
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return graded(pred[0].lower() == target, pred[0], "letter")
    return graded(False, None, "none")


# --------------------------------------------------------------------------------------------------------- MMMU


def mmmu_prompt(item: Item) -> list[dict[str, Any]]:
    question = need(item, "question", "mmmu")
    choices = item.meta.get("choices") or []
    if item.meta.get("question_type", "multiple-choice") == "multiple-choice" and choices:
        return user_prompt(item, f"{question}\n{_choices_text(choices)}\n\n{MC_PROMPT}")
    return user_prompt(item, f"{question}\n\n{OPEN_PROMPT}")


def parse_multi_choice(response: str, choices: list[str], seed: str) -> tuple[str, str]:
    """``(letter, route)``: see the module docstring; route "random" when no option was found."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    text = f" {response} "
    options = list(LETTERS[: len(choices)])
    found = [c for c in options if f"({c})" in text]
    where = {c: text.rfind(f"({c})") for c in found}
    if not found:
        found = [c for c in options if f"{c} " in text] or [c for c in options if f"{c}." in text]
        where = {c: text.rfind(f" {c} ") for c in found}
    if not found and len(text.split()) > 5:
        found = [c for c, answer in zip(options, choices, strict=True) if answer.lower() in text.lower()]
        where = {c: text.lower().rfind(choices[options.index(c)].lower()) for c in found}
    if not found:
        return random.Random(seed).choice(options), "random"
    latest = max(where[c] for c in found)
    return next(c for c in found if where[c] == latest), "letter"


def parse_open(response: str) -> list[Any]:
    """Candidate answers of an open question: key phrases and the numbers in them, normalised."""
    lines = re.split(r"\n", response.strip().strip(".").lower())
    keys = []
    for index, line in enumerate(lines):
        indicators = _INDICATORS + (("=",) if index == len(lines) - 1 else ())
        tails = [line.split(ind)[-1].strip() for ind in indicators if ind in line]
        shortest = min(tails, key=len) if tails else None
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    keys = keys or [response.strip().strip(".").lower()]
    candidates = keys + [n for key in keys for regex in _NUMBER_RES for n in regex.findall(key)]
    out: list[Any] = []
    for candidate in candidates:
        for value in _normalize(candidate):
            if value not in out:
                out.append(value)
    return out


def _normalize(text: str) -> list[Any]:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def eval_open(truth: str, candidates: list[Any]) -> bool:
    answers = _normalize(str(truth))
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(a, str) and a in candidate for a in answers):
                return True
        elif candidate in answers:
            return True
    return False


def mmmu_grade(item: Item, response: str) -> dict[str, Any]:
    response = response if isinstance(response, str) else ""
    truth = str(need(item, "answer", "mmmu")).strip()
    choices = item.meta.get("choices") or []
    if item.meta.get("question_type", "multiple-choice") == "multiple-choice" and choices:
        seed = f"{(item.extra_info or {}).get('id', item.where)}:{response}"  # same answer, same pick
        letter, route = parse_multi_choice(response, choices, seed)
        return graded(letter == truth, letter, route)
    candidates = parse_open(response)
    return graded(eval_open(truth, candidates), str(candidates[0]) if candidates else None, "key_phrase")


SCIENCEQA = Rules("scienceqa", "lmms-eval 0.7.3 tasks/scienceqa (scienceqa_img.yaml, utils.py)", scienceqa_prompt,
                  scienceqa_grade)
MMMU = Rules("mmmu", "lmms-eval 0.7.3 tasks/mmmu (mmmu_val.yaml, utils.py) and tasks/_task_utils/mmmu_mcq_utils.py",
             mmmu_prompt, mmmu_grade)
