"""One generation run's bookkeeping, shared by both backends: verify a reply, cache it, count it, show it.

A reply is verified exactly as training will see it: the text is wrapped into ``<think>..</think><answer>..
</answer>`` with ``prepare_expert`` (as ``examples/data_preprocess/virl39k.py`` does for a plain CoT) and scored
with the training reward under its strict rules (``strict_format=True``: one think block, one answer block, nothing
else); a sample counts only when it is both correct and well formed (acc = format = 1).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from calibrl_verl.data.prep import prepare_expert
from calibrl_verl.experts.cache import AttemptCache
from calibrl_verl.experts.data import Problem
from calibrl_verl.reward import compute_score


@dataclass
class Reply:
    """What one sample (a request and its retries) gave: a text, or the error that ended it."""

    text: str | None = None
    error: str | None = None
    served_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tries: int = 1
    latency_s: float = 0.0


@dataclass
class Settings:
    """The run's model and sampling parameters (what the cache records with every attempt)."""

    model: str
    backend: str
    samples: int
    temperature: float
    max_tokens: int
    keep_all: bool = False  # --keep all: every sample is taken, every verified one kept (not only the first)

    def settles(self, verdict: str) -> bool:
        """Does this verdict end the problem's sampling? An error always; a verified sample unless keeping all."""
        return verdict == "error" or (verdict == "correct" and not self.keep_all)


@dataclass
class Tally:
    """Counts of this run (the summary line, the json summary and the progress bar show them)."""

    solved: int = 0
    failed: int = 0
    requests: int = 0
    request_errors: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def judge(text: str | None, problem: Problem) -> str:
    """``correct`` / ``wrong`` / ``unparsable`` for a reply text, after wrapping it as training data."""
    solution, _status = prepare_expert(text)
    if not solution:
        return "unparsable"
    score = compute_score(problem.data_source, solution, problem.ground_truth, problem.extra_info, strict_format=True)
    return "correct" if score["acc"] == 1.0 and score["format"] == 1.0 else "wrong"


@dataclass
class Session:
    """Records attempts to the cache and keeps the tally and the progress bar in step."""

    cache: AttemptCache
    settings: Settings
    tally: Tally = field(default_factory=Tally)
    progress: Any = None
    started: float = field(default_factory=time.monotonic)

    def start_progress(self, total: int) -> None:
        from tqdm import tqdm

        self.progress = tqdm(total=total, desc="experts", unit="problem", file=sys.stderr, mininterval=1.0)
        self._show()

    def record(self, problem: Problem, sample: int, reply: Reply) -> str:
        """Verify, cache (flushed) and count one sample; returns its verdict."""
        verdict = "error" if reply.error is not None else judge(reply.text, problem)
        self.cache.append(self._record(problem, sample, reply, verdict))
        self.tally.prompt_tokens += reply.prompt_tokens
        self.tally.completion_tokens += reply.completion_tokens
        self._show()
        return verdict

    def _record(self, problem: Problem, sample: int, reply: Reply, verdict: str) -> dict[str, Any]:
        s = self.settings
        return {
            "problem": problem.key,
            "id": problem.row_id,
            "sample": sample,
            "verdict": verdict,
            "response": reply.text,
            "error": reply.error,
            "model": s.model,
            "served_model": reply.served_model or s.model,
            "backend": s.backend,
            "sampling": {"temperature": s.temperature, "max_tokens": s.max_tokens},
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens},
            "tries": reply.tries,
            "latency_s": round(reply.latency_s, 3),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def count_request(self, error: bool, retry: bool) -> None:
        """One HTTP request went out (``retry``: a repeat after an error); ``error``: it failed."""
        self.tally.requests += 1
        self.tally.request_errors += int(error)
        self.tally.retries += int(retry)
        if error:
            self._show()

    def settle(self, problem: Problem) -> str:
        """Count a problem that takes no further sample; returns its status (solved / failed)."""
        outcome = self.cache.outcome(problem.key, self.settings.model, self.settings.samples, self.settings.keep_all)
        if outcome.status == "solved":
            self.tally.solved += 1
        else:
            self.tally.failed += 1
        if self.progress is not None:
            self.progress.update(1)
        self._show()
        return outcome.status

    def _show(self) -> None:
        if self.progress is None:
            return
        t = self.tally
        self.progress.set_postfix(
            solved=t.solved,
            failed=t.failed,
            errors=t.request_errors,
            tokens=_human(t.prompt_tokens + t.completion_tokens),
            refresh=False,
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.cache.close()

    def counts(self) -> dict[str, Any]:
        """This run's counts for the summary (``sent_*``: problems sent now, as opposed to rows overall)."""
        counts = asdict(self.tally)
        counts["sent_solved"], counts["sent_failed"] = counts.pop("solved"), counts.pop("failed")
        return {**counts, "seconds": round(time.monotonic() - self.started, 1)}


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
