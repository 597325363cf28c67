"""``python -m calibrl_verl.experts generate``: expert chains of thought for a prepared parquet, verified.

    python -m calibrl_verl.experts generate --data IN.parquet --out OUT.parquet [--failures FAIL.parquet]
        (--base-url URL --model NAME [--api-key-env VAR] | --backend vllm --model PATH [--tp N])
        [--samples K] [--keep first|all] [--concurrency C] [--timeout S] [--max-retries R] [--cache PATH]
        [--temperature T] [--max-tokens N] [--limit N] [--overwrite]

Every row of ``--data`` (a verl RL parquet as the prep scripts write it) whose ``solution`` is empty is sent
(``--overwrite``: every row), up to ``--samples`` times, until one reply, wrapped into ``<think>..</think>
<answer>..</answer>`` as the prep scripts wrap a plain CoT, scores correct and well formed under the training
reward. ``--keep all`` takes all ``--samples`` of every problem and keeps every distinct verified reply: ``solution``
is then a list of traces, from which training with ``calibrl.experts_per_group=k`` draws k distinct experts per
group. ``--out`` gets every input row in input order with ``solution`` filled and a ``solution_model`` column;
``--failures`` (default ``OUT.failures.parquet``) the rows no sample solved, with a ``failure_reason`` ("all K
samples wrong", or the error that ended the problem). ``--cache`` (default ``OUT.cache.jsonl``) records every
attempt as it ends: a killed run loses at most the requests in flight, and re-running the same command sends
nothing for a problem already settled. A summary line is printed and written to ``OUT.summary.json``.

The endpoint's key is read from the environment variable ``--api-key-env`` names (default OPENAI_API_KEY; any
placeholder such as EMPTY for an endpoint without a key) and is written nowhere.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calibrl_verl.data.expert_column import expert_traces
from calibrl_verl.experts.cache import AttemptCache
from calibrl_verl.experts.data import (
    ExpertsError,
    InputTable,
    Problem,
    RowResult,
    collect_problems,
    read_input,
    write_json,
    write_outputs,
)
from calibrl_verl.experts.session import Session, Settings

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_CONCURRENCY = {"endpoint": 16, "vllm": 256}


# ----------------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m calibrl_verl.experts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="generate")
    gen = commands.add_parser("generate", help="generate verified expert CoTs", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    gen.add_argument("--data", type=Path, required=True, help="input verl RL parquet (docs/algorithm.md §6)")
    gen.add_argument("--out", type=Path, required=True, help="output parquet: every input row, solution filled")
    gen.add_argument("--failures", type=Path, default=None, help="unsolved rows [OUT.failures.parquet]")
    gen.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    gen.add_argument("--backend", choices=["vllm"], default=None, help="local offline generation with vllm.LLM")
    gen.add_argument("--model", required=True, help="endpoint model name, or the local model path for vllm")
    gen.add_argument("--api-key-env", default=None, help=f"env variable holding the key [{DEFAULT_KEY_ENV}]")
    gen.add_argument("--tp", type=int, default=None, help="vllm: tensor parallel size [1]")
    gen.add_argument("--samples", type=int, default=4, help="tries per problem until one is verified [4]")
    gen.add_argument("--keep", choices=["first", "all"], default="first",
                     help="first: stop at the first verified sample, solution is a string; all: take every sample, "
                          "solution is the list of distinct verified ones (for calibrl.experts_per_group > 1) "
                          "[first]")  # fmt: skip
    gen.add_argument("--concurrency", type=int, default=None,
                     help="endpoint: requests in flight [16]; vllm: problems per generate call [256]")  # fmt: skip
    gen.add_argument("--timeout", type=float, default=300.0, help="endpoint: seconds per request [300]")
    gen.add_argument("--max-retries", type=int, default=6, help="endpoint: repeats of a failed request [6]")
    gen.add_argument("--cache", type=Path, default=None, help="attempt cache (jsonl) [OUT.cache.jsonl]")
    gen.add_argument("--temperature", type=float, default=0.7, help="sampling temperature [0.7]")
    gen.add_argument("--max-tokens", type=int, default=4096,
                     help="reply budget [4096]; the recipe's data.max_response_length")  # fmt: skip
    gen.add_argument("--limit", type=int, default=None, help="first N rows of --data only (--out holds those)")
    gen.add_argument("--overwrite", action="store_true", help="also send rows that already have a solution")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed and checked flags, with the defaults that depend on others filled in."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_backend_flags(parser, args)
    _check_numbers(parser, args)
    args.kind = "vllm" if args.backend else "endpoint"
    args.concurrency = args.concurrency or DEFAULT_CONCURRENCY[args.kind]
    args.tp = args.tp or 1
    args.failures = args.failures or _beside(args.out, ".failures.parquet")
    args.cache = args.cache or _beside(args.out, ".cache.jsonl")
    args.summary = _beside(args.out, ".summary.json")
    return args


def _check_backend_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.base_url and args.backend:
        parser.error("give either --base-url URL (an OpenAI-compatible endpoint) or --backend vllm (a local model), "
                     "not both")  # fmt: skip
    if not args.base_url and not args.backend:
        parser.error("give --base-url URL (an OpenAI-compatible endpoint) or --backend vllm (a local model)")
    if args.base_url and not args.base_url.startswith(("http://", "https://")):
        parser.error(f"--base-url {args.base_url!r}: expected an http:// or https:// URL")
    if args.backend and args.api_key_env:
        parser.error("--api-key-env is for an endpoint (--base-url); --backend vllm runs locally, without a key")
    if args.base_url and args.tp is not None:
        parser.error("--tp is for --backend vllm; an endpoint's parallelism is the server's")


def _check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value, low in (("--samples", args.samples, 1), ("--concurrency", args.concurrency, 1),
                             ("--max-retries", args.max_retries, 0), ("--max-tokens", args.max_tokens, 1),
                             ("--limit", args.limit, 1), ("--tp", args.tp, 1)):  # fmt: skip
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature:g}")


def _beside(out: Path, suffix: str) -> Path:
    name = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
    return out.with_name(name + suffix)


def api_key(args: argparse.Namespace) -> str:
    """The endpoint's key from the environment; never logged or stored."""
    var = args.api_key_env or DEFAULT_KEY_ENV
    key = os.environ.get(var)
    if not key:
        raise ExpertsError(
            f"--api-key-env: environment variable {var} is not set; export it with the endpoint's key "
            "(any placeholder, e.g. EMPTY, for an endpoint without one)"
        )
    return key


# ---------------------------------------------------------------------------------------------------------- run


def make_backend(args: argparse.Namespace, key: str | None) -> Any:
    if args.kind == "vllm":
        from calibrl_verl.experts.local import LocalBackend
        from calibrl_verl.generation import vllm_importable

        if not vllm_importable():
            raise ExpertsError("--backend vllm: vllm is not installed (use an endpoint: --base-url)")
        return LocalBackend(args.model, args.tp, args.concurrency)
    from calibrl_verl.experts.endpoint import EndpointBackend, RetryPolicy

    assert key is not None
    return EndpointBackend(args.base_url, key, args.timeout, RetryPolicy(args.max_retries), args.concurrency)


def generate(args: argparse.Namespace) -> dict[str, Any]:
    """Send what is not settled yet, then write --out, --failures and the summary; returns the summary."""
    key = api_key(args) if args.kind == "endpoint" else None
    source = read_input(args.data, args.limit)
    problems, kept = collect_problems(source, args.overwrite)
    settings = Settings(args.model, args.kind, args.samples, args.temperature, args.max_tokens, args.keep == "all")
    session = Session(AttemptCache(args.cache), settings)
    pending = pending_problems(problems, session.cache, settings)
    if args.temperature == 0 and args.samples > 1:
        print("experts: note: --temperature 0 makes every sample alike; --samples > 1 only repeats", file=sys.stderr)
    try:
        if pending:  # the backend (a vLLM engine, a client) starts only when there is something to send
            _send(make_backend(args, key), pending, session, args)
    finally:
        session.close()
    results = row_results(source, problems, session.cache, settings)
    write_outputs(source, results, args.out, args.failures)
    summary = _summary(args, source, problems, kept, pending, results, session)
    write_json(summary, args.summary)
    print(summary_line(summary))
    return summary


def _send(backend: Any, pending: list[tuple[Problem, int]], session: Session, args: argparse.Namespace) -> None:
    from calibrl_verl.experts.endpoint import FatalEndpointError

    session.start_progress(len(pending))
    try:
        backend.run(pending, session)
    except FatalEndpointError as exc:
        raise ExpertsError(
            f"--base-url {args.base_url}: the endpoint refused a request ({exc}); check --model, the key in "
            f"--api-key-env and the URL. The refused request was not cached: re-running resumes."
        ) from None


def pending_problems(problems: list[Problem], cache: AttemptCache, s: Settings) -> list[tuple[Problem, int]]:
    """``(problem, samples already done)`` for every problem the cache has not settled (bad inputs excluded)."""
    pending = []
    for problem in problems:
        if problem.input_error is None:
            outcome = cache.outcome(problem.key, s.model, s.samples, s.keep_all)
            if outcome.status == "pending":
                pending.append((problem, outcome.samples_done))
    return pending


def row_results(source: InputTable, problems: list[Problem], cache: AttemptCache, s: Settings) -> list[RowResult]:
    """Per input row: the input's solution (kept rows, failures) or the verified one, and why a row failed."""
    solutions, models = source.column("solution"), source.column("solution_model")
    # --keep all: every row's solution is a list of traces (a kept row's single trace becomes a list of one)
    results = [RowResult(expert_traces(sol) if s.keep_all else (sol if isinstance(sol, str) else ""),
                         m if isinstance(m, str) else "")
               for sol, m in zip(solutions, models, strict=True)]  # fmt: skip
    for problem in problems:
        outcome = cache.outcome(problem.key, s.model, s.samples, s.keep_all)
        for position in problem.positions:
            row = results[position]
            if problem.input_error is not None:
                row.failure_reason = problem.input_error
            elif outcome.status == "solved":
                row.solution = list(outcome.solutions) if s.keep_all else outcome.solution
                row.solution_model = outcome.model
            else:  # a failed row keeps the solution it came with (--overwrite): nothing verified replaces it
                row.failure_reason = outcome.reason or "not settled (the run stopped early)"
    return results


def _summary(args: argparse.Namespace, source: InputTable, problems: list[Problem], kept: list[int],
             pending: list, results: list[RowResult], session: Session) -> dict[str, Any]:  # fmt: skip
    reasons = [r.failure_reason for r in results if r.failure_reason is not None]
    bad_input = [p for p in problems if p.input_error is not None]
    return {
        "data": str(args.data),
        "out": str(args.out),
        "failures": str(args.failures),
        "cache": str(args.cache),
        "model": args.model,
        "backend": args.kind,
        "samples": args.samples,
        "keep": args.keep,
        "traces": sum(len(r.solution) if isinstance(r.solution, list) else int(bool(r.solution)) for r in results),
        "rows": source.num_rows,
        "rows_kept": len(kept),
        "rows_solved": source.num_rows - len(kept) - len(reasons),
        "rows_failed": len(reasons),
        "rows_failed_all_wrong": sum(r.startswith("all ") for r in reasons),
        "rows_failed_error": sum(r.startswith("error") for r in reasons),
        "rows_failed_bad_input": sum(r.startswith("bad input") for r in reasons),
        "problems": len(problems),
        "problems_sent": len(pending),
        "problems_bad_input": len(bad_input),
        "problems_settled_before": len(problems) - len(pending) - len(bad_input),
        "cache_bad_lines": session.cache.bad_lines,
        **session.counts(),
    }


def summary_line(s: dict[str, Any]) -> str:
    return (
        f"experts: {s['rows']} rows -> {s['out']}: {s['rows_kept']} kept, {s['rows_solved']} solved, "
        f"{s['rows_failed']} failed ({s['rows_failed_all_wrong']} all wrong, {s['rows_failed_error']} error, "
        f"{s['rows_failed_bad_input']} bad input) -> {s['failures']}; {s['problems_sent']} problems sent "
        f"({s['problems_settled_before']} settled before); {s['requests']} requests ({s['request_errors']} failed, "
        f"{s['retries']} retries); tokens {s['prompt_tokens']} prompt + {s['completion_tokens']} completion; "
        f"{s['seconds']} s"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        return generate(args)
    except ExpertsError as exc:
        raise SystemExit(f"experts: error: {exc}") from None
    except KeyboardInterrupt:
        print(f"\nexperts: interrupted; every finished attempt is in {args.cache}: re-run to resume", file=sys.stderr)
        raise SystemExit(130) from None
