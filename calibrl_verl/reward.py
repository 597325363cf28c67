"""Verifiable reward for CalibRL (docs/algorithm.md §1.3).

    r = acc + 0.1 * fmt

Two rule sets decide ``fmt`` and which text ``acc`` grades. The default reproduces the authors' reward
(their reported numbers came from it); ``compute_score(..., strict_format=True)`` (in training:
``+reward.custom_reward_function.reward_kwargs.strict_format=true``) switches to ours. docs/differences.md
lists each difference and why.

* authors' rules (default):
  ``fmt`` is 1 iff the whole response, as decoded (no stripping), matches
  ``<think>.*</think>.*<answer>.*</answer>``: any text (tags included) between ``</think>`` and
  ``<answer>``, nothing before ``<think>`` or after the last ``</answer>``.
  ``acc`` grades the FIRST ``<answer>...</answer>`` block whose content is non-empty and contains no ``<``
  (the authors' pattern ``<answer>\\s*([^<]+?)\\s*</answer>``; a block such as ``<answer>x<3</answer>`` is
  skipped, as there).
* strict rules (``strict_format=True``):
  ``fmt`` is 1 iff the response (outer whitespace stripped) is exactly one ``<think>...</think>`` block,
  optional whitespace, and exactly one ``<answer>...</answer>`` block, with no nested/stray think/answer
  tags. ``acc`` needs exactly one complete ``<answer>`` block: none, an empty one or MORE THAN ONE gives
  ``acc = 0`` (listing several candidate answers is not rewarded).

Exact-match tasks (``EXACT_MATCH_SOURCES``: the coverage study's navigation task, ``calibrl_verl.tiny.wall_task``)
are graded by ``exact_match_score`` instead: ``score = acc`` = 1 iff the response, its words re-joined by single
spaces, equals the ground truth; ``fmt`` is 1 iff the response follows the task's ``S n A n ... S n`` grammar. The
task's published reward is the exact match alone, so ``fmt`` is reported but adds nothing to the score.

In both, text outside ``<answer>`` tags is never graded, and the grading itself is ours: multiple-choice
ground truths (an option letter ``A``-``K``, as in the authors' code, such as ``A``, ``(B)``, ``C.`` or
``D) 12``) are compared by option letter; everything else is normalised (LaTeX wrappers, ``\\text{}``, units,
degrees, percent, ``\\boxed{}``, ``$...$``, trailing period) and graded by exact match, a safe numeric
comparison, ``mathruler.grader.grade_answer`` and ``math_verify`` (fallback).

The data tools (``calibrl_verl.data``, ``calibrl_verl.experts``) use the strict helpers ``format_reward`` and
``extract_answer`` and ``strict_format=True``: expert data is checked against the stricter rules.

Safety: model output is never passed to ``eval``/``exec`` by this module. The symbolic graders (sympy behind
mathruler and math_verify) are only called on short answers without factorials, ``**`` or nested/huge
exponents, so a crafted answer cannot make the reward hang; math_verify is called with its signal-based
timeouts disabled so it works off the main thread (verl calls reward functions from worker threads). Any
exception while grading counts as a wrong answer; ``compute_score`` never raises on model output (a
non-bool ``strict_format`` is a configuration error and raises ``TypeError``).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

try:  # graders are optional at import time so a broken install degrades to the exact/numeric graders
    from mathruler.grader import extract_boxed_content, grade_answer
except ImportError:  # pragma: no cover - exercised only without mathruler installed
    extract_boxed_content = None
    grade_answer = None

try:
    import math_verify
except ImportError:  # pragma: no cover
    math_verify = None

FORMAT_WEIGHT = 0.1
# data sources graded by exact match of the whole response (no think/answer format)
EXACT_MATCH_SOURCES = frozenset({"calibrl_wall"})
_NAVIGATION_RE = re.compile(r"^S \d+(?: A \d+ S \d+)*$")
MAX_SYMBOLIC_LEN = 100
MAX_ANSWER_LEN = 1000
OPTION_LETTERS = "ABCDEFGHIJK"  # the authors' code treats A-K as option letters

_TAG = r"</?(?:think|answer)>"
_FORMAT_RE = re.compile(
    rf"^<think>((?:(?!{_TAG}).)*)</think>\s*<answer>((?:(?!{_TAG}).)*)</answer>$",
    re.DOTALL,
)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# the authors' rules, used with fullmatch / search exactly as their reward function does
_AUTHORS_FORMAT_RE = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
_AUTHORS_ANSWER_RE = re.compile(r"<answer>\s*([^<]+?)\s*</answer>")
_L = f"[{OPTION_LETTERS}]"
_OPTION_RE = re.compile(rf"^(?:\(({_L})\)|({_L})[.):：])\s*(.*)$|^({_L})$", re.DOTALL)
_OPTION_PREFIX_RE = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*", re.IGNORECASE)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°")
_UNIT_RE = re.compile(
    r"(?<=[\d})])\s*(?:square\s+|sq\.?\s+|cubic\s+)?"
    r"(?:units?|cm|mm|km|m|meters?|metres?|centimeters?|millimeters?|kilometers?|inch(?:es)?|in|ft|feet|foot"
    r"|yards?|yd|miles?|mi|degrees?|deg|kg|grams?|sec|seconds?|minutes?|min|hours?)\.?"
    r"\s*(?:\^\s*\{?\s*[23]\s*\}?|²|³)?\s*$",
    re.IGNORECASE,
)
_SPACING_TOKENS = {"\\left": "", "\\right": "", "\\,": "", "\\!": "", "\\;": "", "\\:": "", "\\ ": " ", "~": " "}
_ASSIGN_RE = re.compile(r"^[^=<>]{1,20}?=(?!=)\s*([^=]+)$")
_NUMBER_RE = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)$")
# 7.5e-5, 7.5\times10^{-5}, 3\cdot10^8 (spaces already removed); a 3-digit exponent bound keeps floats finite
_SCIENTIFIC_RE = re.compile(r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+))(?:[eE]|\\(?:times|cdot)10\^)\{?([-+]?\d{1,3})\}?$")
_FRAC_RE = re.compile(r"^([-+]?)\\frac\{([-+]?[\d.]+)\}\{([-+]?[\d.]+)\}$")
_SLASH_RE = re.compile(r"^([-+]?[\d.]+)\s*/\s*([-+]?[\d.]+)$")
_SYMBOLIC_CHARS_RE = re.compile(r"^[0-9A-Za-z\s+\-*/^().,{}\\\[\]|=<>√π:]*$")
_UNSAFE_SYMBOLIC_RE = re.compile(
    r"\*\*|!|factorial|binom|choose|gamma|\^\s*\{?\s*[-+]?\d{3,}|\^\s*\{[^}]*\^|\^\s*\d+\s*\^", re.IGNORECASE
)


def compute_score(
    data_source: Any,
    solution_str: Any,
    ground_truth: Any,
    extra_info: dict | None = None,
    strict_format: bool = False,
    **kwargs: Any,
) -> dict:
    """verl custom reward: ``{"score": acc + 0.1 * format, "acc": 0/1, "format": 0/1}``; never raises on model output.

    ``strict_format=False`` (default) applies the authors' format and answer-extraction rules, ``True`` ours
    (see the module docstring); verl passes it from ``reward.custom_reward_function.reward_kwargs``.
    """
    if not isinstance(strict_format, bool):
        raise TypeError(f"compute_score: reward_kwargs strict_format must be true or false, got {strict_format!r}")
    if not isinstance(solution_str, str):
        return _result(0.0, 0.0)
    if data_source in EXACT_MATCH_SOURCES:
        return exact_match_score(solution_str, ground_truth)
    try:
        fmt = format_reward(solution_str) if strict_format else authors_format_reward(solution_str)
        acc = accuracy_reward(solution_str, ground_truth, strict_format=strict_format)
    except Exception:  # defensive: a reward function must not crash training
        return _result(0.0, 0.0)
    return _result(acc, fmt)


def _result(acc: float, fmt: float) -> dict:
    return {"score": acc + FORMAT_WEIGHT * fmt, "acc": acc, "format": fmt}


def graded_text(data_source: Any, response: str, strict_format: bool = False) -> str | None:
    """The text ``compute_score`` grades: for ``EXACT_MATCH_SOURCES`` the whole response, its words re-joined by
    single spaces; otherwise the answer block (``first_answer``, or ``extract_answer`` when strict); None if none.
    Evaluation votes on it for maj@K."""
    if data_source in EXACT_MATCH_SOURCES:
        return _words(response)
    return extract_answer(response) if strict_format else first_answer(response)


def exact_match_score(response: str, ground_truth: Any) -> dict:
    """``{"score": acc, "acc": 1 iff " ".join(response.split()) == ground truth, "format": 1 iff the response is
    ``S n (A n S n)*``}``: the navigation task's reward (an exact match of the whole completion, nothing else)."""
    words = _words(response)
    acc = float(isinstance(ground_truth, str) and words == _words(ground_truth))
    return {"score": acc, "acc": acc, "format": float(bool(_NAVIGATION_RE.match(words)))}


def _words(text: str) -> str:
    return " ".join(text.split())


def format_reward(response: str) -> float:
    """Strict format: 1.0 iff the stripped response is exactly ``<think>..</think>`` + optional whitespace +
    ``<answer>..</answer>`` with no stray think/answer tags."""
    return 1.0 if _FORMAT_RE.match(response.strip()) else 0.0


def authors_format_reward(response: str) -> float:
    """The authors' format: 1.0 iff the unstripped response fully matches
    ``<think>.*?</think>.*?<answer>.*?</answer>`` (any text between and inside the blocks)."""
    return 1.0 if _AUTHORS_FORMAT_RE.fullmatch(response) else 0.0


def extract_answer(response: str) -> str | None:
    """Strict: content of the single complete ``<answer>`` block; None if there is none or more than one."""
    blocks = _ANSWER_RE.findall(response)
    if len(blocks) != 1:
        return None
    return blocks[0]


def first_answer(response: str) -> str | None:
    """The authors' extraction: the first ``<answer>`` block with non-empty content free of ``<``; else None."""
    match = _AUTHORS_ANSWER_RE.search(response)
    return match.group(1) if match else None


def accuracy_reward(response: str, ground_truth: Any, strict_format: bool = False) -> float:
    """1.0 iff the graded answer block (``first_answer``, or ``extract_answer`` when strict) matches the truth."""
    answer = graded_text(None, response, strict_format)  # the one extraction rule, shared with evaluation
    if answer is None or ground_truth is None:
        return 0.0
    truths = ground_truth if isinstance(ground_truth, list | tuple) else [ground_truth]
    return 1.0 if any(answers_match(answer, str(truth)) for truth in truths) else 0.0


def answers_match(answer: str, ground_truth: str) -> bool:
    """Grade an extracted answer against a ground truth string (option letter or math expression)."""
    answer = answer.strip()
    if len(answer) > MAX_ANSWER_LEN:
        return False
    gold = normalize_answer(ground_truth)
    pred = normalize_answer(answer)
    if not gold or not pred:
        return False
    gold_letter = option_letter(gold)
    if gold_letter is not None:
        return option_letter(pred) == gold_letter
    if "=" not in gold:
        pred = _strip_assignment(pred)
    if to_number(gold) is not None and to_number(pred) is not None:
        # two plain numbers: the numeric comparison decides (mathruler rounds |x| < 1e-7 to the integer 0, so it
        # would grade 1e-12 equal to 2e-12)
        return _exact_equal(pred, gold) or _numeric_equal(pred, gold)
    return _exact_equal(pred, gold) or _numeric_equal(pred, gold) or _symbolic_equal(pred, gold)


def option_letter(text: str) -> str | None:
    """Option letter of ``A``, ``(A)``, ``A.``, ``A) 12``, ``(A) 12``, ``Answer: A``; None otherwise.

    A bare letter followed by words (``A rectangle``) is not an option, nor is ``(A) (B)`` (several options).
    """
    text = text.strip()
    if len(text) > 1:
        text = _OPTION_PREFIX_RE.sub("", text, count=1).strip()
    match = _OPTION_RE.match(text)
    if match is None:
        return None
    letter = match.group(1) or match.group(2) or match.group(4)
    rest = (match.group(3) or "").strip()
    if rest and _OPTION_RE.match(rest.split(" ")[0].rstrip(",;")):
        return None
    return letter


def normalize_answer(text: str) -> str:
    """Strip LaTeX/markdown wrappers, text commands, degrees, percent and trailing units from an answer."""
    text = _unwrap_math(text.strip())
    if "\\boxed" in text and extract_boxed_content is not None:
        boxed = extract_boxed_content(text)
        if boxed != "None":
            text = _unwrap_math(boxed)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _remove_text_commands(text)
    for token, replacement in _SPACING_TOKENS.items():
        text = text.replace(token, replacement)
    text = _DEGREE_RE.sub("", text)
    text = text.replace("\\%", "%").strip().rstrip("%")
    text = text.replace("\\$", "")  # currency: MATH writes \$18.90
    text = _UNIT_RE.sub("", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(".").strip()


def _unwrap_math(text: str) -> str:
    """Remove surrounding ``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``."""
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left) : len(text) - len(right)].strip()
    return text.strip().rstrip(".").strip()


def _remove_text_commands(text: str) -> str:
    for _ in range(5):  # bounded: nested \text{\mathrm{..}} unwraps one level per pass
        new = _TEXT_CMD_RE.sub(r"\1", text)
        if new == text:
            break
        text = new
    return text


def _strip_assignment(text: str) -> str:
    """``x = 5`` -> ``5`` and ``\\angle ABC = 30`` -> ``30`` (only when the ground truth has no ``=``)."""
    match = _ASSIGN_RE.match(text)
    return match.group(1).strip() if match else text


def _canonical(text: str) -> str:
    return re.sub(r"\s+", "", text).replace("{", "").replace("}", "").lower()


def _exact_equal(pred: str, gold: str) -> bool:
    return _canonical(pred) == _canonical(gold)


def to_number(text: str) -> float | None:
    """Parse ``12``, ``-0.5``, ``1,000``, ``7.5e-5``, ``7.5\\times10^{-5}``, ``1/2``, ``\\frac{1}{2}``,
    ``-\\frac{3}{4}`` without eval; else None."""
    text = text.replace(" ", "")
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    try:
        if _NUMBER_RE.match(text):
            return float(text)
        scientific = _SCIENTIFIC_RE.match(text)
        if scientific is not None:
            return float(scientific.group(1)) * 10.0 ** int(scientific.group(2))
        frac = _FRAC_RE.match(text) or _SLASH_RE.match(text)
        if frac is None:
            return None
        groups = frac.groups()
        sign = -1.0 if len(groups) == 3 and groups[0] == "-" else 1.0
        num, den = (Fraction(groups[-2]), Fraction(groups[-1]))
        return None if den == 0 else sign * float(num / den)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _numeric_equal(pred: str, gold: str) -> bool:
    gold_value, pred_value = to_number(gold), to_number(pred)
    if gold_value is None or pred_value is None:
        return False
    # the absolute tolerance only for a zero ground truth: else 1.6e-19 would equal 3.2e-19
    return math.isclose(gold_value, pred_value, rel_tol=1e-6, abs_tol=1e-9 if gold_value == 0 else 0.0)


def _safe_for_symbolic(text: str) -> bool:
    """Heuristic guard against inputs that make sympy hang (huge powers, factorials, towers)."""
    if len(text) > MAX_SYMBOLIC_LEN or text.count("^") > 2 or not _SYMBOLIC_CHARS_RE.match(text):
        return False
    return _UNSAFE_SYMBOLIC_RE.search(text) is None


def _symbolic_equal(pred: str, gold: str) -> bool:
    if not (_safe_for_symbolic(pred) and _safe_for_symbolic(gold)):
        return False
    return _mathruler_equal(pred, gold) or _math_verify_equal(pred, gold)


def guarded_grade_answer(pred: str, gold: str) -> bool:
    """``mathruler.grader.grade_answer`` (EasyR1's grader) where both answers are safe for sympy (see
    ``_safe_for_symbolic``); otherwise only an exact string match counts."""
    if not (_safe_for_symbolic(pred) and _safe_for_symbolic(gold)):
        return pred.strip() == gold.strip()
    return _mathruler_equal(pred, gold)


def _mathruler_equal(pred: str, gold: str) -> bool:
    if grade_answer is None:
        return False
    try:
        return bool(grade_answer(pred, gold))
    except Exception:
        return False


def _math_verify_equal(pred: str, gold: str) -> bool:
    """math_verify fallback; its signal-based timeouts are disabled (they fail off the main thread)."""
    if math_verify is None:
        return False
    try:
        latex_only = [math_verify.LatexExtractionConfig()]  # no sympy parse_expr (eval-based) extraction
        gold_parsed = math_verify.parse(f"${gold}$", extraction_config=latex_only, parsing_timeout=None)
        pred_parsed = math_verify.parse(f"${pred}$", extraction_config=latex_only, parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:
        return False
