"""``python -m calibrl_verl.evaluate_compare``: the comparison table, the published column, the flags, the curves.

Run folders are built by hand: summary.json written with literal numbers, or (the "calibrl" run) produced by
``eval_metrics.benchmark_summary`` from a literal sample table whose figures are worked out by hand below.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from calibrl_verl import evaluate_compare
from calibrl_verl.eval_metrics import benchmark_summary

SAMPLED = {"protocol": "calibrl", "temperature": 1.0, "top_p": 1.0, "seed": 0}
GREEDY = {"protocol": "calibrl", "temperature": 0.0, "top_p": 1.0, "seed": 0}


def figures(how: dict[str, Any], n: int, accuracy: float, passk: dict[int, float], maj: float,
            coverage: float) -> dict[str, Any]:
    return {**how, "n_problems": 2, "n_samples": n, "accuracy": accuracy,
            "pass@k": {str(k): v for k, v in passk.items()}, f"maj@{n}": maj, "coverage": coverage}


def samples(table: list[tuple[str, list[bool], list[str]]]) -> list[dict[str, Any]]:
    return [{"id": pid, "sample": i, "correct": ok, "extracted": ans}
            for pid, oks, answers in table for i, (ok, ans) in enumerate(zip(oks, answers, strict=True))]


def write_run(root: Path, name: str, summary: dict[str, Any]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    """base: greedy (K = 1); grpo: K = 4, literal figures; calibrl: K = 4, from benchmark_summary."""
    base = {
        "mathvista_testmini": figures(GREEDY, 1, 60.0, {1: 60.0}, 60.0, 60.0),
        "geoqa/test": figures(GREEDY, 1, 20.0, {1: 20.0}, 20.0, 20.0),
        "eval/MathVerse-TestMini": figures(GREEDY, 1, 35.0, {1: 35.0}, 35.0, 35.0),
    }
    grpo = {
        "mathvista_testmini": figures(SAMPLED, 4, 45.0, {1: 45.0, 2: 60.0, 4: 70.0}, 55.0, 70.0),
        "geoqa/test": figures(SAMPLED, 4, 35.0, {1: 35.0, 2: 40.0, 4: 45.0}, 30.0, 45.0),
        "eval/MathVerse-TestMini": figures(SAMPLED, 4, 30.0, {1: 30.0, 2: 38.0, 4: 44.0}, 32.0, 44.0),
    }
    # By hand: mathvista p1 1/4 correct, p2 3/4 -> mean@4 = 50; pass@2 = (1 - C(3,2)/C(4,2) + 1) / 2 = 75;
    # pass@4 = 100; maj@4: p1's majority "B" is wrong, p2's "7" right -> 50; coverage 100.
    # geoqa: p1 4/4, p2 0/4 -> 50 for mean@4, every pass@k, maj@4 and coverage.
    vista = samples([("p1", [True, False, False, False], ["A", "B", "B", "C"]),
                     ("p2", [True, True, True, False], ["7", "7", "7", "8"])])
    geoqa = samples([("q1", [True] * 4, ["3"] * 4), ("q2", [False] * 4, ["1"] * 4)])
    calibrl = {
        "mathvista_testmini": {**SAMPLED, **benchmark_summary(vista)},
        "geoqa/test": {**SAMPLED, **benchmark_summary(geoqa)},
        "eval/MathVerse-TestMini": figures(SAMPLED, 4, 40.0, {1: 40.0, 2: 48.0, 4: 52.0}, 41.0, 52.0),
    }
    return {name: write_run(tmp_path, name, summary)
            for name, summary in (("base", base), ("grpo", grpo), ("calibrl", calibrl))}


def compare(tmp_path: Path, folders: list[Path], *extra: str) -> tuple[str, Path]:
    out = tmp_path / "out"
    evaluate_compare.main([*map(str, folders), "--out", str(out), *extra])
    return (out / "comparison.md").read_text(), out


def error_of(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        evaluate_compare.main(argv)
    return str(caught.value)


def test_accuracy_table_with_published_column_and_sources(tmp_path: Path, runs: dict[str, Path]) -> None:
    text, out = compare(tmp_path, [runs["grpo"], runs["calibrl"]], "--names", "GRPO", "CalibRL")
    lines = text.splitlines()
    assert lines[0] == "# accuracy (%) by benchmark"
    assert "mean@K (avg@K) for K > 1" in text
    assert "Settings (every run, every benchmark): protocol calibrl, K = 4, temperature 1, top_p 1." in text
    assert "| benchmark (accuracy, %) | GRPO | CalibRL | Qwen2.5-VL-7B-Instruct (published) |" in lines
    assert "| mathvista_testmini | 45.0 | 50.0 | 68.2 [^1] |" in lines
    assert "| geoqa/test | 35.0 | 50.0 | — |" in lines
    # loose alias match: folder prefix, case and punctuation ignored; 49.2 is the unverified claim
    assert "| eval/MathVerse-TestMini | 30.0 | 40.0 | 49.2 (unverified) [^2] |" in lines
    note1 = next(line for line in lines if line.startswith("[^1]: "))
    assert "68.2 (accuracy)" in note1 and "QwenLM/Qwen2.5-VL" in note1 and "verified in the source" in note1
    note2 = next(line for line in lines if line.startswith("[^2]: "))
    assert "UNVERIFIED" in note2 and "arXiv 2502.13923" in note2
    assert "Unverified published numbers (claimed, not found in the cited source): mathverse_testmini (49.2)." in text
    assert "not this repository's protocol" in text
    assert "NOT COMPARABLE" not in text
    with open(out / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["benchmark"] for r in rows] == ["mathvista_testmini", "geoqa/test", "eval/MathVerse-TestMini"]
    assert (rows[0]["GRPO"], rows[0]["CalibRL"], rows[0]["reference"], rows[0]["reference_verified"]) == (
        "45.00", "50.00", "68.20", "true")
    assert rows[1]["reference"] == "" and rows[1]["comparable"] == "yes"
    assert (rows[2]["reference"], rows[2]["reference_verified"]) == ("49.20", "false")


def test_pass_maj_and_coverage_metrics(tmp_path: Path, runs: dict[str, Path]) -> None:
    text, out = compare(tmp_path, [runs["grpo"], runs["calibrl"]], "--metric", "pass@2")
    assert text.startswith("# pass@2 (%) by benchmark")
    assert "| mathvista_testmini | 60.0 | 75.0 | 68.2 [^1] |" in text
    assert "| geoqa/test | 40.0 | 50.0 | — |" in text
    assert "The published numbers are accuracy, not pass@2." in text
    with open(out / "comparison.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert (row["metric"], row["grpo"], row["calibrl"]) == ("pass@2", "60.00", "75.00")

    text, _ = compare(tmp_path, [runs["grpo"], runs["calibrl"]], "--metric", "maj@K", "--no-references")
    assert "| benchmark (maj@K, %) | grpo | calibrl |" in text and "published" not in text
    assert "| mathvista_testmini | 55.0 | 50.0 |" in text
    text, _ = compare(tmp_path, [runs["grpo"], runs["calibrl"]], "--metric", "coverage",
                      "--benchmarks", "mathvista_testmini")
    assert "| mathvista_testmini | 70.0 | 100.0 | 68.2 [^1] |" in text and "geoqa" not in text


def test_mismatched_k_and_temperature_are_flagged(tmp_path: Path, runs: dict[str, Path]) -> None:
    text, out = compare(tmp_path, [runs["base"], runs["grpo"]], "--metric", "pass@2")
    lines = text.splitlines()
    assert "Settings differ between runs or benchmarks (flagged rows below):" in text
    assert "- base: protocol calibrl, K = 1, greedy" in lines
    assert "| mathvista_testmini [^1] | n/a | 60.0 | 68.2 [^2] |" in lines
    note = next(line for line in lines if line.startswith("[^1]: "))
    assert note.startswith("[^1]: mathvista_testmini: NOT COMPARABLE")
    assert "base: protocol calibrl, K = 1, greedy; grpo: protocol calibrl, K = 4, temperature 1, top_p 1" in note
    assert "n/a: base: pass@2 not reported (reported k: 1)." in note
    with open(out / "comparison.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["base"] == "n/a" and row["comparable"].startswith("no: NOT COMPARABLE")


def test_mismatched_protocol_is_flagged(tmp_path: Path, runs: dict[str, Path]) -> None:
    other = write_run(tmp_path, "other", {
        "geoqa/test": figures({**SAMPLED, "protocol": "r1v"}, 4, 33.0, {1: 33.0, 2: 41.0, 4: 47.0}, 31.0, 47.0)})
    text, _ = compare(tmp_path, [runs["grpo"], other], "--benchmarks", "geoqa/test")
    assert "| geoqa/test [^1] | 35.0 | 33.0 | — |" in text
    assert ("[^1]: geoqa/test: NOT COMPARABLE: the runs used different protocol / K / temperature / top_p (grpo: "
            "protocol calibrl, K = 4, temperature 1, top_p 1; other: protocol r1v, K = 4, temperature 1, "
            "top_p 1).") in text


def test_errors_name_the_folder_and_what_is_missing(tmp_path: Path, runs: dict[str, Path]) -> None:
    gone = tmp_path / "no_such_run"
    assert error_of([str(runs["grpo"]), str(gone)]) == f"evaluate_compare: error: run folder {gone} does not exist"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"run folder {empty} has no summary.json" in error_of([str(empty)])
    partial = write_run(tmp_path, "partial", {"geoqa/test": figures(SAMPLED, 4, 1.0, {1: 1.0}, 1.0, 1.0)})
    message = error_of([str(runs["grpo"]), str(partial), "--out", str(tmp_path / "o")])
    assert f"run folder {partial} (partial) lacks benchmark(s) ['mathvista_testmini', 'eval/MathVerse-TestMini']" \
        in message
    assert "--names gives 1 name(s) for 2 run folder(s)" in error_of([str(runs["grpo"]), str(runs["base"]),
                                                                      "--names", "x"])
    assert "--metric 'pass@'" in error_of([str(runs["grpo"]), "--metric", "pass@"])
    assert "--reference-model 'Nobody'" in error_of([str(runs["grpo"]), "--reference-model", "Nobody"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text(json.dumps({"geoqa/test": {"accuracy": 3.0}}))
    assert "benchmark 'geoqa/test' has no integer n_samples >= 1" in error_of([str(broken)])


def test_passk_png_per_benchmark_and_k1_runs_skipped(tmp_path: Path, runs: dict[str, Path]) -> None:
    text, out = compare(tmp_path, [runs["base"], runs["grpo"], runs["calibrl"]])
    for stem in ("mathvista_testmini", "geoqa_test", "eval_MathVerse-TestMini"):
        with Image.open(out / f"passk_{stem}.png") as image:
            width, height = image.size
            colors = {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20)}
        assert width >= 400 and height >= 300
        # one line per K > 1 run, in matplotlib's first two default colours (tab:blue, tab:orange); none for base
        assert {(31, 119, 180), (255, 127, 14)} <= colors and (44, 160, 44) not in colors
    assert "pass@k curves: no curve for base (K = 1: a single greedy or sampled answer)." in text

    out2 = tmp_path / "out2"
    evaluate_compare.main([str(runs["base"]), "--out", str(out2)])
    assert not list(out2.glob("passk_*.png"))
    assert "no plot for mathvista_testmini (no run drew K > 1 samples)" in (out2 / "comparison.md").read_text()


def test_shipped_references_file(tmp_path: Path) -> None:
    data = evaluate_compare.load_references(evaluate_compare.DEFAULT_REFERENCES)
    model = "Qwen2.5-VL-7B-Instruct"
    expected = {"mathvista_testmini": (68.2, True), "mathvision": (25.1, True), "wemath_testmini": (62.9, True),
                "mathverse_testmini": (49.2, False)}
    for benchmark, (value, verified) in expected.items():
        entry = data["models"][model][benchmark]
        assert (entry["value"], entry["verified"]) == (value, verified)
        assert entry["source"] and entry["metric"] == "accuracy"
    for name, key in (("mathvista", "mathvista_testmini"), ("eval/MathVista-TestMini", "mathvista_testmini"),
                      ("We_Math", "wemath_testmini"), ("mathvision", "mathvision")):
        assert evaluate_compare.reference_for(data, model, name).benchmark == key
    # another split is not matched to a number published for the full test set
    assert evaluate_compare.reference_for(data, model, "mathvision_testmini") is None
    # the YAML ships with the package (setuptools package-data)
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    package_data = re.search(r"\[tool\.setuptools\.package-data\]\ncalibrl_verl = \[(.*)\]", pyproject)
    assert package_data and '"data/*.yaml"' in package_data.group(1)


def test_custom_references_file_and_its_errors(tmp_path: Path, runs: dict[str, Path]) -> None:
    refs = tmp_path / "refs.yaml"
    refs.write_text("benchmarks:\n  geoqa_test:\n    split: GeoQA test\n    aliases: [geoqa/test]\n"
                    "models:\n  Tiny:\n    geoqa_test: {value: 12.5, metric: accuracy, source: 'Paper X, Table 2',"
                    " verified: false}\n")
    text, _ = compare(tmp_path, [runs["grpo"]], "--references", str(refs), "--benchmarks", "geoqa/test")
    assert "| benchmark (accuracy, %) | grpo | Tiny (published) |" in text
    assert "| geoqa/test | 35.0 | 12.5 (unverified) [^1] |" in text
    assert "source: Paper X, Table 2; UNVERIFIED" in text
    refs.write_text("benchmarks:\n  geoqa_test:\n    aliases: [geoqa]\nmodels:\n  Tiny:\n"
                    "    geoqa_test: {metric: accuracy, source: S, verified: true}\n")
    assert f"{refs}: models.Tiny.geoqa_test: 'value' must be a number" in error_of(
        [str(runs["grpo"]), "--references", str(refs)])
    refs.write_text("benchmarks:\n  a:\n    aliases: [geoqa]\n  b:\n    aliases: [GeoQA]\nmodels: {}\n")
    assert "alias 'GeoQA' of benchmarks.b also names benchmarks.a" in error_of(
        [str(runs["grpo"]), "--references", str(refs)])
