"""The ``community`` protocol: per benchmark (by ``data_source``), the public harness's prompt and rule-based scoring.

| data_source | rules follow |
| --- | --- |
| mathvista | lmms-eval 0.7.3 ``mathvista_testmini_cot`` (judge: answer extraction) |
| mathverse | lmms-eval 0.7.3 ``mathverse_testmini*`` (judge: 1/0 correctness; rule-based grade is ours) |
| mathvision | lmms-eval 0.7.3 ``mathvision_testmini`` |
| wemath | lmms-eval 0.7.3 ``wemath_testmini_reasoning`` + the official four-dimensional metrics |
| scienceqa | lmms-eval 0.7.3 ``scienceqa_img`` |
| mmmu | lmms-eval 0.7.3 ``mmmu_val`` |
| geometry3k | lmms-eval 0.7.3 ``geometry3k`` |
| geoqa | R1-V's GeoQA evaluation |
| anything else | ``generic`` (ours): see ``generic_prompt`` and ``generic_grade`` |

Each rule set's module states its prompt and grade; docs/evaluation.md lists what differs from the harness.
"""

from __future__ import annotations

from typing import Any

from calibrl_verl.protocols import geometry, mathverse, mathvision, mathvista, multiple_choice, wemath
from calibrl_verl.protocols.base import Item, Protocol, ProtocolError, graded, question_text, user_prompt
from calibrl_verl.protocols.extract import lenient_answer
from calibrl_verl.protocols.rules import Rules
from calibrl_verl.reward import answers_match

STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."
MC_PROMPT = "Answer with the option's letter from the given choices directly."


def generic_prompt(item: Item) -> list[dict[str, Any]]:
    """The question; choices as ``A. ..`` lines and the multiple-choice instruction, or else Qwen2.5-Math's
    step-by-step instruction (the common prompt of text math benchmarks)."""
    choices = item.meta.get("choices") or []
    question = question_text(item).replace("<image>", "").strip()
    if choices:
        lines = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
        return user_prompt(item, f"{question}\n{lines}\n{MC_PROMPT}")
    return user_prompt(item, f"{question}\n{STEP_BY_STEP}")


def generic_grade(item: Item, response: str) -> dict[str, Any]:
    """``lenient_answer``, then our reward's answer comparison against each ground truth."""
    answer, route = lenient_answer(response)
    truths = item.ground_truth if isinstance(item.ground_truth, list | tuple) else [item.ground_truth]
    return graded(answer is not None and any(answers_match(answer, str(t)) for t in truths), answer, route)


GENERIC = Rules("generic", "ours: lenient extraction + calibrl_verl.reward.answers_match", generic_prompt,
                generic_grade)
RULES: dict[str, Rules] = {r.name: r for r in (
    mathvista.RULES, mathverse.RULES, mathvision.RULES, wemath.RULES, multiple_choice.SCIENCEQA, multiple_choice.MMMU,
    geometry.GEOMETRY3K, geometry.GEOQA)}


def rules_for(data_source: str) -> Rules:
    return RULES.get(data_source, GENERIC)


class CommunityProtocol(Protocol):
    name = "community"

    def rules(self, data_source: str) -> str:
        return rules_for(data_source).name

    def prompt(self, item: Item) -> list[dict[str, Any]]:
        return rules_for(item.data_source).prompt(item)

    def grade(self, item: Item, response: str) -> dict[str, Any]:
        rules = rules_for(item.data_source)
        try:
            result = rules.grade(item, response if isinstance(response, str) else "")
        except ProtocolError:  # the row lacks a field the rules need: the user must re-prepare the file
            raise
        except Exception:  # model output never crashes an evaluation: an answer the rules choke on is wrong
            return graded(False, None, "none")
        tags = rules.tags(item) if rules.tags else None
        return {**result, "tags": tags}

    def extras(self, rules: str, samples: Any) -> dict[str, Any]:
        found = RULES.get(rules)
        return found.extras(samples) if found is not None and found.extras else {}
