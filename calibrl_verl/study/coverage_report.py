"""The coverage study's report: per-seed numbers, a table and plots from ``calibrl_verl.study.coverage``'s outputs.

    python -m calibrl_verl.study.coverage_report --study outputs/coverage_study --out docs/coverage_study

Writes into ``--out``:

* ``results.json``: the study's config; the SFT model's pass@k per split and temperature; per arm and seed the
  same at the end of RL, the problems newly covered, and the entropy and greedy-accuracy curves;
* ``results.md``: per arm (mean ± std over seeds) pass@1 and pass@K at T = 1 on RL-train and test, start and end,
  coverage on test, problems newly covered, entropy at the end, and the paired difference from GRPO on the same
  seed; then the guidance each arm applied (``GUIDANCE``, means over its training steps);
* ``pass_at_k.png`` (test, T = 1, start and every arm's end), ``temperature.png`` (test pass@1 against the sampling
  temperature), ``entropy.png`` (verl's ``actor/entropy`` over steps).

A problem is "covered" at K when its pass@K (1 - (1 - p)^K) is at least one half; "newly covered" counts test
problems covered at the end and not at the start.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from calibrl_verl.eval_metrics import expected_pass_at_k
from calibrl_verl.study.coverage import ARMS, BASELINE
from calibrl_verl.study.grid import read_run

T_MAIN = "1.0"
ENTROPY = "actor/entropy"
# the mechanism, per run: the mean over training steps of each (label, metric); arms that do not log one show n/a
GUIDANCE = (("on-policy accuracy", "calibrl/onpolicy_acc_mean"), ("rareness |A|", "calibrl/rareness_mean"),
            ("guide loss", "calibrl/guide_loss"), ("slope-1 share of the gate", "calibrl/gate_full_frac"))
COVERED = 0.5


def covered(logp: list[float], k: int) -> list[bool]:
    """Per problem: is pass@k >= ``COVERED``?"""
    return [expected_pass_at_k(math.exp(v), k) >= COVERED for v in logp]


def val_curve(steps: dict[int, dict[str, float]]) -> dict[int, float]:
    """verl's greedy validation accuracy (``val-core/calibrl_wall/acc/mean@1``) per logged step."""
    return {s: d[k] for s, d in steps.items() for k in d if k.startswith("val-core/") and k.endswith("/acc/mean@1")}


def run_summary(measure: dict[str, Any], start: dict[str, Any], steps: dict[int, dict[str, float]],
                k_cover: int) -> dict[str, Any]:
    """One run's figures: pass@k per split and temperature, newly covered test problems, curves."""
    before = covered(start["val"][T_MAIN]["logp"], k_cover)
    after = covered(measure["val"][T_MAIN]["logp"], k_cover)
    return {
        "pass@k": {split: {t: m["pass@k"] for t, m in measure[split].items()} for split in ("train", "val")},
        "newly_covered": sum(a and not b for a, b in zip(after, before, strict=True)),
        "lost": sum(b and not a for a, b in zip(after, before, strict=True)),
        "entropy": {s: d[ENTROPY] for s, d in steps.items() if ENTROPY in d},
        "val_greedy": val_curve(steps),
        "guidance": {key: statistics.mean(vals) for _, key in GUIDANCE
                     if (vals := [d[key] for s, d in steps.items() if s > 0 and key in d])},
    }


def collect(study: Path) -> dict[str, Any]:
    """Everything the report shows, read from the study folder."""
    cfg = json.loads((study / "study.json").read_text())
    start = json.loads((study / "start.json").read_text())
    k_cover = max(cfg["ks"])
    arms: dict[str, dict[str, Any]] = {}
    for path in sorted((study / "runs").glob("*/seed*/measure.json")):
        rdir = path.parent
        summary = run_summary(json.loads(path.read_text()), start, read_run(rdir), k_cover)
        arms.setdefault(rdir.parent.name, {})[rdir.name.removeprefix("seed")] = summary
    if not arms:
        raise FileNotFoundError(f"{study / 'runs'}: no run has a measure.json (run calibrl_verl.study.coverage)")
    start_summary = {split: {t: m["pass@k"] for t, m in start[split].items()} for split in ("train", "val")}
    return {"config": cfg, "k_cover": k_cover, "start": start_summary, "arms": arms}


def _stat(values: list[float], digits: int = 1) -> str:
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    """results.md: one row per arm, mean ± std over seeds."""
    k = str(results["k_cover"])
    k_mid = "64" if "64" in results["start"]["val"][T_MAIN] else k
    start = results["start"]
    head = (f"| arm | seeds | train pass@1 (start → end) | test pass@1 (start → end) | test pass@{k_mid} | "
            f"test coverage@{k} (start → end) | newly covered (lost) | entropy, end | test pass@1 − GRPO | "
            f"test coverage@{k} − GRPO |")
    lines = [head, "|" + "---|" * 10]
    base = results["arms"].get(BASELINE, {})
    for name, seeds in results["arms"].items():
        def per(split: str, kk: str, runs: dict[str, Any] = seeds) -> list[float]:
            return [r["pass@k"][split][T_MAIN][kk] for r in runs.values()]

        def paired(split: str, kk: str, runs: dict[str, Any] = seeds) -> list[float]:
            return [runs[s]["pass@k"][split][T_MAIN][kk] - base[s]["pass@k"][split][T_MAIN][kk]
                    for s in runs if s in base]

        ent = [r["entropy"][max(r["entropy"], key=int)] for r in seeds.values() if r["entropy"]]
        label = ARMS[name].label if name in ARMS else name
        lines.append(
            f"| {label} | {len(seeds)} | {start['train'][T_MAIN]['1']:.1f} → {_stat(per('train', '1'))} | "
            f"{start['val'][T_MAIN]['1']:.1f} → {_stat(per('val', '1'))} | {_stat(per('val', k_mid))} | "
            f"{start['val'][T_MAIN][k]:.1f} → {_stat(per('val', k))} | "
            f"{_stat([float(r['newly_covered']) for r in seeds.values()])} "
            f"(lost {_stat([float(r['lost']) for r in seeds.values()])}) | "
            f"{_stat(ent, 3)} | {_stat(paired('val', '1'))} | {_stat(paired('val', k))} |")
    return "\n".join(lines) + "\n\n" + guidance_table(results)


def guidance_table(results: dict[str, Any]) -> str:
    """The guidance each arm applied: per ``GUIDANCE`` metric, the mean over training steps (mean ± std over
    seeds)."""
    lines = ["| arm | " + " | ".join(label for label, _ in GUIDANCE) + " |", "|---|" + "---|" * len(GUIDANCE)]
    for name, seeds in results["arms"].items():
        cells = [_stat([r["guidance"][key] for r in seeds.values() if key in r.get("guidance", {})], 3)
                 for _, key in GUIDANCE]
        lines.append(f"| {ARMS[name].label if name in ARMS else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_curve(seeds: dict[str, Any], get: Any) -> tuple[list[float], list[float]]:
        curves = [get(r) for r in seeds.values()]
        xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        return [float(x) for x in xs], [statistics.mean(c[x] for c in curves) for x in xs]

    fig, ax = plt.subplots(figsize=(6, 4))
    start = results["start"]["val"][T_MAIN]
    ks = sorted(start, key=int)
    ax.plot([int(k) for k in ks], [start[k] for k in ks], "k--", label="SFT (start)")
    for name, seeds in results["arms"].items():
        xs, ys = mean_curve(seeds, lambda r: {int(k): v for k, v in r["pass@k"]["val"][T_MAIN].items()})
        ax.plot(xs, ys, marker="o", label=ARMS[name].label if name in ARMS else name)
    ax.set(xscale="log", xlabel="k", ylabel="pass@k (%)", title="test split, T = 1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    temps = sorted(results["start"]["val"], key=float)
    ax.plot([float(t) for t in temps], [results["start"]["val"][t]["1"] for t in temps], "k--", label="SFT (start)")
    for name, seeds in results["arms"].items():
        xs, ys = mean_curve(seeds, lambda r: {float(t): m["1"] for t, m in r["pass@k"]["val"].items()})
        ax.plot(xs, ys, marker="o", label=ARMS[name].label if name in ARMS else name)
    ax.set(xlabel="sampling temperature", ylabel="pass@1 (%)", title="test split")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "temperature.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, seeds in results["arms"].items():
        xs, ys = mean_curve(seeds, lambda r: {int(s): v for s, v in r["entropy"].items()})
        ax.plot(xs, ys, label=ARMS[name].label if name in ARMS else name)
    ax.set(xlabel="step", ylabel="token entropy (actor/entropy)", title="policy entropy over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "entropy.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("outputs/coverage_study"))
    parser.add_argument("--out", type=Path, default=Path("docs/coverage_study"))
    args = parser.parse_args(argv)
    results = collect(args.study)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(table(results))
    plots(results, args.out)
    print(f"[coverage] report in {args.out}: results.md, results.json, pass_at_k.png, temperature.png, entropy.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
