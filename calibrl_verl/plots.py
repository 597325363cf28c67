"""Training curves from verl's file logger: ``python -m calibrl_verl.plots run.jsonl [more.jsonl] --out curves.png``.

verl's ``trainer.logger=[file]`` writes one JSON object per step, ``{"step": s, "data": {metric: value}}``
(``VERL_FILE_LOGGER_PATH`` chooses the file). This draws the curves that show what the guidance does:
reward, guide loss, gate fraction and on-policy entropy, one line per run file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_PANELS = (
    ("critic/score/mean", "reward (on-policy mean)"),
    ("calibrl/guide_loss", "guide loss"),
    ("calibrl/gate_full_frac", "gate: share on the slope-1 side"),
    ("actor/entropy", "entropy (on-policy)"),
)


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Per metric, the (step, value) pairs of a verl file-logger JSONL file; bad lines name the file and line."""
    series: dict[str, list[tuple[int, float]]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step, data = int(record["step"]), record["data"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a verl file-logger record ({err})") from err
        for key, value in data.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_runs(runs: dict[str, dict[str, list[tuple[int, float]]]], out: str | Path,
              panels: tuple[tuple[str, str], ...] = DEFAULT_PANELS) -> Path:
    """One panel per metric, one line per run; a metric a run did not log is left out of that panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for label, series in runs.items():
            points = series.get(key)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="verl file-logger JSONL files (one per run)")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    runs = {Path(f).stem: read_metrics(f) for f in args.files}
    out = plot_runs(runs, args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
