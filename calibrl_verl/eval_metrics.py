"""Sampled-evaluation metrics: mean@K, unbiased pass@k, maj@K and coverage from K samples per problem.

Pure Python (no torch, no model): ``calibrl_verl.evaluate`` calls ``benchmark_summary`` on the rows it writes to
``samples.parquet``, so every figure in ``summary.json`` can be recomputed from that file alone.

For a problem with n samples of which c are correct:

    mean@n      = c / n                                                (averaged over problems: "avg@K")
    pass@k      = 1 - C(n - c, k) / C(n, k)   for k <= n              (Chen et al. 2021, unbiased)
    maj@n       = 1 if the most frequent extracted answer among the n samples is correct
    coverage    = 1 if c >= 1                                          (= pass@n)

Every figure is reported in percent, averaged over the benchmark's problems.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 - C(n - c, k) / C(n, k), the chance that k of the n samples drawn
    without replacement hold at least one correct one.

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), the same value without huge binomials (Chen et al.
    2021, the numerically stable form). 1 when fewer than k samples are wrong.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def expected_pass_at_k(p: float, k: int) -> float:
    """pass@k of one problem whose samples are each correct with probability ``p``, independently: 1 - (1 - p)^k.

    For a task with one correct completion (exact match) ``p`` is the model's probability of that completion at the
    sampling temperature (``calibrl_verl.tiny.wall_task.gold_logprobs``), so this is the value the unbiased
    estimator ``pass_at_k`` scatters around, without sampling noise. Computed as -expm1(k * log1p(-p)), exact for
    the tiny p of a hard problem."""
    if not 0.0 <= p <= 1.0 or k < 1:
        raise ValueError(f"expected pass@k needs 0 <= p <= 1 and k >= 1, got p={p}, k={k}")
    return 1.0 if p == 1.0 else -math.expm1(k * math.log1p(-p))


def report_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """maj@n of one problem: is the most frequent extracted answer correct? Answers are compared as written after
    whitespace normalisation; samples without an answer do not vote; a tie goes to the answer seen first."""
    votes = Counter(_vote(a) for a in answers if _vote(a))
    if not votes:
        return False
    top = max(votes.values())
    winner = next(_vote(a) for a in answers if _vote(a) and votes[_vote(a)] == top)
    return next(bool(ok) for a, ok in zip(answers, correct, strict=True) if _vote(a) == winner)


def _vote(answer: str | None) -> str:
    return " ".join(answer.split()) if isinstance(answer, str) else ""


def problem_groups(samples: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The samples of each problem (by ``id``), in sample order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for sample in samples:
        groups.setdefault(str(sample["id"]), []).append(sample)
    return {key: sorted(rows, key=lambda r: int(r["sample"])) for key, rows in groups.items()}


def benchmark_summary(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The figures of one benchmark from its sample rows (``id``, ``sample``, ``correct``, ``extracted`` and, when
    present, ``format``): n_problems, n_samples, accuracy (mean@K; with one sample: greedy accuracy), pass@k for
    every reported k, maj@K, coverage and the format rate, in percent. Every problem must have the same K."""
    groups = problem_groups(samples)
    counts = {len(rows) for rows in groups.values()}
    if len(counts) > 1:
        raise ValueError(f"problems have different sample counts {sorted(counts)}: pass@k needs the same K")
    n = counts.pop() if counts else 0
    problems = list(groups.values())

    def mean(values: Iterable[float]) -> float:
        values = list(values)
        return 100.0 * sum(values) / len(values) if values else 0.0

    hits = [sum(bool(r["correct"]) for r in rows) for rows in problems]
    summary: dict[str, Any] = {
        "n_problems": len(problems),
        "n_samples": n,
        "accuracy": mean(c / n for c in hits) if n else 0.0,
        "pass@k": {str(k): mean(pass_at_k(n, c, k) for c in hits) for k in report_ks(n)} if n else {},
        f"maj@{n}": mean(majority_correct([r.get("extracted") for r in rows], [r["correct"] for r in rows])
                         for rows in problems),
        "coverage": mean(c > 0 for c in hits),
    }
    if problems and all("format" in r for rows in problems for r in rows):
        summary["format_rate"] = mean(float(r["format"]) for rows in problems for r in rows)
    return summary
