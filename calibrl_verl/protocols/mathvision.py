"""MathVision testmini, as lmms-eval 0.7.3 evaluates it (``tasks/mathvision``: ``mathvision_testmini``); rule-based.

Prompt: ``Please solve the problem step by step and put your answer in one "\\boxed{}".`` directly followed by the
question; multiple choice adds ``\\nChoices: A. ..\\nB. ..`` and ``\\nAnswer the question with the option's letter
from the given choices directly.``

Grade (``mathvision_process_results`` / ``eval_utils``), on the stripped response:

1. a response ending in `` B.`` / `` (B).`` or starting with ``B\\n`` / ``(B)\\n`` is the letter B;
2. text after the last "is " that is a number is the answer;
3. without ``\\boxed``, the text after the last "the (final / correct) answer is" / "the answer should be" (either
   capitalisation), up to its line's first sentence; with several ``\\boxed``, the last one;
4. ``find_math_answer``: lower-cased, the last ``\\boxed{}`` content (greedy), the right side of the last ``=`` and
   ``\\approx``, spaces, ``\\text``, ``\\left``/``\\right``, degree marks and a few units removed, then the MATH
   normaliser (mathruler's copy of Hendrycks' ``_strip_string``); option letters in ``(a)`` or ``{a}`` unwrapped;
5. correct iff it equals the ground truth or, for multiple choice, the ground-truth option's text (``is_equal``:
   case-insensitive string equality, equal tuples, or equal values rounded to 2 decimals). As in the 0.7.3 wheel, a
   value is computed for plain arithmetic only (``\\frac{1}{2}`` = 0.5, but ``2\\sqrt{2}`` is not 2.83: the wheel's
   evaluator has no ``sqrt`` or ``pi``).
"""

from __future__ import annotations

import re
from typing import Any

from calibrl_verl.protocols.base import Item, graded, need, question_text, user_prompt
from calibrl_verl.protocols.rules import Rules
from calibrl_verl.reward import MAX_SYMBOLIC_LEN

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTRUCTION = 'Please solve the problem step by step and put your answer in one "\\boxed{}".'
MC_PROMPT = "Answer the question with the option's letter from the given choices directly."
ANSWER_FLAGS = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")
_ARITHMETIC_RE = re.compile(r"^[0-9.+\-*/() ]+$")
_UNITS = ("^{\\circ}", "^\\circ", "{m}^3", "m^3", "{units}", "units", "{km}", "km")


def prompt(item: Item) -> list[dict[str, Any]]:
    options = item.meta.get("choices") or []
    text = INSTRUCTION + question_text(item)
    if options:
        text += "\nChoices: " + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)) + "\n" + MC_PROMPT
    return user_prompt(item, text)


def extract(response: str) -> str:
    """Steps 1-4 of the module docstring."""
    m = response.strip()
    for c in "ABCDE":
        if (m.endswith((f" {c}.", f" ({c}).")) or m.startswith((f"{c}\n", f"({c})\n", f"({c}) {c}\n"))):
            m = c
    tail = m.split("is ")[-1].rstrip(".")
    if _is_number(tail):
        m = tail
    if "oxed{" not in m:
        for flag in (f for lower in ANSWER_FLAGS for f in (lower, lower.replace("the", "The"))):
            m = m.split(flag)[-1].strip().split("\n")[0].split(". ")[0] if flag in m else m.strip()
    elif m.count("oxed{") > 1:
        m = "\\boxed{" + m.split("oxed{")[-1]
    m = find_math_answer(m)
    for c in "abcde":
        m = m.replace(f"({c})", c).replace(f"{{{c}}}", c)
    return m.rstrip(".").lstrip(":").strip()


def find_math_answer(text: str) -> str:
    from mathruler.math_normalize import _strip_string  # the MATH normaliser; private in mathruler, stable for years

    s = text.lower().replace("{}", "")
    boxed = re.findall(r"oxed{(.*)}", s, flags=re.S)
    ans = boxed[-1] if boxed else s
    if "}" in ans and ("{" not in ans or ans.find("}") < ans.find("{")):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    for old, new in ((" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"), ("\n", ""),
                     ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""), ("\\right", "")):
        ans = ans.replace(old, new)
    for unit in _UNITS:
        ans = ans.replace(unit, "")
    try:
        return _strip_string(ans)
    except Exception:  # the normaliser asserts on some malformed fractions; keep the text as it is
        return ans


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def is_equal(a: str, b: str) -> bool:
    """Case-insensitive equality, equal tuples, or equal plain-arithmetic values rounded to 2 decimals."""
    a, b = a.lower(), b.lower()
    if not a.replace(" ", "") or not b.replace(" ", ""):
        return False
    if a.strip() == b.strip():
        return True
    ta, tb = _tuple(a), _tuple(b)
    if ta is not None and tb is not None:
        return ta == tb
    va, vb = value(a), value(b)
    return va is not None and vb is not None and round(va, 2) == round(vb, 2)


def _tuple(text: str) -> tuple | None:
    text = text.strip()
    if len(text) < 2 or text[0] + text[-1] not in ("()", "[]") or "," not in text:
        return None
    parts = text[1:-1].split(",")
    values = [value(p) for p in parts]
    return tuple(round(v, 2) if v is not None else p.strip() for v, p in zip(values, parts, strict=True))


def value(text: str) -> float | None:
    """The value of a LaTeX expression of plain arithmetic (numbers, + - * / and integer powers), else None."""
    if len(text) > MAX_SYMBOLIC_LEN or "^" in text and re.search(r"\^\s*\{?\s*-?\d{3,}", text):
        return None
    try:
        from latex2sympy2_extended import latex2sympy

        expr = latex2sympy(text)
        if not _ARITHMETIC_RE.match(str(expr).replace("**", "^").replace("^", "*")):
            return None
        return float(expr.evalf())
    except Exception:
        return None


def grade(item: Item, response: str) -> dict[str, Any]:
    truth = str(need(item, "answer", "mathvision"))
    options = item.meta.get("choices") or []
    index = LETTERS.find(truth) if len(truth) == 1 else -1
    truth_value = options[index] if options and 0 <= index < len(options) else ""
    answer = extract(response) if isinstance(response, str) else ""
    return graded(is_equal(truth, answer) or is_equal(truth_value, answer), answer or None,
                  "boxed" if "oxed{" in str(response) else ("rules" if answer else "none"))


RULES = Rules("mathvision", "lmms-eval 0.7.3 tasks/mathvision (mathvision_testmini.yaml, utils.py, eval_utils.py)",
              prompt, grade)
