"""The attempt cache: an append-only jsonl file of every sample sent, and what it settled.

One line per attempt (a sample, after its retries)::

    {"problem": key, "id": row id, "sample": k, "verdict": "correct" | "wrong" | "unparsable" | "error",
     "response": text or null, "error": message or null, "model": requested model, "served_model": ...,
     "backend": "endpoint" | "vllm", "sampling": {"temperature", "max_tokens"},
     "usage": {"prompt_tokens", "completion_tokens"}, "tries": n, "latency_s": s, "time": ISO 8601}

Each line is flushed as it is written, so a killed run loses at most the attempts in flight. A kill can tear the
last line; reading skips (and counts) lines that are not json objects, and appending first ends a torn line so
the next record starts on its own line. No key, URL or ground truth is ever written here.

A problem is *settled* (a re-run sends nothing for it) when a cached attempt of any model was verified correct,
or when attempts of the current ``--model`` used its ``--samples`` (every one wrong or unparsable), or ended in
an error (retries exhausted, or a request the endpoint refused). Samples are counted per model, so re-running
the failures with a stronger teacher on the same cache gives it a fresh budget.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from calibrl_verl.data.prep import prepare_expert

VERDICTS = ("correct", "wrong", "unparsable", "error")


@dataclass
class ProblemState:
    """What the cache knows about one problem."""

    correct: dict | None = None  # the first verified attempt, any model
    corrects: list[dict] = field(default_factory=list)  # every verified attempt, any model, in cache order
    verified: Counter = field(default_factory=Counter)  # model -> verified attempts
    answered: Counter = field(default_factory=Counter)  # model -> wrong / unparsable attempts
    error: dict[str, dict] = field(default_factory=dict)  # model -> its last error attempt


@dataclass(frozen=True)
class Outcome:
    """Where a problem stands for the current model: solved, failed (with the reason) or pending."""

    status: str  # "solved" | "failed" | "pending"
    samples_done: int = 0
    solution: str = ""
    model: str = ""
    reason: str | None = None
    solutions: tuple[str, ...] = ()  # --keep all: every distinct verified trace, in cache order


class AttemptCache:
    """Reads the cache file once, then appends one flushed line per attempt and keeps the per-problem state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.states: dict[str, ProblemState] = {}
        self.lines = 0
        self.bad_lines = 0
        self._handle: IO[str] | None = None
        if path.exists():
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                record = _parse(line)
                if record is None:
                    self.bad_lines += int(bool(line.strip()))
                    continue
                self.lines += 1
                self._update(record)

    def _update(self, record: dict) -> None:
        state = self.states.setdefault(str(record["problem"]), ProblemState())
        verdict, model = record["verdict"], str(record.get("model", ""))
        if verdict == "correct":
            state.correct = state.correct or record
            state.corrects.append(record)
            state.verified[model] += 1
        elif verdict == "error":
            state.error[model] = record
        else:
            state.answered[model] += 1

    def append(self, record: dict[str, Any]) -> None:
        """Write one attempt and flush it (a kill right after loses nothing)."""
        if record.get("verdict") not in VERDICTS:
            raise ValueError(f"unknown verdict {record.get('verdict')!r}")
        if self._handle is None:
            self._handle = self._open()
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        self.lines += 1
        self._update(record)

    def _open(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        if handle.tell() > 0:
            handle.seek(handle.tell() - 1)
            if handle.read(1) != "\n":  # a torn last line from a kill: end it, or the next record joins it
                handle.write("\n")
        return handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def outcome(self, key: str, model: str, samples: int, keep_all: bool = False) -> Outcome:
        """Solved (first correct attempt), failed (error, or ``samples`` wrong ones by ``model``) or pending.

        ``keep_all`` (``--keep all``): a problem is settled only once ``model`` used its ``samples`` (or hit an
        error); it is solved with every distinct verified trace of any model (``Outcome.solutions``).
        """
        state = self.states.get(key)
        if state is None:
            return Outcome("pending")
        if keep_all:
            return _outcome_keep_all(state, model, samples)
        if state.correct is not None:
            solution = prepare_expert(state.correct.get("response"))[0]
            served = state.correct.get("served_model") or state.correct.get("model") or ""
            return Outcome("solved", solution=solution, model=str(served), solutions=(solution,))
        answered = state.answered[model]
        if model in state.error:
            return Outcome("failed", samples_done=answered, reason=_error_reason(state.error[model], samples))
        if answered >= samples:
            return Outcome("failed", samples_done=answered, reason=f"all {answered} samples wrong")
        return Outcome("pending", samples_done=answered)


def _outcome_keep_all(state: ProblemState, model: str, samples: int) -> Outcome:
    done = state.answered[model] + state.verified[model]
    if done < samples and model not in state.error:
        return Outcome("pending", samples_done=done)
    solutions = tuple(dict.fromkeys(prepare_expert(r.get("response"))[0] for r in state.corrects))
    if solutions:
        served = state.corrects[0].get("served_model") or state.corrects[0].get("model") or ""
        return Outcome("solved", samples_done=done, solution=solutions[0], model=str(served), solutions=solutions)
    if model in state.error:
        return Outcome("failed", samples_done=done, reason=_error_reason(state.error[model], samples))
    return Outcome("failed", samples_done=done, reason=f"all {done} samples wrong")


def _error_reason(error: dict, samples: int) -> str:
    return f"error (sample {error.get('sample', 0) + 1} of {samples}): {error.get('error')}"


def _parse(line: str) -> dict | None:
    """A cache record, or None for a blank, torn or foreign line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or "problem" not in record or record.get("verdict") not in VERDICTS:
        return None
    return record
