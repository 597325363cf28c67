"""Compare evaluation runs side by side, next to published numbers, and draw their pass@k curves.

    python -m calibrl_verl.evaluate_compare RUN_DIR [RUN_DIR ...] [--names base grpo calibrl]
        [--metric accuracy|pass@K|maj@K|coverage] [--benchmarks NAME ...] [--out DIR]
        [--references FILE] [--reference-model NAME | --no-references]

Each RUN_DIR is an output folder of ``python -m calibrl_verl.evaluate``; only its ``summary.json`` is read (per
benchmark: n_samples, protocol, temperature, top_p, accuracy, ``pass@k`` {k: value}, ``maj@K``, coverage). Written
to ``--out`` (default ``eval_results/comparison``):

* ``comparison.md``: one markdown table, a row per benchmark and a column per run (``--names``, default the folder
  names), plus a column of published numbers for the base model (``--reference-model``, default the first model of
  the references file) with a footnote per number giving its source and whether it was checked in that source.
  The title names the metric; the lines under it state the protocol, K (samples per problem) and temperature.
  A benchmark whose runs were measured with a different protocol, K, temperature or top_p gets a footnote listing
  each run's settings: such numbers are shown, never silently mixed.
* ``comparison.csv``: the same cells (2 decimals), with the reference's source, its verified flag and the
  comparability note per benchmark.
* ``passk_<benchmark>.png``: pass@k against k (log2 axis), one line per run that drew K > 1 samples; runs with
  K = 1 have no curve and are named as skipped (in comparison.md and on stderr).

``--metric``: ``accuracy`` (greedy accuracy for K = 1, mean@K for K > 1), ``pass@N`` / ``maj@N`` for a number N
(a run that did not report it shows ``n/a``, footnoted), ``pass@K`` / ``maj@K`` with a literal K for each run's own
K, or ``coverage``. Benchmarks: every benchmark of any run (``--benchmarks`` picks some); a run lacking one is an
error naming its folder.

References (``calibrl_verl/data/references.yaml``, or ``--references FILE`` in the same layout): per benchmark
split, the aliases under which runs may name it (matched loosely: case, punctuation and a folder prefix ignored);
per model and benchmark, value, metric, source, ``verified`` and the evidence read. Published numbers come from their
authors' prompts and graders, not this repository's protocol: context, not a like-for-like comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_REFERENCES = Path(__file__).parent / "data" / "references.yaml"
DEFAULT_OUT = Path("eval_results") / "comparison"
SETTING_KEYS = ("protocol", "n_samples", "temperature", "top_p")  # what must agree for numbers to be comparable
MISSING = "n/a"


class CompareError(Exception):
    """A user-facing problem with the inputs (missing folder, benchmark, key, ...): reported without a traceback."""


# ------------------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """One evaluation folder: its display name and its summary.json (benchmark -> figures)."""

    name: str
    folder: Path
    summary: dict[str, dict[str, Any]]


def load_run(folder: Path, name: str) -> Run:
    """The run's ``summary.json``; clear errors for a missing folder, file or malformed content."""
    if not folder.is_dir():
        raise CompareError(f"run folder {folder} does not exist")
    path = folder / "summary.json"
    if not path.is_file():
        raise CompareError(f"run folder {folder} has no summary.json (written by python -m calibrl_verl.evaluate)")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CompareError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(summary, dict) or not all(isinstance(v, dict) for v in summary.values()):
        raise CompareError(f"{path}: expected an object mapping benchmark names to their figures")
    for benchmark, figures in summary.items():
        if not isinstance(figures.get("n_samples"), int) or figures["n_samples"] < 1:
            raise CompareError(f"{path}: benchmark {benchmark!r} has no integer n_samples >= 1")
        passk = figures.get("pass@k", {})
        if not isinstance(passk, dict) or not all(str(k).isdigit() for k in passk):
            raise CompareError(f"{path}: benchmark {benchmark!r}: 'pass@k' must map integer k to values, got {passk!r}")
    return Run(name=name, folder=folder, summary=summary)


def run_names(folders: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    """``--names`` (one per folder) or the folder names; they must be distinct."""
    if names is not None and len(names) != len(folders):
        raise CompareError(f"--names gives {len(names)} name(s) for {len(folders)} run folder(s)")
    chosen = list(names) if names is not None else [Path(f).resolve().name for f in folders]
    duplicates = sorted({n for n in chosen if chosen.count(n) > 1})
    if duplicates:
        raise CompareError(f"two runs are named {duplicates}: give distinct --names")
    return chosen


def select_benchmarks(runs: Sequence[Run], wanted: Sequence[str] | None) -> list[str]:
    """The benchmarks to compare (every run's, in first-seen order, or ``wanted``); every run must have each."""
    benchmarks = list(wanted) if wanted else list(dict.fromkeys(b for run in runs for b in run.summary))
    for run in runs:
        missing = [b for b in benchmarks if b not in run.summary]
        if missing:
            raise CompareError(f"run folder {run.folder} ({run.name}) lacks benchmark(s) {missing}; its summary.json "
                               f"has {sorted(run.summary)} (pick shared ones with --benchmarks)")
    return benchmarks


# ----------------------------------------------------------------------------------------------------- metric


@dataclass(frozen=True)
class Metric:
    """What a cell shows: ``kind`` accuracy | pass | maj | coverage; ``k`` a number, or None for each run's own K."""

    kind: str
    k: int | None = None
    judge: bool = False  # the judge's verdicts (evaluate --protocol community --judge-*) instead of the rules'

    @property
    def label(self) -> str:
        name = self.kind if self.kind in ("accuracy", "coverage") else f"{self.kind}@{self.k or 'K'}"
        return f"judge:{name}" if self.judge else name


METRIC_PATTERN = re.compile(r"^(judge:)?(accuracy|coverage|(pass|maj)@(\d+|K))$")


def parse_metric(text: str) -> Metric:
    match = METRIC_PATTERN.match(text.strip())
    if not match:
        raise CompareError(f"--metric {text!r}: expected accuracy, coverage, pass@N, maj@N (N a number) or pass@K / "
                           "maj@K (each run's own K), each optionally prefixed with judge:")
    judge = match.group(1) is not None
    if match.group(3) is None:
        return Metric(match.group(2), judge=judge)
    k = None if match.group(4) == "K" else int(match.group(4))
    if k is not None and k < 1:
        raise CompareError(f"--metric {text!r}: k must be >= 1")
    return Metric(match.group(3), k, judge)


def metric_description(metric: Metric) -> str:
    if metric.judge:
        return f"{_plain_description(metric)}; graded by the model judge (MathVista, MathVerse)"
    return _plain_description(metric)


def _plain_description(metric: Metric) -> str:
    if metric.kind == "accuracy":
        return "accuracy: greedy accuracy for runs with K = 1 sample per problem, mean@K (avg@K) for K > 1"
    if metric.kind == "coverage":
        return "coverage: share of problems solved by at least one of the K samples (= pass@K)"
    k = "each run's own K" if metric.k is None else f"k = {metric.k}"
    if metric.kind == "pass":
        return f"pass@k, Chen et al.'s unbiased estimator from the K samples per problem, {k}"
    return f"maj@k: the most frequent extracted answer of the K samples is correct, {k}"


def metric_value(figures: Mapping[str, Any], metric: Metric) -> tuple[float | None, str | None]:
    """The run's value of ``metric`` on one benchmark, or (None, why it is not available)."""
    if metric.judge:
        if not isinstance(figures.get("judge"), Mapping):
            return None, "no judge verdicts (evaluated without --judge-*, or a benchmark the judge does not grade)"
        figures = figures["judge"]
    n = figures["n_samples"]
    if metric.kind in ("accuracy", "coverage"):
        value = figures.get(metric.kind)
        return (float(value), None) if isinstance(value, int | float) else (None, f"no {metric.kind!r} key")
    k = n if metric.k is None else metric.k
    if metric.kind == "maj":
        value = figures.get(f"maj@{k}")
        if isinstance(value, int | float):
            return float(value), None
        return None, f"maj@{k} not reported (it reports maj@{n} only)"
    table = figures.get("pass@k") or {}
    if str(k) in table:
        return float(table[str(k)]), None
    return None, f"pass@{k} not reported (reported k: {', '.join(sorted(table, key=int)) or 'none'})"


# ------------------------------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Reference:
    """One published number and where it comes from."""

    model: str
    benchmark: str
    split: str
    value: float
    metric: str
    source: str
    verified: bool
    evidence: str


def normalize(name: str) -> str:
    """Loose benchmark-name key: the last path part, lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.rsplit("/", 1)[-1].lower())


def load_references(path: Path) -> dict[str, Any]:
    """The references YAML, checked: ``benchmarks`` (split, aliases) and ``models`` (entries per benchmark)."""
    import yaml

    if not path.is_file():
        raise CompareError(f"--references: no such file: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    benchmarks, models = data.get("benchmarks"), data.get("models")
    if not isinstance(benchmarks, dict) or not isinstance(models, dict):
        raise CompareError(f"{path}: expected top-level mappings 'benchmarks' and 'models'")
    owner: dict[str, str] = {}
    for key, spec in benchmarks.items():
        aliases = (spec or {}).get("aliases") if isinstance(spec, dict) else None
        if not isinstance(aliases, list) or not aliases:
            raise CompareError(f"{path}: benchmarks.{key} needs a non-empty 'aliases' list")
        for alias in [key, *aliases]:
            other = owner.setdefault(normalize(str(alias)), key)
            if other != key:
                raise CompareError(f"{path}: alias {alias!r} of benchmarks.{key} also names benchmarks.{other}")
    for model, entries in models.items():
        for key, entry in (entries or {}).items():
            _check_entry(path, model, key, entry, benchmarks)
    return data


def _check_entry(path: Path, model: str, key: str, entry: Any, benchmarks: Mapping[str, Any]) -> None:
    where = f"{path}: models.{model}.{key}"
    if key not in benchmarks:
        raise CompareError(f"{where}: {key!r} is not under 'benchmarks' (known: {sorted(benchmarks)})")
    if not isinstance(entry, dict):
        raise CompareError(f"{where}: expected a mapping with value, metric, source, verified")
    if not isinstance(entry.get("value"), int | float) or isinstance(entry.get("value"), bool):
        raise CompareError(f"{where}: 'value' must be a number (percent), got {entry.get('value')!r}")
    for field in ("metric", "source"):
        if not isinstance(entry.get(field), str) or not entry[field].strip():
            raise CompareError(f"{where}: {field!r} must be a non-empty string")
    if not isinstance(entry.get("verified"), bool):
        raise CompareError(f"{where}: 'verified' must be true or false, got {entry.get('verified')!r}")


def reference_for(data: Mapping[str, Any], model: str, benchmark: str) -> Reference | None:
    """The published number of ``model`` on the benchmark a run calls ``benchmark`` (alias match), if any."""
    wanted = normalize(benchmark)
    for key, spec in data["benchmarks"].items():
        if wanted in {normalize(str(a)) for a in [key, *spec["aliases"]]}:
            entry = (data["models"].get(model) or {}).get(key)
            if entry is None:
                return None
            return Reference(model=model, benchmark=key, split=str(spec.get("split", key)),
                             value=float(entry["value"]), metric=entry["metric"], source=entry["source"],
                             verified=entry["verified"], evidence=" ".join(str(entry.get("evidence", "")).split()))
    return None


# ------------------------------------------------------------------------------------------------ comparison


def settings_of(figures: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(figures.get(key) for key in SETTING_KEYS)


def describe_settings(settings: Sequence[Any]) -> str:
    protocol, n, temperature, top_p = settings
    how = "greedy" if n == 1 and temperature in (0, 0.0) else f"temperature {_num(temperature)}, top_p {_num(top_p)}"
    return f"protocol {protocol if protocol is not None else '?'}, K = {n}, {how}"


def _num(value: Any) -> str:
    return "?" if value is None else f"{value:g}" if isinstance(value, int | float) else str(value)


def mismatch_note(runs: Sequence[Run], benchmark: str) -> str | None:
    """When the runs measured ``benchmark`` with different settings: each run's settings, else None."""
    settings = [settings_of(run.summary[benchmark]) for run in runs]
    if len(set(settings)) <= 1:
        return None
    each = "; ".join(f"{run.name}: {describe_settings(s)}" for run, s in zip(runs, settings, strict=True))
    return f"NOT COMPARABLE: the runs used different protocol / K / temperature / top_p ({each})."


@dataclass
class Comparison:
    """The table's content: cells per benchmark, notes, and the reference per benchmark."""

    metric: Metric
    runs: list[Run]
    benchmarks: list[str]
    cells: dict[str, list[float | None]]
    missing: dict[str, list[str]]  # benchmark -> why some cells are n/a
    mismatches: dict[str, str]
    references: dict[str, Reference | None]
    reference_model: str | None


def compare(runs: Sequence[Run], benchmarks: Sequence[str], metric: Metric, references: Mapping[str, Any] | None,
            reference_model: str | None) -> Comparison:
    cells: dict[str, list[float | None]] = {}
    missing: dict[str, list[str]] = {}
    for benchmark in benchmarks:
        values = [metric_value(run.summary[benchmark], metric) for run in runs]
        cells[benchmark] = [v for v, _ in values]
        reasons = [f"{run.name}: {why}" for run, (_, why) in zip(runs, values, strict=True) if why]
        if reasons:
            missing[benchmark] = reasons
    mismatches = {b: note for b in benchmarks if (note := mismatch_note(runs, b))}
    refs = {b: reference_for(references, reference_model, b) if references and reference_model else None
            for b in benchmarks}
    return Comparison(metric, list(runs), list(benchmarks), cells, missing, mismatches, refs, reference_model)


def uniform_settings(comparison: Comparison) -> tuple[Any, ...] | None:
    """The settings every run used on every benchmark, or None when they differ anywhere."""
    settings = {settings_of(run.summary[b]) for run in comparison.runs for b in comparison.benchmarks}
    return settings.pop() if len(settings) == 1 else None


# ----------------------------------------------------------------------------------------------------- output


def _cell(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def markdown(comparison: Comparison, skipped_curves: Sequence[str] = ()) -> str:
    """comparison.md: title naming the metric, the settings, one table, then the footnotes."""
    metric = comparison.metric
    lines = [f"# {metric.label} (%) by benchmark", "", f"Metric: {metric_description(metric)}; percent."]
    uniform = uniform_settings(comparison)
    if uniform is not None:
        lines.append(f"Settings (every run, every benchmark): {describe_settings(uniform)}.")
    else:
        lines.append("Settings differ between runs or benchmarks (flagged rows below):")
        for run in comparison.runs:
            per = {describe_settings(settings_of(run.summary[b])) for b in comparison.benchmarks}
            lines.append(f"- {run.name}: " + (per.pop() if len(per) == 1 else "; ".join(
                f"{b}: {describe_settings(settings_of(run.summary[b]))}" for b in comparison.benchmarks)))
    lines.append("Runs: " + ", ".join(f"{run.name} = `{run.folder}`" for run in comparison.runs) + ".")
    lines.append("")
    notes: list[str] = []
    header = [f"benchmark ({metric.label}, %)", *(run.name for run in comparison.runs)]
    with_refs = comparison.reference_model is not None
    if with_refs:
        header.append(f"{comparison.reference_model} (published)")
    lines += ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for benchmark in comparison.benchmarks:
        name = benchmark
        row_notes = _row_notes(comparison, benchmark)
        if row_notes:
            notes.append(f"{benchmark}: " + " ".join(row_notes))
            name += f" [^{len(notes)}]"
        row = [name, *(_cell(v) for v in comparison.cells[benchmark])]
        if with_refs:
            row.append(_reference_cell(comparison.references[benchmark], notes))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += _reference_summary(comparison, metric)
    if skipped_curves:
        lines.append("pass@k curves: " + "; ".join(skipped_curves) + ".")
    if notes:
        lines.append("")
        lines += [f"[^{i}]: {note}" for i, note in enumerate(notes, start=1)]
    return "\n".join(lines) + "\n"


def _row_notes(comparison: Comparison, benchmark: str) -> list[str]:
    """Why a row needs a footnote: runs measured differently, cells not available."""
    notes = [comparison.mismatches[benchmark]] if benchmark in comparison.mismatches else []
    if benchmark in comparison.missing:
        notes.append("n/a: " + "; ".join(comparison.missing[benchmark]) + ".")
    return notes


def _reference_cell(reference: Reference | None, notes: list[str]) -> str:
    if reference is None:
        return "—"
    status = "verified in the source" if reference.verified else "UNVERIFIED: not found in the source text"
    notes.append(f"{reference.model}, {reference.split}: {reference.value:g} ({reference.metric}); source: "
                 f"{reference.source}; {status}. {reference.evidence}".rstrip())
    mark = "" if reference.verified else " (unverified)"
    return f"{reference.value:.1f}{mark} [^{len(notes)}]"


def _reference_summary(comparison: Comparison, metric: Metric) -> list[str]:
    if comparison.reference_model is None:
        return []
    shown = [r for r in comparison.references.values() if r is not None]
    lines = [f"Published column: {comparison.reference_model}'s numbers as reported by their authors, with their "
             "own prompts and answer extraction, not this repository's protocol: context, not a like-for-like "
             "comparison. A dash: no published number for that benchmark split in the references file."]
    unverified = [f"{r.benchmark} ({r.value:g})" for r in shown if not r.verified]
    if unverified:
        lines.append("Unverified published numbers (claimed, not found in the cited source): "
                     + ", ".join(unverified) + ".")
    other = sorted({r.metric for r in shown if r.metric != metric.label})
    if other:
        lines.append(f"The published numbers are {', '.join(other)}, not {metric.label}.")
    return lines


CSV_FIXED = ("reference", "reference_verified", "reference_source", "comparable")


def write_csv(path: Path, comparison: Comparison) -> None:
    names = [run.name for run in comparison.runs]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["benchmark", "metric", *names, *CSV_FIXED])
        for benchmark in comparison.benchmarks:
            ref = comparison.references[benchmark]
            writer.writerow([
                benchmark, comparison.metric.label,
                *(MISSING if v is None else f"{v:.2f}" for v in comparison.cells[benchmark]),
                "" if ref is None else f"{ref.value:.2f}", "" if ref is None else str(ref.verified).lower(),
                "" if ref is None else ref.source,
                "no: " + comparison.mismatches[benchmark] if benchmark in comparison.mismatches else "yes",
            ])


def curve_points(figures: Mapping[str, Any]) -> list[tuple[int, float]]:
    """(k, pass@k) pairs of one benchmark, k ascending."""
    table = figures.get("pass@k") or {}
    return sorted((int(k), float(v)) for k, v in table.items())


def plot_passk(runs: Sequence[Run], benchmarks: Sequence[str], out: Path) -> tuple[list[Path], list[str]]:
    """``passk_<benchmark>.png`` per benchmark with a K > 1 run; returns the files and what was skipped (why)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, skipped = [], []
    single = [run.name for run in runs if any(run.summary[b]["n_samples"] == 1 for b in benchmarks)]
    if single:
        skipped.append(f"no curve for {', '.join(single)} (K = 1: a single greedy or sampled answer)")
    for benchmark in benchmarks:
        sampled = [run for run in runs if run.summary[benchmark]["n_samples"] > 1]
        if not sampled:
            skipped.append(f"no plot for {benchmark} (no run drew K > 1 samples)")
            continue
        fig, ax = plt.subplots(figsize=(5.0, 3.6))
        for run in sampled:
            points = curve_points(run.summary[benchmark])
            ax.plot([k for k, _ in points], [v for _, v in points], marker="o",
                    label=f"{run.name} (K = {run.summary[benchmark]['n_samples']})")
        ax.set_xscale("log", base=2)
        ks = sorted({k for run in sampled for k, _ in curve_points(run.summary[benchmark])})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (samples)")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(f"{benchmark}: pass@k", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"passk_{re.sub(r'[^A-Za-z0-9_.-]', '_', benchmark)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written, skipped


# --------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m calibrl_verl.evaluate_compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of python -m calibrl_verl.evaluate")
    parser.add_argument("--names", nargs="+", default=None, help="column name per run [folder names]")
    parser.add_argument("--metric", default="accuracy",
                        help="accuracy | pass@N | maj@N | pass@K | maj@K | coverage; judge:<metric> for the judge's")
    parser.add_argument("--benchmarks", nargs="+", default=None, help="benchmarks to compare [every run's]")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder [{DEFAULT_OUT}]")
    parser.add_argument("--references", type=Path, default=DEFAULT_REFERENCES, help="published numbers (YAML)")
    parser.add_argument("--reference-model", default=None, help="model of the published column [the file's first]")
    parser.add_argument("--no-references", action="store_true", help="leave the published column out")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Comparison:
    metric = parse_metric(args.metric)
    names = run_names(args.runs, args.names)
    runs = [load_run(folder, name) for folder, name in zip(args.runs, names, strict=True)]
    benchmarks = select_benchmarks(runs, args.benchmarks)
    references, model = None, None
    if not args.no_references:
        references = load_references(args.references)
        model = args.reference_model or next(iter(references["models"]), None)
        if model not in references["models"]:
            raise CompareError(f"--reference-model {model!r} is not in {args.references} "
                               f"(models: {sorted(references['models'])})")
    comparison = compare(runs, benchmarks, metric, references, model)
    args.out.mkdir(parents=True, exist_ok=True)
    plots, skipped = plot_passk(runs, benchmarks, args.out)
    (args.out / "comparison.md").write_text(markdown(comparison, skipped))
    write_csv(args.out / "comparison.csv", comparison)
    for line in skipped:
        print(f"[evaluate_compare] pass@k: {line}", file=sys.stderr)
    print(f"[evaluate_compare] wrote {args.out}/comparison.md, comparison.csv"
          + "".join(f", {p.name}" for p in plots), file=sys.stderr)
    return comparison


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except CompareError as err:
        raise SystemExit(f"evaluate_compare: error: {err}") from None
    print((args.out / "comparison.md").read_text(), end="")


if __name__ == "__main__":
    main()
