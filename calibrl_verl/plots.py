"""Training curves from what a run logs, across restarts:

    python -m calibrl_verl.plots RUN [RUN ...] [--out curves.png]

Each ``RUN`` is verl's file-logger JSONL (``trainer.logger=[file]``: one ``{"step": s, "data": {metric: value}}``
per line, at ``VERL_FILE_LOGGER_PATH``) or a tensorboard folder (``trainer.logger=[tensorboard]``, as the GPU
recipes log: ``TENSORBOARD_DIR``, default ``tensorboard_log/<project>/<experiment>``). A resumed run writes into
the same JSONL (``calibrl_verl.integration.tracking``) or a new event file in the same folder; either way each
metric becomes one curve over all steps, the resumed launch's values replacing the killed launch's from the
step it restarted at. The panels show what the guidance does: reward, guide loss, gate fraction and on-policy
entropy, one line per run. ``--out`` defaults to ``curves.png`` in the (first) run's folder.
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
EVENT_FILES = "events.out.tfevents.*"

Series = dict[str, list[tuple[int, float]]]


def merge_launches(launches: list[Series]) -> Series:
    """One series per metric, by step, from what a run's launches logged, in launch order.

    A launch that starts logging at step ``m`` has resumed from a checkpoint at ``m`` or ``m - 1`` and logs
    every later step again, so it replaces what earlier launches logged at steps after ``m``; at ``m`` itself
    (validation before training repeats the checkpoint's step) and anywhere else, the last value logged for a
    (metric, step) wins.
    """
    merged: dict[str, dict[int, float]] = {}
    for launch in launches:
        steps = [step for points in launch.values() for step, _ in points]
        if not steps:
            continue
        first = min(steps)
        merged = {key: {s: v for s, v in values.items() if s <= first} for key, values in merged.items()}
        for key, points in launch.items():
            merged.setdefault(key, {}).update(points)
    return {key: sorted(values.items()) for key, values in merged.items() if values}


def read_jsonl(path: str | Path) -> Series:
    """Per metric, the (step, value) pairs of a verl file-logger JSONL; bad lines name the file and line.

    A step lower than the line before starts a new launch (a file appended to by a restarted run), merged as
    ``merge_launches`` says; non-numeric values are left out.
    """
    launches: list[Series] = [{}]
    previous = None
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step, data = int(record["step"]), record["data"]
            items = data.items()
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}:{number}: not a verl file-logger record ({err})") from err
        if previous is not None and step < previous:
            launches.append({})
        previous = step
        for key, value in items:
            if isinstance(value, int | float) and not isinstance(value, bool):
                launches[-1].setdefault(key, []).append((step, float(value)))
    return merge_launches(launches)


def read_tensorboard(folder: str | Path) -> Series:
    """Per metric, the (step, value) scalars of the event files in ``folder`` (not its subfolders): one file
    per launch, in the order the launches started, merged as ``merge_launches`` says."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    files = sorted(Path(folder).glob(EVENT_FILES))
    if not files:
        raise ValueError(f"{folder}: no tensorboard event files ({EVENT_FILES}) in this folder")
    launches = []
    for file in files:
        # size_guidance 0 keeps every point (the default samples 10,000 per tag); purging is done by merge_launches
        events = EventAccumulator(str(file), size_guidance={SCALARS: 0}, purge_orphaned_data=False).Reload()
        series = {tag: [(e.step, float(e.value)) for e in events.Scalars(tag)] for tag in events.Tags()[SCALARS]}
        started = events.FirstEventTimestamp() if series else float("inf")
        launches.append((started, str(file), series))
    return merge_launches([series for _, _, series in sorted(launches, key=lambda item: item[:2])])


def read_metrics(path: str | Path) -> Series:
    """Per metric, the (step, value) pairs of one run: a file-logger JSONL, or a tensorboard folder."""
    path = Path(path)
    if path.is_dir():
        return read_tensorboard(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file-logger JSONL or tensorboard folder")
    return read_jsonl(path)


def plot_runs(runs: dict[str, Series], out: str | Path,
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
    parser.add_argument("runs", nargs="+", help="verl file-logger JSONL files or tensorboard folders (one per run)")
    parser.add_argument("--out", help="PNG to write (default: curves.png in the first run's folder)")
    args = parser.parse_args(argv)
    runs = {_label(Path(run)): read_metrics(run) for run in args.runs}
    first = Path(args.runs[0])
    out = plot_runs(runs, args.out or (first if first.is_dir() else first.parent) / "curves.png")
    print(f"wrote {out}")
    return out


def _label(path: Path) -> str:
    return path.resolve().name if path.is_dir() else path.stem


if __name__ == "__main__":
    main()
