"""Training curves from verl's file-logger JSONL and tensorboard folders, across restarts."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from calibrl_verl.plots import main, read_metrics


def _write(path, rows):
    path.write_text("\n".join(json.dumps({"step": s, "data": d}) for s, d in rows) + "\n")
    return path


def test_reads_series_and_writes_a_png(tmp_path):
    a = _write(tmp_path / "calibrl.jsonl", [(1, {"critic/score/mean": 0.2, "calibrl/guide_loss": 0.5,
                                                 "actor/entropy": 1.0, "note": "x"}),
                                            (2, {"critic/score/mean": 0.4, "calibrl/guide_loss": 0.3,
                                                 "actor/entropy": 0.9})])
    b = _write(tmp_path / "grpo.jsonl", [(1, {"critic/score/mean": 0.1}), (2, {"critic/score/mean": 0.2})])
    series = read_metrics(a)
    assert series["critic/score/mean"] == [(1, 0.2), (2, 0.4)] and "note" not in series
    out = main([str(a), str(b), "--out", str(tmp_path / "curves.png")])
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] > 100


def test_a_bad_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 1, "data": {}}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_metrics(path)


def test_a_resumed_runs_jsonl_gives_one_point_per_step(tmp_path):
    # what the resume-safe file logger leaves: launch 1's steps 0 (validation before training), 1, 2 (validated
    # too); launch 2, resumed from step 2, validates again at step 2 (the last value counts) and goes on with step 3
    path = _write(tmp_path / "metrics.jsonl", [(0, {"val/acc": 0.1}), (1, {"critic/score/mean": 0.2}),
                                               (2, {"critic/score/mean": 0.4, "val/acc": 0.25}), (2, {"val/acc": 0.3}),
                                               (3, {"critic/score/mean": 0.6})])
    assert read_metrics(path) == {"val/acc": [(0, 0.1), (2, 0.3)],
                                  "critic/score/mean": [(1, 0.2), (2, 0.4), (3, 0.6)]}


def test_a_jsonl_appended_by_a_restarted_run_keeps_the_restarted_values(tmp_path):
    # launch 1 logged steps 1-5 and was killed; launch 2 restarted from the checkpoint of step 2
    path = _write(tmp_path / "metrics.jsonl", [(1, {"x": 1.0}), (2, {"x": 2.0}), (3, {"x": 3.0}), (4, {"x": 4.0}),
                                               (5, {"x": 5.0, "y": 5.0}), (3, {"x": 30.0}), (4, {"x": 40.0})])
    assert read_metrics(path) == {"x": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}


def _tensorboard_launch(monkeypatch, folder, points):
    """One launch logging to tensorboard as verl's trainer does (Tracking's tensorboard backend)."""
    from verl.utils.tracking import Tracking

    monkeypatch.setenv("TENSORBOARD_DIR", str(folder))
    tracking = Tracking("proj", "exp", default_backend="tensorboard")
    for step, data in points:
        tracking.log(data, step=step)
    tracking.finish()


def test_a_tensorboard_folder_of_a_resumed_run_gives_one_curve_over_all_steps(tmp_path, monkeypatch):
    folder = tmp_path / "tb"
    # launch 1 checkpoints step 2 and is killed after logging steps 3 and 4
    _tensorboard_launch(monkeypatch, folder, [(s, {"critic/score/mean": s / 4, "old": 1.0}) for s in (1, 2, 3, 4)])
    # launch 2 resumes from step 2: validation before training at step 2, then steps 3-5 again
    _tensorboard_launch(monkeypatch, folder, [(2, {"val/acc": 0.5})]
                        + [(s, {"critic/score/mean": s / 2}) for s in (3, 4, 5)])
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    series = read_metrics(folder)
    assert series == {"critic/score/mean": [(1, 0.25), (2, 0.5), (3, 1.5), (4, 2.0), (5, 2.5)],
                      "old": [(1, 1.0), (2, 1.0)], "val/acc": [(2, 0.5)]}
    out = main([str(folder)])
    assert out == folder / "curves.png"
    with Image.open(out) as img:
        assert img.format == "PNG"


def test_a_folder_without_event_files_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no tensorboard event files"):
        read_metrics(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"missing.jsonl: no such file-logger JSONL or tensorboard folder"):
        read_metrics(tmp_path / "missing.jsonl")
