"""Lenient answer extraction: the answer a model gave, whatever format it was trained to answer in.

The community protocol grades stock checkpoints as well as ours, so it cannot require CalibRL's ``<answer>`` block.
``lenient_answer`` tries, in order, and returns the first that gives a non-empty answer with the route it took:

1. ``answer_tag``: the last ``<answer>...</answer>`` block (an R1-style model, ours included);
2. ``boxed``: the content of the last ``\\boxed{...}`` (math-tuned models);
3. ``answer_is``: the text after the last "answer is" / "answer:" (with "final" / "correct" in front allowed), up to
   the end of its line, without a trailing period or markdown bold;
4. ``letter``: the whole response when it is one option letter: ``B``, ``(B)``, ``B.``, ``B) 12``, ``Option B``;
5. ``none``: nothing found (graded wrong; counted in ``summary.json``'s ``extraction`` shares).
"""

from __future__ import annotations

import re

from calibrl_verl.reward import option_letter

try:
    from mathruler.grader import extract_boxed_content
except ImportError:  # pragma: no cover - mathruler is a dependency; the tag/phrase routes still work without it
    extract_boxed_content = None

ROUTES = ("answer_tag", "boxed", "answer_is", "letter", "none")  # rule sets add "exact" and "raw"
MAX_LETTER_RESPONSE = 40  # a "lone letter" response is short: "B", "(B) 12", "The answer is (B)."

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_IS_RE = re.compile(
    r"(?:final|correct)?\s*answer\s*(?:is|:|：)\s*(?:\*\*)?\s*([^\n]+)", re.IGNORECASE
)
_TRAILING_RE = re.compile(r"(?:\*\*|[.。]|\s)+$")


def lenient_answer(response: str) -> tuple[str | None, str]:
    """``(answer, route)``: see the module docstring for the order of the routes; ``(None, "none")`` if none."""
    if not isinstance(response, str):
        return None, "none"
    for route, extract in ((r, _EXTRACTORS[r]) for r in ROUTES[:-1]):
        answer = extract(response)
        if answer:
            return answer, route
    return None, "none"


def _answer_tag(response: str) -> str | None:
    blocks = [b.strip() for b in _ANSWER_TAG_RE.findall(response)]
    blocks = [b for b in blocks if b]
    return blocks[-1] if blocks else None


def _boxed(response: str) -> str | None:
    if "\\boxed" not in response or extract_boxed_content is None:
        return None
    content = extract_boxed_content(response)  # mathruler's: the last box, braces matched
    return content.strip() if content and content != "None" else None


def _answer_is(response: str) -> str | None:
    matches = _ANSWER_IS_RE.findall(response)
    if not matches:
        return None
    text = _TRAILING_RE.sub("", matches[-1].strip()).strip().strip("$").strip()
    return text or None


def _letter(response: str) -> str | None:
    text = response.strip()
    if len(text) > MAX_LETTER_RESPONSE:
        return None
    text = re.sub(r"^(?:option|choice)\s+", "", _TRAILING_RE.sub("", text), flags=re.IGNORECASE)
    return option_letter(text)


_EXTRACTORS = {"answer_tag": _answer_tag, "boxed": _boxed, "answer_is": _answer_is, "letter": _letter}
