"""Training curves from verl's file-logger JSONL."""

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
