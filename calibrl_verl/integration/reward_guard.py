"""Reward guard: a reward function that raises or returns NaN for one sample costs that sample, not the run.

verl 0.9.1's reward loop calls ``reward.custom_reward_function`` once per sample. An exception there ends the
reward worker and the run (hours into a GPU job), and a NaN score flows into the group's advantages and from
there into every gradient of the step. With ``calibrl.reward_guard=true`` (the default) ``main_calibrl``
points verl at ``guarded_score`` (or ``guarded_score_async`` when the user's function is a coroutine) and
passes the user's function along as two ``reward_kwargs`` (``calibrl_inner_path`` / ``calibrl_inner_name``),
so the user's function, its other kwargs and verl's reward manager are all unchanged. The guard:

* returns the user's result unchanged (a number becomes ``{"score": x}``) plus ``reward_fault: 0.0``;
* on an exception, a non-numeric or non-finite score, or a dict without ``score``, returns
  ``{"score": 0.0, "acc": 0.0, "reward_fault": 1.0}``: the sample counts as wrong, the run goes on;
* logs the first fault of each reward worker with its input (data source, ground truth, the start of the
  response) and the traceback; later faults are counted, not logged.

The trainer sums ``reward_fault`` per step into the metric ``calibrl/reward_faults`` (verl's validation logs
``val-aux/<data_source>/reward_fault/mean@1`` on its own), so no fault is silent.
"""

from __future__ import annotations

import functools
import logging
import math
import traceback
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

GUARD_PATH = "pkg://calibrl_verl.integration.reward_guard"
INNER_PATH_KEY = "calibrl_inner_path"
INNER_NAME_KEY = "calibrl_inner_name"
FAULT_KEY = "reward_fault"
FAULT_RESULT = {"score": 0.0, "acc": 0.0, FAULT_KEY: 1.0}
_state = {"faults": 0}


@functools.cache
def load_inner(path: str, name: str) -> Callable[..., Any]:
    """The user's reward function, loaded the way verl loads it (file path or ``pkg://module``)."""
    from verl.utils.import_utils import load_extern_object

    return load_extern_object(module_path=path, object_name=name)


def checked_result(result: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the result as verl should store it, None) for a usable result, else (None, why it is not)."""
    if isinstance(result, dict):
        if "score" not in result:
            return None, f"a dict without 'score' (keys: {sorted(result)})"
        out, score = dict(result), result["score"]
    else:
        out, score = {}, result
    if isinstance(score, bool) or not isinstance(score, int | float):
        try:
            score = float(score)  # numpy / torch scalars
        except (TypeError, ValueError):
            return None, f"a non-numeric score {score!r}"
    if not math.isfinite(float(score)):
        return None, f"a non-finite score {score!r}"
    out["score"] = float(score)
    out[FAULT_KEY] = 0.0
    return out, None


def fault(why: str, kwargs: dict[str, Any], error: BaseException | None = None) -> dict[str, Any]:
    """Count one fault, log the first one of this worker with its input, and return the fallback result."""
    _state["faults"] += 1
    if _state["faults"] == 1:
        response = kwargs.get("solution_str")
        logger.warning(
            "calibrl reward guard: the reward function %s for data_source=%r ground_truth=%r response=%r; this "
            "sample scores 0 (wrong) and is counted in calibrl/reward_faults. Later faults in this reward worker "
            "are counted, not logged.%s",
            why, kwargs.get("data_source"), kwargs.get("ground_truth"),
            response[:300] if isinstance(response, str) else response,
            "\n" + "".join(traceback.format_exception(error)) if error is not None else "",
        )
    return dict(FAULT_RESULT)


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
    path, name = kwargs.pop(INNER_PATH_KEY, None), kwargs.pop(INNER_NAME_KEY, None)
    if not path or not name:
        raise ValueError(f"guarded_score needs reward_kwargs {INNER_PATH_KEY} and {INNER_NAME_KEY} (main_calibrl "
                         "sets them from reward.custom_reward_function)")
    return load_inner(path, name), kwargs


def _outcome(kwargs: dict[str, Any], result: Any = None, error: Exception | None = None) -> dict[str, Any]:
    """What verl stores for one call of the user's function: its checked result or the counted fallback."""
    if error is not None:
        return fault(f"raised {type(error).__name__}: {error}", kwargs, error)
    out, why = checked_result(result)
    return out if out is not None else fault(f"returned {why}", kwargs)


def guarded_score(**kwargs: Any) -> dict[str, Any]:
    """verl's reward-function interface around the user's (synchronous) function; see the module docstring."""
    inner, kwargs = _split_kwargs(kwargs)
    try:
        result = inner(**kwargs)
    except Exception as err:  # noqa: BLE001 - any user-code failure becomes a counted, logged fallback
        return _outcome(kwargs, error=err)
    return _outcome(kwargs, result)


async def guarded_score_async(**kwargs: Any) -> dict[str, Any]:
    """``guarded_score`` for a coroutine reward function (verl awaits it on its event loop)."""
    inner, kwargs = _split_kwargs(kwargs)
    try:
        result = await inner(**kwargs)
    except Exception as err:  # noqa: BLE001 - any user-code failure becomes a counted, logged fallback
        return _outcome(kwargs, error=err)
    return _outcome(kwargs, result)
