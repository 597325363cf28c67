"""Evaluate a model on verl-format parquet benchmarks: greedy or sampled answers, CalibRL's reward, pass@k.

    python -m calibrl_verl.evaluate --model PATH --data a.parquet [b.parquet ...] [--out DIR]
        [--backend auto|vllm|hf] [--max-new-tokens N] [--limit N] [--batch-size N] [--tp N]
        [--n-samples K --temperature T --top-p P --seed S] [--max-pixels N [--min-pixels N]]

Every row of each parquet (verl's RL layout: ``data_source``, ``prompt`` chat messages with ``<image>``
placeholders, ``images`` as ``[{"bytes": png}]``, ``reward_model.ground_truth``) is answered greedily (default), or
K times with ``--n-samples K`` at ``--temperature`` (default 1.0, the training temperature) and ``--top-p``, seeded by
``--seed`` (vLLM: a per-request seed; hf: torch's generator, seeded once). The model
input is built as verl builds it for a rollout: each ``<image>`` placeholder becomes an image content entry
(``RLHFDataset._build_messages``), images go through ``qwen_vl_utils.process_vision_info`` with the
processor's patch size (within ``--max-pixels`` / ``--min-pixels`` when given: use the training recipe's
``data.mm_processor_kwargs`` bounds for a benchmark prepared without ``--max-pixels``; docs/data.md "Image size"),
and the prompt is the processor's chat template with the generation prompt (a text-only
model, e.g. a Qwen2ForCausalLM directory without an image processor, uses its tokenizer's chat template, as
verl's ``hf_processor`` / ``hf_tokenizer`` split does; its benchmarks must have no images). Answers
are scored with ``calibrl_verl.reward.compute_score`` (the training reward: acc, format). Written to ``--out``:

* ``results.md``: a markdown table (benchmark, n, accuracy %, format rate %; with K > 1 also pass@K, maj@K and
  coverage) plus the macro average;
* ``results.csv``: the same numbers;
* ``generations.jsonl``: one line per answer (benchmark, index, sample, prompt, response, ground truth, acc, format);
* ``samples.parquet``: one row per (benchmark, problem id, sample): ``benchmark, id, index, sample, response,
  extracted`` (the answer text the reward graded), ``correct, acc, format, score``;
* ``summary.json``: per benchmark ``n_problems, n_samples, protocol, temperature, top_p, seed, accuracy`` (greedy
  accuracy, or mean@K = avg@K), ``pass@k`` (a mapping k -> value for k = 1, 2, 4, ..., K; Chen et al.'s unbiased
  estimator), ``maj@K``, ``coverage`` (share of problems solved at least once) and ``format_rate``, all in percent.
  Every figure is ``calibrl_verl.eval_metrics.benchmark_summary`` of that benchmark's rows of ``samples.parquet``.

The benchmark name is the parquet file's stem (``data/geoqa/test.parquet`` -> ``test``; files whose stems
collide get their folder as a prefix, ``geoqa/test``), or the file's ``data_source`` with
``--name-by data_source``.

Progress: per benchmark, rows done and the running accuracy go to stderr after every chunk of rows (``--chunk-size``,
default: the hf batch size, 256 rows for vLLM, which batches a chunk's requests itself): a tqdm bar on a
terminal, plain lines in logs (see ``calibrl_verl.progress``; ``CALIBRL_PROGRESS=lines|bar|off`` overrides).

Backends (the generation layer ``calibrl_verl.generation``, which ``calibrl_verl.experts`` shares; this module
loads the benchmarks, scores, summarizes and writes): ``vllm`` (``vllm.LLM`` with multi-modal inputs and ``--tp``
tensor parallelism, prefix caching on with ``--n-samples`` K > 1; bf16 on a GPU, float32 on vLLM's CPU build, whose
KV cache defaults to 1 GiB there via ``VLLM_CPU_KVCACHE_SPACE``), ``hf`` (transformers ``generate``, batched with
left padding; fine for tiny models), and ``auto``: vLLM when it is importable and a GPU is visible, else hf (on CPU
the hf backend starts in seconds, vLLM's engine in about a minute, so ``auto`` leaves vLLM-on-CPU to an explicit
``--backend vllm``).

Evaluate a verl checkpoint: verl saves sharded FSDP weights; merge them into a Hugging Face model first
(``huggingface/`` inside the checkpoint supplies config, tokenizer and processor), then evaluate the merge::

    python -m verl.model_merger merge --backend fsdp \\
        --local_dir checkpoints/<project>/<experiment>/global_step_N/actor --target_dir merged/step_N
    python -m calibrl_verl.evaluate --model merged/step_N \\
        --data data/geometry3k/test.parquet data/geoqa/test.parquet --out eval/step_N
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrl_verl import generation
from calibrl_verl.eval_metrics import benchmark_summary
from calibrl_verl.experts.endpoint import FatalEndpointError
from calibrl_verl.generation import (
    VLLM_CHUNK_ROWS,
    Backend,
    GenerationError,
    Request,
    Sampling,
    build_messages,
    choose_backend,
    decode_image,
    has_image_processor,
    render,
)
from calibrl_verl.progress import progress
from calibrl_verl.protocols import PROTOCOLS, Item, Protocol, get_protocol
from calibrl_verl.protocols.base import ProtocolError, parse_meta
from calibrl_verl.protocols.judge import JudgeError

REQUIRED_COLUMNS = ("prompt", "reward_model")
DEFAULT_PROTOCOL = "calibrl"  # the training prompt and reward (what the paper reports)
SAMPLING_TEMPERATURE = 1.0  # --n-samples > 1 without --temperature: the training temperature
# Without --n-samples, these text benchmarks are sampled K times (avg@K), as the text RL literature reports them
# (AIME and AMC have 30-40 problems: one greedy answer per problem moves the score by ~3 points); the others greedy.
TEXT_AVG_K = {"aime24": 32, "aime25": 32, "amc23": 32}


class EvalError(Exception):
    """A user-facing problem with the inputs (missing file, column, ...): reported without a traceback."""


@dataclass
class Row:
    """One benchmark row, ready to be rendered into a model input."""

    benchmark: str
    index: int
    data_source: str
    messages: list[dict[str, Any]]
    images: list[Any]
    ground_truth: Any
    extra_info: dict[str, Any] | None
    item: Item  # what the protocol grades


# ----------------------------------------------------------------------------------------------- data loading


def read_benchmark(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The parquet's rows as dicts (first ``limit`` only); clear errors for a missing file or column."""
    import pandas as pd

    if not path.is_file():
        raise EvalError(f"--data: no such file: {path}")
    frame = pd.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise EvalError(f"{path}: missing column(s) {missing}; it has {list(frame.columns)} (verl RL parquet expected)")
    if limit is not None:
        frame = frame.head(limit)
    return frame.to_dict(orient="records")


def _ground_truth(record: dict[str, Any], path: Path, position: int) -> Any:
    reward_model = record.get("reward_model")
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise EvalError(f"{path}: row {position} has no reward_model.ground_truth")
    return reward_model["ground_truth"]


def load_rows(path: Path, benchmark: str, limit: int | None = None, protocol: Protocol | None = None,
              image_options: dict[str, Any] | None = None) -> list[Row]:
    """Parse one benchmark parquet into rows whose messages are the protocol's prompt (default: calibrl's); every
    image entry carries ``image_options`` (``--max-pixels`` / ``--min-pixels``, see ``generation.pixel_options``)."""
    protocol = protocol or get_protocol(DEFAULT_PROTOCOL)
    rows = []
    for position, record in enumerate(read_benchmark(path, limit)):
        images = [decode_image(item) for item in _as_list(record.get("images"))]
        extra_info = record.get("extra_info") if isinstance(record.get("extra_info"), dict) else None
        where = f"{path}: row {position}"
        item = Item(data_source=str(record.get("data_source") or benchmark),
                    prompt=[dict(m) for m in _as_list(record["prompt"])],
                    ground_truth=_ground_truth(record, path, position), extra_info=extra_info,
                    meta=parse_meta(extra_info, where), n_images=len(images), where=where)
        rows.append(Row(benchmark=benchmark, index=position, data_source=item.data_source,
                        messages=build_messages(protocol.prompt(item), images, image_options), images=images,
                        ground_truth=item.ground_truth, extra_info=extra_info, item=item))
    return rows


def _as_list(value: Any) -> list[Any]:
    """parquet lists arrive as numpy arrays (or None)."""
    return [] if value is None else list(value)


def benchmark_names(paths: Sequence[Path], name_by: str = "stem") -> list[str]:
    """Name per file: its stem (colliding stems get the folder prefix), or its single ``data_source``."""
    stems = [p.stem for p in paths]
    names = [s if stems.count(s) == 1 else f"{p.parent.name}/{s}" for p, s in zip(paths, stems, strict=True)]
    if name_by == "data_source":
        sources = [_data_source_name(p) or n for p, n in zip(paths, names, strict=True)]
        names = [s if sources.count(s) == 1 else f"{s}:{n}" for s, n in zip(sources, names, strict=True)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvalError(f"--data: two files get the benchmark name(s) {duplicates}; is a file listed twice?")
    return names


def _data_source_name(path: Path) -> str | None:
    """The file's data_source when all its rows share one, else None."""
    import pandas as pd

    if not path.is_file():
        raise EvalError(f"--data: no such file: {path}")
    if not _has_column(path):
        return None
    sources = pd.read_parquet(path, columns=["data_source"])["data_source"].unique()
    return str(sources[0]) if len(sources) == 1 else None


def _has_column(path: Path, column: str = "data_source") -> bool:
    import pyarrow.parquet as pq

    return column in pq.read_schema(path).names


# ------------------------------------------------------------------------------------------------ model input


def render_row(processor: Any, row: Row) -> Request:
    """A benchmark row's model input, rendered by the generation layer as verl's agent loop renders it."""
    return render(processor, row.messages, row.images, where=f"{row.benchmark}: row {row.index}")


def make_backend(args: argparse.Namespace, max_images: int, sampling: Sampling | None = None) -> Backend:
    """The backend selected by ``--backend`` (``auto`` resolved), built for ``sampling`` (default: the flags')."""
    name = choose_backend(args.backend)
    print(f"[evaluate] backend: {name}", file=sys.stderr)
    return generation.make_backend(name, args.model, args.max_new_tokens, sampling or sampling_of(args),
                                   batch_size=args.batch_size, tp=args.tp, max_images=max_images,
                                   max_model_len=args.max_model_len)  # fmt: skip


def sampling_of(args: argparse.Namespace, data_source: str | None = None) -> Sampling:
    """A benchmark's sampling: ``--n-samples`` (default: ``TEXT_AVG_K`` for the benchmark's data source, else one
    greedy answer; ``--temperature 0`` keeps every benchmark greedy) at ``--temperature`` (default: 1.0 for K > 1,
    else 0), ``--top-p`` and ``--seed``."""
    n = args.n_samples or (1 if args.temperature == 0 else TEXT_AVG_K.get(str(data_source), 1))
    temperature = args.temperature if args.temperature is not None else SAMPLING_TEMPERATURE if n > 1 else 0.0
    return Sampling(n, temperature, args.top_p, args.seed)


def use_sampling(backend: Backend, sampling: Sampling) -> None:
    """Switch the backend to a benchmark's sampling (a backend without ``set_sampling`` keeps its own)."""
    if getattr(backend, "sampling", sampling) != sampling:
        backend.set_sampling(sampling)


# ----------------------------------------------------------------------------------------------------- scoring


def score_rows(responses: Sequence[str], rows: Sequence[Row], protocol: Protocol | None = None) -> list[dict[str, Any]]:
    """The protocol's grade of each (response, row): ``{"score", "acc", "format", "extracted", "route"}``; the
    default protocol grades with the training reward (``compute_score``)."""
    if len(responses) != len(rows):
        raise ValueError(f"{len(responses)} responses for {len(rows)} rows")
    protocol = protocol or get_protocol(DEFAULT_PROTOCOL)
    return [protocol.grade(row.item, response) for response, row in zip(responses, rows, strict=True)]


def generation_record(row: Row, request: Request, response: str, score: dict[str, Any],
                      sample: int = 0) -> dict[str, Any]:
    """One line of generations.jsonl (one answer: ``sample`` k of the row's K)."""
    return {
        "benchmark": row.benchmark,
        "index": row.index,
        "id": problem_id(row),
        "sample": sample,
        "data_source": row.data_source,
        "prompt": request.prompt,
        "response": response,
        "extracted": score.get("extracted"),
        "route": score.get("route"),
        "tags": json.dumps(score["tags"], sort_keys=True, default=str) if score.get("tags") else "",
        "ground_truth": row.ground_truth,
        "acc": float(score["acc"]),
        "format": float(score["format"]),
        "score": float(score["score"]),
    }


def problem_id(row: Row) -> str:
    """The problem's id: ``extra_info.id`` (or ``.index``) when the row has one, else its position in the file."""
    info = row.extra_info or {}
    value = info.get("id", info.get("index"))
    return str(value) if value is not None and value != "" else str(row.index)


def evaluate_rows(rows: list[Row], backend: Backend, chunk_size: int | None = None,
                  protocol: Protocol | None = None) -> list[dict[str, Any]]:
    """Render, generate, score: one record per (row, sample); progress (running accuracy) after each chunk."""
    chunk = chunk_size or getattr(backend, "chunk_size", None) or max(len(rows), 1)
    records: list[dict[str, Any]] = []
    name = rows[0].benchmark if rows else ""
    with progress(total=len(rows), desc=f"eval {name}", unit="rows") as bar:
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            requests = [render_row(backend.processor, row) for row in part]
            answers = backend.generate(requests)
            if len(answers) != len(part):
                raise ValueError(f"{len(answers)} answer lists for {len(part)} rows")
            for row, request, texts in zip(part, requests, answers, strict=True):
                scores = score_rows(texts, [row] * len(texts), protocol)
                records += [generation_record(row, request, text, score, k)
                            for k, (text, score) in enumerate(zip(texts, scores, strict=True))]
            bar.set_postfix(acc=f"{100.0 * sum(r['acc'] for r in records) / len(records):.1f}%")
            bar.update(len(part))
    return records


def summarize(records: Sequence[dict[str, Any]], benchmarks: Sequence[str]) -> list[dict[str, Any]]:
    """Per benchmark: n (problems), accuracy % (greedy, or mean@K), format rate %, pass@K %, maj@K % and coverage %;
    then the macro average when there are several. The figures are ``benchmark_summary``'s."""
    table = []
    for name in benchmarks:
        summary = benchmark_summary([sample_row(r) for r in records if r["benchmark"] == name])
        k = summary["n_samples"]
        table.append({"benchmark": name, "n": summary["n_problems"], "accuracy": summary["accuracy"],
                      "format_rate": summary.get("format_rate", 0.0), "k": k,
                      "pass_at_k": summary["pass@k"].get(str(k), 0.0), "maj_at_k": summary[f"maj@{k}"],
                      "coverage": summary["coverage"]})
    if len(table) > 1:
        average = {"benchmark": "average", "n": sum(t["n"] for t in table), "k": table[0]["k"]}
        for key in ("accuracy", "format_rate", "pass_at_k", "maj_at_k", "coverage"):
            average[key] = sum(t[key] for t in table) / len(table)
        table.append(average)
    return table


SAMPLE_COLUMNS = ("benchmark", "id", "index", "sample", "response", "extracted", "route", "correct", "acc", "format",
                  "score", "tags", "judge_extracted", "judge_correct")


def sample_row(record: dict[str, Any]) -> dict[str, Any]:
    """A generation record as a ``samples.parquet`` row (``correct``: the reward's acc)."""
    return {**{k: record[k] for k in SAMPLE_COLUMNS if k in record}, "correct": record["acc"] > 0}


def summaries(records: Sequence[dict[str, Any]], benchmarks: Sequence[str], sampling: Sampling | dict[str, Sampling],
              protocol: Protocol | None = None, rules: dict[str, str] | None = None) -> dict[str, Any]:
    """``summary.json``: per benchmark, its figures, how they were measured (protocol, its rule set, sampling) and
    how answers were found (``extraction``: % of samples per route, e.g. ``boxed``; see protocols.extract)."""
    protocol = protocol or get_protocol(DEFAULT_PROTOCOL)
    out = {}
    for name in benchmarks:
        used = sampling[name] if isinstance(sampling, dict) else sampling
        how = {"protocol": protocol.name, "temperature": used.temperature, "top_p": used.top_p, "seed": used.seed}
        samples = [sample_row(r) for r in records if r["benchmark"] == name]
        rule = (rules or {}).get(name, "")
        out[name] = {**how, "rules": rule, **benchmark_summary(samples), "extraction": route_shares(samples),
                     **protocol.extras(rule, samples)}
        if any("judge_correct" in s for s in samples):
            out[name]["judge"] = judge_summary(samples)
    return out


def judge_summary(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The same figures with the judge's verdicts (``judge_correct``, ``judge_extracted``) in place of the rules'."""
    judged = [{**s, "correct": bool(s.get("judge_correct")), "extracted": s.get("judge_extracted")}
              for s in samples if "judge_correct" in s]
    summary = benchmark_summary(judged)
    summary.pop("format_rate", None)
    return {**summary, "no_verdict": 100.0 * sum(s.get("judge_extracted") is None for s in judged) / len(judged)}


# ------------------------------------------------------------------------------------------------------- judge


def judge_records(records: list[dict[str, Any]], datasets: Sequence[list[Row]], protocol: Protocol,
                  judge: Any) -> dict[str, Any]:
    """Add ``judge_extracted`` / ``judge_correct`` to the records of benchmarks whose rules have a judge
    (community MathVista, MathVerse); returns the judge's request counts."""
    from calibrl_verl.protocols.community import rules_for

    rows = {(row.benchmark, row.index): row for rows in datasets for row in rows}
    todo = [(r, rows[(r["benchmark"], r["index"])]) for r in records]
    todo = [(r, row, rules_for(row.data_source)) for r, row in todo]
    todo = [(r, row, rules) for r, row, rules in todo if rules.judge_prompt is not None]
    if protocol.name != "community" or not todo:
        return {}
    replies = judge.ask([rules.judge_prompt(row.item, str(r["response"])) for r, row, rules in todo])
    for (record, row, rules), reply in zip(todo, replies, strict=True):
        extracted, correct = rules.judge_grade(row.item, reply) if reply is not None else (None, False)
        record["judge_extracted"], record["judge_correct"] = extracted, bool(correct)
    return judge.stats.as_dict()


def route_shares(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """% of samples whose answer each extraction route found (``none``: no answer found)."""
    routes = [str(s.get("route")) for s in samples]
    return {r: 100.0 * routes.count(r) / len(routes) for r in sorted(set(routes))} if routes else {}


# ------------------------------------------------------------------------------------------------------ output


def markdown_table(table: Sequence[dict[str, Any]], title: str) -> str:
    ks = {t.get("k", 1) for t in table if t["benchmark"] != "average"}
    if len(ks) > 1:  # greedy and sampled benchmarks together (text benchmarks' default avg@K): K per row
        header = "| benchmark | n | K | accuracy or mean@K (%) | pass@K (%) | maj@K (%) | coverage (%) | format (%) |"
        lines = [f"# {title}", "", header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {t['benchmark']} | {t['n']} | {t['k'] if t['benchmark'] != 'average' else '-'} | "
                  f"{t['accuracy']:.2f} | {t['pass_at_k']:.2f} | {t['maj_at_k']:.2f} | {t['coverage']:.2f} | "
                  f"{t['format_rate']:.2f} |" for t in table]
        return "\n".join(lines) + "\n"
    k = ks.pop() if ks else 1
    if k <= 1:
        lines = [f"# {title}", "", "| benchmark | n | accuracy (%) | format (%) |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {t['benchmark']} | {t['n']} | {t['accuracy']:.2f} | {t['format_rate']:.2f} |" for t in table]
        return "\n".join(lines) + "\n"
    header = f"| benchmark | n | mean@{k} (%) | pass@{k} (%) | maj@{k} (%) | coverage (%) | format (%) |"
    lines = [f"# {title}", "", header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {t['benchmark']} | {t['n']} | {t['accuracy']:.2f} | {t['pass_at_k']:.2f} | {t['maj_at_k']:.2f} | "
              f"{t['coverage']:.2f} | {t['format_rate']:.2f} |" for t in table]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("benchmark", "n", "k", "accuracy", "format_rate", "pass_at_k", "maj_at_k", "coverage")


def write_outputs(out: Path, records: Sequence[dict[str, Any]], table: Sequence[dict[str, Any]], title: str,
                  summary: dict[str, Any] | None = None) -> None:
    """results.md, results.csv, generations.jsonl, samples.parquet and summary.json under ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown_table(table, title))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in t.items()} for t in table)
    with open(out / "generations.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    rows = [sample_row(r) for r in records]
    present = [name for name in SAMPLE_COLUMNS if any(name in row for row in rows)]
    columns = {name: [row.get(name) for row in rows] for name in present}
    pq.write_table(pa.table(columns), out / "samples.parquet")
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m calibrl_verl.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="HF model dir or id (a merged verl checkpoint)")
    parser.add_argument("--data", required=True, nargs="+", type=Path, help="verl RL parquet file(s)")
    parser.add_argument("--out", type=Path, default=None, help="output dir [eval_results/<model dir name>]")
    parser.add_argument("--backend", choices=generation.BACKENDS, default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=4096,
                        help="response budget [4096]; use the run's data.max_response_length")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each file only")
    parser.add_argument("--batch-size", type=int, default=8, help="hf backend batch size")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help=f"rows per progress update [hf: batch size, vLLM: {VLLM_CHUNK_ROWS}]",
    )
    parser.add_argument("--tp", type=int, default=1, help="vLLM tensor parallel size")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM max_model_len [model's]")
    parser.add_argument("--name-by", choices=["stem", "data_source"], default="stem", help="benchmark naming")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="resize images above this many pixels down, as the training recipe's "
                             "data.mm_processor_kwargs.max_pixels does [qwen-vl-utils' default, 16384 tokens]")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="resize images below this many pixels up [qwen-vl-utils' default, 4 tokens]")
    parser.add_argument("--n-samples", type=int, default=None,
                        help="answers per problem: 1 = greedy; K > 1 samples K for mean@K, pass@k, maj@K [greedy, "
                             f"except avg@K for {', '.join(f'{b} (K={k})' for b, k in TEXT_AVG_K.items())}]")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"sampling temperature [0 (greedy) for one sample, {SAMPLING_TEMPERATURE} for K > 1]")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling [1.0]")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed [0]")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help="calibrl: the training prompt and reward (the paper's numbers) [default]; community: "
                             "the public harness's prompt and rule-based scoring per benchmark, lenient extraction")
    judge = parser.add_argument_group("judge (community protocol: MathVista answer extraction, MathVerse 1/0 grading)")
    judge.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    judge.add_argument("--judge-model", default=None, help="judge model name (the harness uses gpt-4o-2024-11-20)")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the key (never written) [OPENAI_API_KEY]")
    judge.add_argument("--judge-cache", type=Path, default=None, help="reply cache [<out>/judge_cache.jsonl]")
    judge.add_argument("--judge-max-retries", type=int, default=5, help="repeats of a failed request [5]")
    judge.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request [60]")
    judge.add_argument("--judge-concurrency", type=int, default=8, help="requests in flight [8]")
    args = parser.parse_args(argv)
    if bool(args.judge_base_url) != bool(args.judge_model):
        parser.error("--judge-base-url and --judge-model go together")
    if args.judge_base_url and args.protocol != "community":
        parser.error("the judge belongs to --protocol community (the calibrl protocol grades with the training reward)")
    if args.out is None:
        args.out = Path("eval_results") / Path(args.model.rstrip("/")).name
    for key in ("max_new_tokens", "batch_size", "tp", "limit", "chunk_size", "n_samples", "max_pixels", "min_pixels"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.max_pixels is not None and args.min_pixels is not None and args.min_pixels > args.max_pixels:
        parser.error(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}")
    if (args.temperature is not None and args.temperature < 0) or not 0 < args.top_p <= 1:
        parser.error(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature} / {args.top_p:g}")
    if args.n_samples is not None and args.n_samples > 1 and args.temperature == 0:
        parser.error(f"--n-samples {args.n_samples} with --temperature 0 would repeat one greedy answer: "
                     "give a temperature > 0")
    return args


def run(args: argparse.Namespace, backend_factory: Callable[[int], Backend] | None = None) -> list[dict[str, Any]]:
    """Load every file (fail fast, before the model), evaluate, write; returns the summary table."""
    names = benchmark_names(args.data, args.name_by)
    protocol = get_protocol(getattr(args, "protocol", DEFAULT_PROTOCOL))
    pixels = generation.pixel_options(getattr(args, "max_pixels", None), getattr(args, "min_pixels", None))
    datasets = [load_rows(path, name, args.limit, protocol, pixels)
                for path, name in zip(args.data, names, strict=True)]  # fmt: skip
    rules = {name: _one_rule_set(protocol, rows, name) for name, rows in zip(names, datasets, strict=True)}
    max_images = max((len(r.images) for rows in datasets for r in rows), default=0)
    samplings = {name: sampling_of(args, rows[0].data_source if rows else None)
                 for name, rows in zip(names, datasets, strict=True)}
    # built for a sampled benchmark when there is one: vLLM turns prefix caching on for n > 1 at start-up
    first = next((s for s in samplings.values() if not s.greedy), sampling_of(args))
    backend = backend_factory(max_images) if backend_factory else make_backend(args, max_images, first)
    if max_images and not has_image_processor(backend.processor):
        with_images = [n for n, rows in zip(names, datasets, strict=True) if any(r.images for r in rows)]
        raise EvalError(f"--model {args.model} is text-only (no image processor) but {with_images} have images")
    chunk = getattr(args, "chunk_size", None)
    records = []
    for name, rows in zip(names, datasets, strict=True):
        use_sampling(backend, samplings[name])
        records += evaluate_rows(rows, backend, chunk, protocol)
    judge = make_judge(args)
    counts = judge_records(records, datasets, protocol, judge) if judge is not None else {}
    table = summarize(records, names)
    summary = summaries(records, names, samplings, protocol, rules)
    for name in names:
        if "judge" in summary[name]:
            summary[name]["judge"].update(model=args.judge_model, **counts)
    write_outputs(args.out, records, table, title=f"{args.model}", summary=summary)
    return table


def make_judge(args: argparse.Namespace) -> Any:
    """The judge ``--judge-base-url`` / ``--judge-model`` describe, or None without them."""
    if not getattr(args, "judge_base_url", None):
        return None
    from calibrl_verl.protocols.judge import Judge, JudgeSettings

    cache = args.judge_cache or args.out / "judge_cache.jsonl"
    return Judge(JudgeSettings(args.judge_base_url, args.judge_model, Path(cache), args.judge_api_key_env,
                               args.judge_max_retries, args.judge_timeout, args.judge_concurrency))


def _one_rule_set(protocol: Protocol, rows: Sequence[Row], name: str) -> str:
    """The protocol's rule set for a benchmark file; a file mixing data sources graded differently is refused."""
    found = sorted({protocol.rules(r.data_source) for r in rows})
    if len(found) > 1:
        raise EvalError(f"{name}: rows need different {protocol.name} rule sets {found} (mixed data_source "
                        "values); evaluate each benchmark from its own file")
    return found[0] if found else ""


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        table = run(args)
    except (EvalError, GenerationError, ProtocolError, JudgeError, FatalEndpointError) as err:
        raise SystemExit(f"evaluate: error: {err}") from None
    print(markdown_table(table, args.model), end="")
    print(f"[evaluate] wrote {args.out}/results.md, results.csv, generations.jsonl, samples.parquet, summary.json",
          file=sys.stderr)


if __name__ == "__main__":
    main()
