"""WeMath testmini, as lmms-eval 0.7.3 evaluates it (``tasks/wemath``: ``wemath_testmini_reasoning``), with the
official four-dimensional metrics (We-Math/We-Math ``evaluation/four_dimensional_metrics.py``).

Prompt: the harness's system prompt (reasoning in ``<think>``, the answer in ``<answer>``), then the question, a
newline and the row's ``option`` string.

Grade (rule path of ``reasoning_utils.compute_score``): the first ``<answer>`` block, else the last ``\\boxed{}``,
else the last line that ends in a number, less one trailing period; the option letter found in it (ours:
``reward.option_letter``, then ``lenient_answer``'s routes, where the harness ranks letter candidates heuristically)
must equal the ground-truth letter.

Four dimensions: every multi-step problem (``ID`` "2steps_N" / "3steps_N") has one-step sub-problems (``key``
"Nsteps_1".."Nsteps_N") and the composite one ("Nsteps_multi"). With S the sub-problems' results and M the composite's,
per problem: IK (insufficient knowledge) = some S wrong and M wrong; IG (inadequate generalisation) = all S right and M
wrong; CM strict = all S right and M right, CM loose = some S right and M right; RM (rote memorisation) strict = some
S wrong and M right, RM loose = all S wrong and M right. Rates over the N problems (IK, IG, CM), RM as RM / (CM + RM);
score strict = (N - IG / 2 - RM strict - IK) / N, score loose the same with RM loose. The official script fixes
N = 525 (the full testmini); we count the complete problems present (525 on the full set). With K samples per problem
each figure is the mean over the K sample indices (sample k of every row forms one run).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from calibrl_verl.protocols.base import Item, graded, need, tags_of, user_prompt
from calibrl_verl.protocols.extract import lenient_answer
from calibrl_verl.protocols.rules import Rules
from calibrl_verl.reward import option_letter

try:
    from mathruler.grader import extract_boxed_content
except ImportError:  # pragma: no cover
    extract_boxed_content = None

SYSTEM = ("You are a helpful assistant. When the user asks a question, your response must include two parts: first, "
          "the reasoning process enclosed in <think>...</think> tags, then the final answer enclosed in "
          "<answer>...</answer> tags.Please provide a clear, concise response within <answer> </answer> tags that "
          "directly addresses the question.")  # "tags.Please": the harness's string has no space there
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER_LINE_RE = re.compile(r"\d\s*\.?\s*$")


def prompt(item: Item) -> list[dict[str, Any]]:
    text = f"{need(item, 'question', 'wemath')}\n{item.meta.get('option') or ''}".strip()
    return user_prompt(item, text, system=SYSTEM)


def extract(response: str) -> str | None:
    match = _ANSWER_RE.search(response)
    if match:
        text = match.group(1)
    elif "\\boxed" in response and extract_boxed_content is not None:
        text = extract_boxed_content(response)  # the last box
    else:
        lines = [line for line in response.splitlines() if _NUMBER_LINE_RE.search(line)]
        text = lines[-1] if lines else ""
    text = text.strip()
    return (text[:-1] if text.endswith(".") else text).strip() or None


def grade(item: Item, response: str) -> dict[str, Any]:
    truth = str(need(item, "answer", "wemath")).strip().upper()
    answer = extract(response) if isinstance(response, str) else None
    letter = option_letter(answer) if answer else None
    if letter is None and answer:
        found, _ = lenient_answer(answer)
        letter = option_letter(found) if found else None
    return graded(letter == truth, letter, "rules" if letter else "none")


def tags(item: Item) -> dict[str, Any]:
    return {"ID": need(item, "ID", "wemath"), "key": need(item, "key", "wemath")}


def four_dimensions(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The official four-dimensional metrics and scores (module docstring), % , mean over sample indices."""
    runs = sorted({int(s["sample"]) for s in samples})
    per_run = [_one_run([s for s in samples if int(s["sample"]) == k]) for k in runs]
    per_run = [r for r in per_run if r]
    if not per_run:
        return {}
    return {"wemath": {name: sum(r[name] for r in per_run) / len(per_run) for name in per_run[0]}}


def _one_run(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    problems: dict[str, dict[str, bool]] = defaultdict(dict)
    for s in samples:
        tag = tags_of(s)
        problems[str(tag["ID"])][str(tag["key"])] = bool(s["correct"])
    counts = defaultdict(int)
    for pid, keys in problems.items():
        steps = int(pid.split("steps")[0]) if pid[:1].isdigit() else 0
        wanted = [f"{steps}steps_{i}" for i in range(1, steps + 1)]
        multi = f"{steps}steps_multi"
        if not steps or multi not in keys or any(k not in keys for k in wanted):
            continue  # an incomplete problem (e.g. under --limit) is left out of the counts
        sub, m = [keys[k] for k in wanted], keys[multi]
        counts["n"] += 1
        counts["IK"] += (not all(sub)) and not m
        counts["IG"] += all(sub) and not m
        counts["CM_strict"] += all(sub) and m
        counts["CM_loose"] += any(sub) and m
        counts["RM_strict"] += (not all(sub)) and m
        counts["RM_loose"] += (not any(sub)) and m
    n = counts["n"]
    if not n:
        return {}
    rate = {k: 100.0 * counts[k] / n for k in ("IK", "IG", "CM_strict", "CM_loose")}
    for kind in ("strict", "loose"):
        held = counts[f"CM_{kind}"] + counts[f"RM_{kind}"]
        rate[f"RM_{kind}"] = 100.0 * counts[f"RM_{kind}"] / held if held else 0.0
        rate[f"score_{kind}"] = 100.0 * (n - 0.5 * counts["IG"] - counts[f"RM_{kind}"] - counts["IK"]) / n
    return {"n_problems": float(n), **rate}


RULES = Rules("wemath", "lmms-eval 0.7.3 tasks/wemath (reasoning/wemath_testmini_thinking.yaml, reasoning_utils.py, "
              "wemath_utils.py); We-Math/We-Math evaluation/four_dimensional_metrics.py", prompt, grade,
              tags=tags, extras=four_dimensions)
