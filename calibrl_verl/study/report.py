"""The toy study's report: plots and a markdown table from the grid's logs.

    python -m calibrl_verl.study.report --study outputs/toy_study --out docs/toy_study [--target 0.6]

Reads every ``runs/<method>/seed<k>`` of a study (``calibrl_verl.study.grid``), merges each run's launches by
step, and writes into ``--out``:

* ``accuracy.png``, ``entropy.png``, ``guide_loss.png``, ``gate_fraction.png``, ``train_reward.png``: one line
  per method (the mean over seeds) with a band from the lowest to the highest seed;
* ``results.md``: per method, held-out accuracy at the start and the end, entropy at the end, steps to reach
  the target accuracy, train reward at the end, wall time, and the end accuracy minus GRPO's on the same seed
  (a paired difference); ``results.json``: the same numbers, per seed too.

Held-out accuracy is verl's validation metric (greedy decoding over the whole val split). "At the end" for
the per-step training metrics is the mean of the last ``END_WINDOW`` steps, which is less noisy than one step.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from calibrl_verl.study.grid import METHODS, read_run

END_WINDOW = 4
BASELINE = "grpo"
ENTROPY = "actor/entropy"
TRAIN_REWARD = "critic/score/mean"
GUIDE_LOSS = "calibrl/guide_loss"
GATE = "calibrl/gate_full_frac"
# (file stem, metric, title); "val" is resolved per study to verl's validation accuracy key
FIGURES = (
    ("accuracy", "val", "held-out accuracy (greedy, val split)"),
    ("entropy", ENTROPY, "policy entropy (on-policy tokens)"),
    ("guide_loss", GUIDE_LOSS, "CalibRL guide loss"),
    ("gate_fraction", GATE, "gate: share of tokens on the slope-1 side"),
    ("train_reward", TRAIN_REWARD, "train reward (on-policy mean)"),
)

Series = dict[int, float]


def val_key(steps: dict[int, dict[str, float]]) -> str:
    """verl's validation accuracy key in a run (``val-core/<data_source>/acc/mean@1``), reward as fallback."""
    keys = {k for data in steps.values() for k in data if k.startswith("val-core/")}
    for suffix in ("/acc/mean@1", "/reward/mean@1"):
        found = sorted(k for k in keys if k.endswith(suffix))
        if found:
            return found[0]
    raise ValueError(f"no validation accuracy logged (val-core/*/acc/mean@1); val keys seen: {sorted(keys)}")


def series(steps: dict[int, dict[str, float]], key: str) -> Series:
    """One metric over steps, finite values only."""
    return {s: float(d[key]) for s, d in steps.items() if key in d and math.isfinite(float(d[key]))}


def load_study(study: Path) -> dict[str, dict[int, dict[int, dict[str, float]]]]:
    """method -> seed -> merged per-step metrics, for every run directory that logged anything."""
    runs: dict[str, dict[int, dict[int, dict[str, float]]]] = {}
    for rdir in sorted((study / "runs").glob("*/seed*")):
        steps = read_run(rdir)
        if steps:
            runs.setdefault(rdir.parent.name, {})[int(rdir.name.removeprefix("seed"))] = steps
    if not runs:
        raise FileNotFoundError(f"{study / 'runs'}: no run logged any step (run calibrl_verl.study.grid first)")
    return dict(sorted(runs.items(), key=lambda kv: list(METHODS).index(kv[0]) if kv[0] in METHODS else 99))


def end_mean(values: Series, window: int = END_WINDOW) -> float | None:
    """Mean of the last ``window`` logged values (None when nothing was logged)."""
    tail = [values[s] for s in sorted(values)[-window:]]
    return sum(tail) / len(tail) if tail else None


def steps_to(values: Series, target: float) -> int | None:
    """First step whose value reaches ``target`` (None if never)."""
    return next((s for s in sorted(values) if values[s] >= target - 1e-9), None)


def seed_summary(steps: dict[int, dict[str, float]], acc_key: str, target: float) -> dict[str, Any]:
    """The per-seed numbers of the table."""
    acc = series(steps, acc_key)
    first, last = (acc[min(acc)], acc[max(acc)]) if acc else (None, None)
    return {
        "acc_start": first, "acc_end": last, "acc_best": max(acc.values()) if acc else None,
        "steps_to_target": steps_to(acc, target), "entropy_end": end_mean(series(steps, ENTROPY)),
        "reward_end": end_mean(series(steps, TRAIN_REWARD)), "guide_loss_end": end_mean(series(steps, GUIDE_LOSS)),
        "last_step": max(steps),
    }


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(runs: dict[str, dict[int, dict[int, dict[str, float]]]], acc_key: str, target: float,
              seconds: dict[str, list[float]]) -> dict[str, Any]:
    """Per method: per-seed numbers and their mean/std (``steps_to_target`` as the median of reached seeds)."""
    out: dict[str, Any] = {}
    for method, seeds in runs.items():
        per_seed = {seed: seed_summary(steps, acc_key, target) for seed, steps in seeds.items()}
        row: dict[str, Any] = {"seeds": sorted(per_seed), "per_seed": per_seed}
        for key in ("acc_start", "acc_end", "acc_best", "entropy_end", "reward_end", "guide_loss_end"):
            row[key] = _mean_std([s[key] for s in per_seed.values()])
        reached = [s["steps_to_target"] for s in per_seed.values() if s["steps_to_target"] is not None]
        row["steps_to_target"] = statistics.median(reached) if reached else None
        row["reached_target"] = len(reached)
        row["seconds_per_run"] = statistics.fmean(seconds[method]) if seconds.get(method) else None
        out[method] = row
    for row in out.values():
        row["acc_end_vs_baseline"] = _paired_difference(row["per_seed"], out.get(BASELINE, {}).get("per_seed", {}))
    return out


def _paired_difference(per_seed: dict[int, dict], baseline: dict[int, dict]) -> tuple[float | None, float | None]:
    """Mean (and std) over shared seeds of end accuracy minus the baseline's with the same seed.

    Runs with the same seed share the data order and the rollout seeds (the CPU rollout seeds every request
    from its content), so they start from the same samples and a paired difference isolates the method.
    """
    diffs = [per_seed[s]["acc_end"] - baseline[s]["acc_end"] for s in sorted(set(per_seed) & set(baseline))
             if per_seed[s]["acc_end"] is not None and baseline[s]["acc_end"] is not None]
    return _mean_std(diffs)


def _fmt(pair: tuple[float | None, float | None], pct: bool = False) -> str:
    mean, std = pair
    if mean is None:
        return "n/a"
    scale = 100.0 if pct else 1.0
    digits = 1 if pct else 3
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown_table(summary: dict[str, Any], target: float) -> str:
    """The results table (mean ± std over seeds)."""
    head = ("| method | seeds | held-out acc, start (%) | held-out acc, end (%) | best (%) | entropy, end | "
            f"steps to {target * 100:.0f}% (median, reached) | train reward, end | guide loss, end | s/run | "
            "end acc minus GRPO's, same seed (points) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, row in summary.items():
        label = METHODS[method].label if method in METHODS else method
        reach = (f"{row['steps_to_target']:g} ({row['reached_target']}/{len(row['seeds'])})"
                 if row["steps_to_target"] is not None else f"not reached (0/{len(row['seeds'])})")
        secs = f"{row['seconds_per_run']:.0f}" if row["seconds_per_run"] else "n/a"
        lines.append(f"| {label} | {len(row['seeds'])} | {_fmt(row['acc_start'], True)} | "
                     f"{_fmt(row['acc_end'], True)} | {_fmt(row['acc_best'], True)} | {_fmt(row['entropy_end'])} | "
                     f"{reach} | {_fmt(row['reward_end'])} | {_fmt(row['guide_loss_end'])} | {secs} | "
                     f"{_fmt(row['acc_end_vs_baseline'], True)} |")
    return "\n".join(lines) + "\n"


def _band(per_seed: list[Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps logged by every seed, with the mean, min and max over seeds there."""
    common = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    vals = [[s[step] for s in per_seed] for step in common]
    return common, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot_metric(runs: dict[str, dict[int, dict[int, dict[str, float]]]], key: str, title: str, out: Path) -> bool:
    """One figure: per method the mean over seeds and a min-max band; False when no method logged ``key``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    drawn = False
    for i, (method, seeds) in enumerate(runs.items()):
        steps, mean, low, high = _band([series(s, key) for s in seeds.values()])
        if not steps:
            continue
        colour = plt.get_cmap("tab10")(i % 10)
        label = METHODS[method].label if method in METHODS else method
        ax.plot(steps, mean, marker="o", markersize=3, color=colour, label=f"{label} (n={len(seeds)})")
        ax.fill_between(steps, low, high, color=colour, alpha=0.12)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_title(f"{title}\nmean over seeds, band = min..max", fontsize=10)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _seconds(study: Path) -> dict[str, list[float]]:
    """Wall seconds of each finished run (all its launches), per method."""
    secs: dict[str, list[float]] = {}
    for done in sorted((study / "runs").glob("*/seed*/done.json")):
        secs.setdefault(done.parent.parent.name, []).append(float(json.loads(done.read_text())["seconds"]))
    return secs


def default_target(runs: dict[str, dict[int, dict[int, dict[str, float]]]], acc_key: str) -> float:
    """Mean held-out accuracy at step 0 over all runs, plus 10 points: 'how fast does a method gain 10 points'."""
    starts = [series(steps, acc_key) for seeds in runs.values() for steps in seeds.values()]
    firsts = [s[min(s)] for s in starts if s]
    return round(statistics.fmean(firsts) + 0.10, 3) if firsts else 0.5


def write_report(study: Path, out: Path, target: float | None = None) -> dict[str, Any]:
    """Write the figures, results.md and results.json; returns the summary."""
    runs = load_study(study)
    acc_key = val_key(next(iter(next(iter(runs.values())).values())))
    target = default_target(runs, acc_key) if target is None else target
    summary = summarise(runs, acc_key, target, _seconds(study))
    out.mkdir(parents=True, exist_ok=True)
    figures = [f"{stem}.png" for stem, key, title in FIGURES
               if plot_metric(runs, acc_key if key == "val" else key, title, out / f"{stem}.png")]
    config = json.loads((study / "study.json").read_text()) if (study / "study.json").exists() else {}
    (out / "results.md").write_text(
        f"Held-out accuracy: `{acc_key}` (greedy). Target for 'steps to': {target * 100:.0f}% "
        f"(step-0 mean + 10 points unless set). End = mean of the last {END_WINDOW} steps.\n\n"
        + markdown_table(summary, target))
    (out / "results.json").write_text(json.dumps(
        {"acc_key": acc_key, "target": target, "config": config, "figures": figures, "methods": summary},
        indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("outputs/toy_study"), help="the grid's --out")
    parser.add_argument("--out", type=Path, default=Path("docs/toy_study"))
    parser.add_argument("--target", type=float, help="accuracy for 'steps to target' (default: step-0 mean + 0.10)")
    args = parser.parse_args(argv)
    write_report(args.study, args.out, args.target)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
