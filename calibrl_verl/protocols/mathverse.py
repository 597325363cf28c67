"""MathVerse testmini (all versions, or one such as Vision Only), as lmms-eval 0.7.3 evaluates it (``tasks/mathverse``).

Prompt: the row's ``query_wo`` verbatim (the benchmark's own query without chain-of-thought instruction; it already
holds the question, the options and the answer-format request), images first.

Grade: the harness has no rule-based path: a GPT judge reads the question (``question_for_eval``), the ground truth
and the full response and answers 1 or 0 (a reply containing "1" counts as correct). ``--judge-*`` runs that judge
(the prompt's wording is ours, its content the harness's: strict, final answer only, option letter or its content
accepted, numbers within reasonable precision, units must match). Without a judge our rule-based grade stands in:
``lenient_answer`` then, for multiple choice, the option letter, otherwise our reward's answer comparison
(``calibrl_verl.reward.answers_match``). ``summary.json`` adds the accuracy per ``problem_version``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from calibrl_verl.eval_metrics import benchmark_summary
from calibrl_verl.protocols.base import Item, graded, need, tags_of, user_prompt
from calibrl_verl.protocols.extract import lenient_answer
from calibrl_verl.protocols.rules import Rules
from calibrl_verl.reward import answers_match

JUDGE_PROMPT = """You are a strict evaluator of answer correctness. Output 1 if the model's final answer is fully \
correct and 0 in every other case.

# Question
```
{question}
```

# Ground truth answer
```
{answer}
```

# Model prediction
```
{prediction}
```

# Rules
- Find the final answer in the prediction, even inside its reasoning.
- Multiple choice: the option letter or the option's content both count.
- Open answers: equivalent meaning counts; a partly correct answer is 0.
- Ignore formatting; numbers must agree to reasonable precision; units must match.

# Output
1 or 0"""


def prompt(item: Item) -> list[dict[str, Any]]:
    return user_prompt(item, str(need(item, "query_wo", "mathverse")).strip())


def grade(item: Item, response: str) -> dict[str, Any]:
    answer, route = lenient_answer(response)
    truth = str(need(item, "answer", "mathverse"))
    return graded(answer is not None and answers_match(answer, truth), answer, route)


def judge_prompt(item: Item, response: str) -> str:
    question = item.meta.get("question_for_eval") or need(item, "question", "mathverse")
    return JUDGE_PROMPT.format(question=question, answer=need(item, "answer", "mathverse"),
                               prediction=response.strip())


def judge_grade(item: Item, reply: str) -> tuple[str | None, bool]:
    return reply.strip() or None, "1" in reply


def tags(item: Item) -> dict[str, Any]:
    return {"problem_version": item.meta.get("problem_version")}


def by_version(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (mean@K) per problem version, from the samples' tags."""
    version = {id(s): str(tags_of(s).get("problem_version")) for s in samples}
    names = sorted(set(version.values()) - {"None"})
    return {"accuracy_by_version": {v: benchmark_summary([s for s in samples if version[id(s)] == v])["accuracy"]
                                    for v in names}} if names else {}


RULES = Rules("mathverse", "lmms-eval 0.7.3 tasks/mathverse (mathverse_testmini*.yaml, utils.py, mathverse_evals.py)",
              prompt, grade, judge_prompt, judge_grade, tags, by_version)
