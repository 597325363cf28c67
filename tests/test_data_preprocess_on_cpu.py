"""Data-preparation scripts: local fixtures -> verl RL parquet, loaded back with pandas and verl's RLHFDataset."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from io import BytesIO
from pathlib import Path
from types import ModuleType

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from calibrl_verl.data import prep
from calibrl_verl.reward import compute_score

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "examples" / "data_preprocess"
OUTPUT_COLUMNS = ["data_source", "prompt", "images", "ability", "reward_model", "extra_info", "solution"]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"prep_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


virl39k = load_script("virl39k")
geometry3k = load_script("geometry3k")
geoqa = load_script("geoqa")
eval_sets = load_script("eval_sets")


# --------------------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------------------


def png(path: Path, color: tuple, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def png_bytes(color: tuple, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buffer = BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def decode(image: dict) -> Image.Image:
    return Image.open(BytesIO(image["bytes"]))


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture
def virl_fixture(tmp_path: Path) -> dict:
    """Five ViRL39K-style problems (one with two images, one chart) + an expert file with custom field names."""
    images = tmp_path / "raw"
    png(images / "images" / "q1.png", (255, 0, 0))
    png(images / "images" / "q2a.png", (0, 255, 0), size=(20, 10))
    png(images / "images" / "q2b.png", (0, 0, 255), size=(16, 16))
    png(images / "images" / "q3.png", (9, 9, 9))
    png(images / "images" / "q4.png", (10, 10, 10))
    png(images / "images" / "q5.png", (11, 11, 11))
    problems = [
        {
            "qid": "q1",
            "question": "<image>Find x.",
            "answer": "\\boxed{5}",
            "image": ["images/q1.png"],
            "category": "(GradeSchool) Geometric",
        },
        {
            "qid": "q2",
            "question": "Compare the two triangles. Which is larger?\nA. left\nB. right",
            "answer": "B",
            "image": ["images/q2a.png", "images/q2b.png"],
            "category": "Geometry",
        },
        {
            "qid": "q3",
            "question": "What is the area?",
            "answer": "12",
            "image": ["images/q3.png"],
            "category": "geometric reasoning",
        },
        {
            "qid": "q4",
            "question": "What is the angle?",
            "answer": "30",
            "image": ["images/q4.png"],
            "category": "Geometric",
        },
        {"qid": "q5", "question": "Read the chart.", "answer": "7", "image": ["images/q5.png"], "category": "Chart"},
    ]
    experts = [
        {"qid": "q1", "response": "Since 2x = 10, x = 5.\nSo the answer is \\boxed{5}."},
        {"qid": "q2", "response": "<think>The right one has longer sides.</think>\n<answer>B</answer>"},
        {"qid": "q2", "response": "duplicate that must be ignored"},
        {"qid": "q3", "response": "The area is length times width, I think it is large."},
        {"qid": "q5", "response": "The bar reaches 6.\nAnswer: 6"},
        {"qid": "not-in-data", "response": "Answer: 1"},
    ]
    return {
        "problems": write_jsonl(tmp_path / "virl.jsonl", problems),
        "experts": write_jsonl(tmp_path / "cots.jsonl", experts),
        "image_dir": images,
        "tmp": tmp_path,
    }


def virl_argv(fx: dict, output: Path, *extra: str) -> list[str]:
    return [
        "--input", str(fx["problems"]), "--image-dir", str(fx["image_dir"]), "--output", str(output),
        "--experts", str(fx["experts"]), "--expert-id-field", "qid", "--expert-text-field", "response", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# ViRL39K + experts
# --------------------------------------------------------------------------------------------------------------------


def test_virl39k_main_joins_and_wraps_experts(virl_fixture: dict, capsys: pytest.CaptureFixture) -> None:
    output = virl_fixture["tmp"] / "out" / "train.parquet"
    summary = virl39k.main(virl_argv(virl_fixture, output))

    frame = pd.read_parquet(output)
    assert list(frame.columns) == OUTPUT_COLUMNS
    assert len(frame) == 5
    rows = {row["extra_info"]["id"]: row for row in read_rows(output)}

    q1 = rows["q1"]
    assert q1["data_source"] == "virl39k" and q1["ability"] == "math"
    assert q1["prompt"] == [{"role": "user", "content": "<image>Find x.\n" + prep.INSTRUCTION}]
    assert q1["reward_model"] == {"style": "rule", "ground_truth": "5"}
    assert q1["extra_info"] == {"split": "train", "index": 0, "id": "q1", "question": "Find x.", "answer": "5",
                                 "meta": ""}  # training sets keep no benchmark fields
    assert q1["solution"] == "<think>Since 2x = 10, x = 5.\nSo the answer is \\boxed{5}.</think><answer>5</answer>"
    assert compute_score("virl39k", q1["solution"], "5") == {"score": 1.1, "acc": 1.0, "format": 1.0}
    image = decode(q1["images"][0])
    assert image.format == "PNG" and image.size == (40, 30) and image.getpixel((0, 0)) == (255, 0, 0)

    q2 = rows["q2"]
    assert q2["prompt"][0]["content"].startswith("<image><image>Compare the two triangles.")
    assert q2["prompt"][0]["content"].count("<image>") == 2
    assert [decode(i).size for i in q2["images"]] == [(20, 10), (16, 16)]
    assert q2["solution"] == "<think>The right one has longer sides.</think>\n<answer>B</answer>"

    assert rows["q3"]["solution"] == ""  # CoT without a final answer: never filled with the ground truth
    assert rows["q4"]["solution"] == ""  # no expert
    assert rows["q5"]["solution"] == "<think>The bar reaches 6.\nAnswer: 6</think><answer>6</answer>"
    assert [row["extra_info"]["index"] for row in read_rows(output)] == [0, 1, 2, 3, 4]

    assert summary["rows_written"] == 5
    assert summary["expert_wrapped"] == 2
    assert summary["expert_formatted"] == 1
    assert summary["expert_unparsable"] == 1
    assert summary["expert_missing"] == 1
    assert summary["expert_correct"] == 2  # q1 and q2; q5's expert says 6, the ground truth is 7
    assert summary["expert_duplicate_ids"] == 1
    assert summary["expert_ids_not_in_data"] == 1
    assert summary["images"] == 6
    printed = capsys.readouterr().out
    assert "expert_unparsable" in printed and "rows_written" in printed


def test_virl39k_category_filter_and_require_expert(
    virl_fixture: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALIBRL_PROGRESS_EVERY", "2")
    output = virl_fixture["tmp"] / "geo.parquet"
    summary = virl39k.main(virl_argv(virl_fixture, output, "--categories", "geometr", "--require-expert"))
    ids = [row["extra_info"]["id"] for row in read_rows(output)]
    assert ids == ["q1", "q2"]  # q5 is a chart, q3 unparsable, q4 without expert
    assert summary["skipped_category"] == 1
    assert summary["skipped_no_expert"] == 2
    assert [row["extra_info"]["index"] for row in read_rows(output)] == [0, 1]
    # progress on stderr (not a terminal under pytest: plain lines, every 2 rows and at the end)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[prep virl39k]")]
    assert [(line.split(" rows")[0], line.rsplit(", ", 2)[-2:]) for line in lines] == [
        ("[prep virl39k] 2/5", ["kept=2", "dropped=0"]),
        ("[prep virl39k] 4/5", ["kept=2", "dropped=2"]),
        ("[prep virl39k] 5/5", ["kept=2", "dropped=3"]),
    ]


def test_virl39k_without_expert_file_keeps_rows_with_empty_solution(virl_fixture: dict) -> None:
    output = virl_fixture["tmp"] / "plain.parquet"
    argv = ["--input", str(virl_fixture["problems"]), "--image-dir", str(virl_fixture["image_dir"])]
    summary = virl39k.main([*argv, "--output", str(output), "--limit", "3"])
    assert [row["solution"] for row in read_rows(output)] == ["", "", ""]
    assert summary["expert_missing"] == 3 and summary["rows_written"] == 3


def test_virl39k_script_runs_as_subprocess(virl_fixture: dict) -> None:
    output = virl_fixture["tmp"] / "cli.parquet"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, str(SCRIPTS / "virl39k.py"), *virl_argv(virl_fixture, output)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rows_written" in done.stdout and "expert_wrapped" in done.stdout
    assert len(pd.read_parquet(output)) == 5
    assert "[prep virl39k] 5/5 rows (100.0%)" in done.stderr and "kept=5, dropped=0" in done.stderr
    assert "\r" not in done.stderr  # stderr is a pipe: lines, not a tqdm bar

    bad = [sys.executable, str(SCRIPTS / "virl39k.py"), *virl_argv(virl_fixture, output), "--question-column", "q"]
    failed = subprocess.run(bad, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert failed.returncode == 2
    assert "virl.jsonl" in failed.stderr and "'q'" in failed.stderr and "available columns" in failed.stderr
    assert "Traceback" not in failed.stderr


# --------------------------------------------------------------------------------------------------------------------
# expert wrapping rules
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cot", "solution", "status"),
    [
        ("<think>r</think><answer>4</answer>", "<think>r</think><answer>4</answer>", "expert_formatted"),
        (
            "x = 4, so the answer is $\\boxed{4}$",
            "<think>x = 4, so the answer is $\\boxed{4}$</think><answer>4</answer>",
            "expert_wrapped",
        ),
        (
            "Work.\n**Final Answer:** 12 cm.",
            "<think>Work.\n**Final Answer:** 12 cm.</think><answer>12 cm</answer>",
            "expert_wrapped",
        ),
        (
            "<think>r</think> <answer>4</answer> trailing",
            "<think>r  trailing</think><answer>4</answer>",
            "expert_wrapped",
        ),
        ("Work.\nThe answer is: 12", "<think>Work.\nThe answer is: 12</think><answer>12</answer>", "expert_wrapped"),
        ("I am not sure about this one.", "", "expert_unparsable"),
        ("<think>a</think><answer>1</answer><answer>2</answer>", "", "expert_unparsable"),
        ("   ", "", "expert_missing"),
        (None, "", "expert_missing"),
    ],
)
def test_prepare_expert(cot: str | None, solution: str, status: str) -> None:
    assert prep.prepare_expert(cot) == (solution, status)


# --------------------------------------------------------------------------------------------------------------------
# Geometry3K (HF parquet layout with embedded image bytes) and GeoQA (json with choices + label)
# --------------------------------------------------------------------------------------------------------------------


def test_geometry3k_from_hf_style_parquet(tmp_path: Path) -> None:
    records = [
        {"images": [{"bytes": png_bytes((1, 2, 3)), "path": None}], "problem": "<image>Find y.", "answer": "3\\sqrt{2}",
         "id": 7, "choices": ["1", "3\\sqrt{2}"], "ground_truth": "B"},
        {"images": [{"bytes": png_bytes((0, 0, 0, 0), mode="RGBA"), "path": "x.png"}], "problem": "Find z.",
         "answer": "45", "id": 8, "choices": ["45", "90"], "ground_truth": "A"},
    ]  # fmt: skip
    source = tmp_path / "data" / "test-00000-of-00001.parquet"
    source.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(records), source)
    output = tmp_path / "geo3k_test.parquet"

    summary = geometry3k.main(["--input", str(source.parent), "--split", "test", "--output", str(output)])
    rows = read_rows(output)
    assert summary["rows_written"] == 2
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["3\\sqrt{2}", "45"]
    assert [r["extra_info"]["id"] for r in rows] == ["7", "8"]
    assert rows[0]["prompt"][0]["content"] == "<image>Find y.\n" + prep.INSTRUCTION
    assert rows[1]["prompt"][0]["content"].startswith("<image>Find z.")
    assert decode(rows[0]["images"][0]).getpixel((5, 5)) == (1, 2, 3)
    flattened = decode(rows[1]["images"][0])
    assert flattened.mode == "RGB" and flattened.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    assert all(r["extra_info"]["split"] == "test" and r["solution"] == "" for r in rows)

    letters = tmp_path / "geo3k_letters.parquet"
    geometry3k.main(["--input", str(source), "--split", "test", "--output", str(letters),
                     "--choices-column", "choices", "--answer-column", "ground_truth"])  # fmt: skip
    rows = read_rows(letters)
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["B", "A"]
    assert rows[0]["extra_info"]["question"] == "Find y.\nA. 1\nB. 3\\sqrt{2}"


def test_geoqa_choices_and_label_give_letters(tmp_path: Path) -> None:
    png(tmp_path / "imgs" / "1.png", (50, 50, 50))
    png(tmp_path / "imgs" / "2.png", (60, 60, 60))
    records = [
        {"id": 1, "subject": "In circle O, angle A is?", "choices": ["30°", "40°", "50°", "60°"], "label": 2,
         "answer": "50°", "image": "imgs/1.png"},
        {"id": 2, "subject": "Find BC.", "choices": ["3", "4", "5", "6"], "label": 0, "answer": "3",
         "image": "imgs/2.png"},
    ]  # fmt: skip
    source = tmp_path / "geoqa_test.json"
    source.write_text(json.dumps(records), encoding="utf-8")
    output = tmp_path / "geoqa.parquet"
    geoqa.main(["--input", str(source), "--output", str(output)])
    rows = read_rows(output)
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["C", "A"]
    assert rows[0]["prompt"][0]["content"] == (
        "<image>In circle O, angle A is?\nA. 30°\nB. 40°\nC. 50°\nD. 60°\n" + prep.INSTRUCTION
    )
    assert rows[0]["data_source"] == "geoqa" and rows[0]["extra_info"]["split"] == "test"

    free = tmp_path / "geoqa_free.parquet"
    geoqa.main(["--input", str(source), "--output", str(free), "--choices-column", "", "--label-column", ""])
    rows = read_rows(free)
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["50°", "3"]
    assert "A. 30°" not in rows[0]["prompt"][0]["content"]


# --------------------------------------------------------------------------------------------------------------------
# evaluation benchmarks
# --------------------------------------------------------------------------------------------------------------------


def test_eval_mathvista_choices_become_letters_and_hidden_answers_are_skipped(tmp_path: Path) -> None:
    records = [
        {"pid": "1", "question": "Which is the largest angle?", "image": "images/1.png",
         "decoded_image": {"bytes": png_bytes((200, 0, 0)), "path": None}, "choices": ["∠A", "∠B", "∠C"],
         "answer": "∠B", "question_type": "multi_choice"},
        {"pid": "2", "question": "What is x?", "image": "images/2.png",
         "decoded_image": {"bytes": png_bytes((0, 200, 0)), "path": None}, "choices": None, "answer": "1.5",
         "question_type": "free_form"},
        {"pid": "3", "question": "Hidden test answer", "image": "images/3.png",
         "decoded_image": {"bytes": png_bytes((0, 0, 200)), "path": None}, "choices": None, "answer": "",
         "question_type": "free_form"},
    ]  # fmt: skip
    source = tmp_path / "mathvista.parquet"
    pq.write_table(pa.Table.from_pylist(records), source)
    output = tmp_path / "mathvista_testmini.parquet"
    summary = eval_sets.main(["--benchmark", "mathvista", "--input", str(source), "--output", str(output)])
    rows = read_rows(output)
    assert summary["skipped_no_answer"] == 1 and summary["rows_written"] == 2
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["B", "1.5"]
    assert rows[0]["prompt"][0]["content"].startswith("<image>Which is the largest angle?\nA. ∠A\nB. ∠B\nC. ∠C\n")
    assert rows[0]["data_source"] == "mathvista" and rows[0]["extra_info"]["split"] == "testmini"
    assert decode(rows[1]["images"][0]).getpixel((0, 0)) == (0, 200, 0)


def test_eval_mathvision_mathverse_wemath_schemas(tmp_path: Path) -> None:
    png(tmp_path / "images" / "mv.png", (1, 1, 1))
    png(tmp_path / "images" / "wm.png", (2, 2, 2))
    mathvision = [
        {"id": "11", "question": "<image1>\nWhich shape comes next?", "options": ["A", "B", "C", "D", "E"],
         "image": "images/mv.png", "answer": "C"},
        {"id": "12", "question": "<image1> How many edges?", "options": [], "image": "images/mv.png", "answer": "12"},
    ]  # fmt: skip
    mathverse = [{"sample_index": "5", "question": "Choices:\nA:30\nB:60", "image": "images/mv.png", "answer": "B"}]
    wemath = [{"ID": "w1", "question": "Find the area.", "option": "A. 12; B. 24; C. 36", "answer": "B",
               "image_path": "images/wm.png"}]  # fmt: skip
    outputs = {}
    for name, records in (("mathvision", mathvision), ("mathverse", mathverse), ("wemath", wemath)):
        source = write_jsonl(tmp_path / f"{name}.jsonl", records)
        outputs[name] = tmp_path / f"{name}_out.parquet"
        eval_sets.main(["--benchmark", name, "--input", str(source), "--output", str(outputs[name])])

    vision = read_rows(outputs["mathvision"])
    assert [r["reward_model"]["ground_truth"] for r in vision] == ["C", "12"]
    assert vision[0]["prompt"][0]["content"].startswith("<image>\nWhich shape comes next?\nA. A\nB. B")
    assert vision[1]["prompt"][0]["content"].startswith("<image> How many edges?\n")
    assert "<image1>" not in vision[0]["extra_info"]["question"]

    verse = read_rows(outputs["mathverse"])
    assert verse[0]["reward_model"]["ground_truth"] == "B" and verse[0]["extra_info"]["id"] == "5"
    assert verse[0]["prompt"][0]["content"].startswith("<image>Choices:\nA:30\nB:60\n")

    we = read_rows(outputs["wemath"])
    assert we[0]["reward_model"]["ground_truth"] == "B"
    assert we[0]["prompt"][0]["content"].startswith("<image>Find the area.\nA. 12\nB. 24\nC. 36\n")
    assert decode(we[0]["images"][0]).getpixel((0, 0)) == (2, 2, 2)


def test_clean_ground_truth_forms() -> None:
    assert prep.clean_ground_truth(27.0) == "27" and prep.clean_ground_truth("27.0") == "27"  # AMC floats
    assert prep.clean_ground_truth("$-3.00$") == "-3" and prep.clean_ground_truth("2.50") == "2.50"
    assert prep.clean_ground_truth(["$\\frac{1}{2}$", "", "\\boxed{3}"]) == "\\frac{1}{2}, 3"  # OlympiadBench lists
    assert prep.clean_ground_truth("033") == "033" and prep.clean_ground_truth(None) == ""


def test_parse_choices_and_ground_truth_mapping() -> None:
    assert prep.parse_choices("A. 1; B. 2; C. No correct answer") == ["1", "2", "No correct answer"]
    assert prep.parse_choices('["x", "y"]') == ["x", "y"]
    assert prep.parse_choices(["A. 5", "B. 6"]) == ["5", "6"]
    assert prep.choice_ground_truth("6", ["5", "6"], None, "r") == "B"
    assert prep.choice_ground_truth("(A)", ["5", "6"], None, "r") == "A"
    assert prep.choice_ground_truth("7", ["5", "6"], None, "r") is None
    with pytest.raises(prep.PrepError, match="row r: label 5 out of range"):
        prep.choice_ground_truth("x", ["5", "6"], 5, "r")


# --------------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------------


def test_missing_column_names_file_column_and_available_columns(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "q", "solution": "1", "image": []}])
    with pytest.raises(prep.PrepError) as error:
        geometry3k.main(["--input", str(source), "--output", str(tmp_path / "o.parquet")])
    message = str(error.value)
    assert "bad.jsonl" in message and "answer" in message and "['image', 'problem', 'solution']" in message
    assert not (tmp_path / "o.parquet").exists()


def test_missing_image_names_row_and_path_or_is_skipped(virl_fixture: dict) -> None:
    (virl_fixture["image_dir"] / "images" / "q3.png").unlink()
    output = virl_fixture["tmp"] / "o.parquet"
    with pytest.raises(prep.ImageError) as error:
        virl39k.main(virl_argv(virl_fixture, output))
    assert "row q3" in str(error.value) and str(Path("images") / "q3.png") in str(error.value)
    assert not output.exists() and not output.with_name(output.name + ".tmp").exists()

    summary = virl39k.main([*virl_argv(virl_fixture, output), "--skip-missing-images"])
    assert summary["skipped_missing_image"] == 1 and summary["rows_written"] == 4
    assert "q3" not in {row["extra_info"]["id"] for row in read_rows(output)}


def test_undecodable_image_is_an_image_error(virl_fixture: dict) -> None:
    (virl_fixture["image_dir"] / "images" / "q1.png").write_bytes(b"not an image")
    with pytest.raises(prep.ImageError, match="row q1: cannot decode image"):
        virl39k.main(virl_argv(virl_fixture, virl_fixture["tmp"] / "o.parquet"))


@pytest.mark.parametrize("escape", ["../secret.png", "images/../../secret.png", "ABSOLUTE"])
def test_image_paths_cannot_escape_image_dir(tmp_path: Path, escape: str) -> None:
    secret = png(tmp_path / "secret.png", (7, 7, 7))
    root = tmp_path / "root"
    root.mkdir()
    path = str(secret) if escape == "ABSOLUTE" else escape
    source = write_jsonl(root / "p.jsonl", [{"qid": "x1", "question": "q", "answer": "1", "image": [path]}])
    with pytest.raises(prep.PrepError, match="row x1: image path .* escapes --image-dir"):
        virl39k.main(["--input", str(source), "--image-dir", str(root), "--output", str(tmp_path / "o.parquet")])


def test_paths_inside_image_dir_are_allowed(tmp_path: Path) -> None:
    png(tmp_path / "imgs" / "a.png", (3, 3, 3))
    source = write_jsonl(
        tmp_path / "p.jsonl",
        [{"qid": "x", "question": "q", "answer": "1", "image": ["imgs/sub/../a.png", str(tmp_path / "imgs/a.png")]}],
    )
    output = tmp_path / "o.parquet"
    virl39k.main(["--input", str(source), "--output", str(output)])  # --image-dir defaults to the input's folder
    assert len(read_rows(output)[0]["images"]) == 2


def test_invalid_jsonl_line_and_bad_expert_file(tmp_path: Path, virl_fixture: dict) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"qid": "a", "question": "q", "answer": "1", "image": []}\n{not json}\n', encoding="utf-8")
    with pytest.raises(prep.PrepError, match=r"broken.jsonl:2: invalid json"):
        virl39k.main(["--input", str(broken), "--output", str(tmp_path / "o.parquet")])

    experts = write_jsonl(tmp_path / "e.jsonl", [{"qid": "q1", "text": "x"}])
    argv = virl_argv(virl_fixture, tmp_path / "o.parquet")
    argv[argv.index("--experts") + 1] = str(experts)
    with pytest.raises(prep.PrepError, match=r"e.jsonl: record 1 has no field 'response'; fields: \['qid', 'text'\]"):
        virl39k.main(argv)


def test_missing_input_and_empty_result(tmp_path: Path) -> None:
    with pytest.raises(prep.PrepError, match="input file not found"):
        geoqa.main(["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.parquet")])
    source = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "", "image": []}])
    with pytest.raises(prep.PrepError, match="no rows to write"):
        geoqa.main(["--input", str(source), "--output", str(tmp_path / "o.parquet")])
    assert not (tmp_path / "o.parquet").exists()


# --------------------------------------------------------------------------------------------------------------------
# verl's RLHFDataset reads the output
# --------------------------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with Qwen-style special tokens, built locally (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"]  # fmt: skip
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([prep.INSTRUCTION, "<think> </think> <answer> </answer>"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


@pytest.fixture(scope="module")
def tiny_processor(tiny_tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tiny_tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def rlhf_dataset(path: Path, tokenizer, processor, tmp_path: Path, max_prompt_length: int = 4096):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create(
        {
            "cache_dir": str(tmp_path / "verl_cache"),
            "max_prompt_length": max_prompt_length,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "prompt_key": "prompt",
            "image_key": "images",
        }
    )
    return RLHFDataset(data_files=str(path), tokenizer=tokenizer, config=config, processor=processor)


def test_rlhf_dataset_loads_multimodal_output(virl_fixture: dict, tiny_tokenizer, tiny_processor) -> None:
    output = virl_fixture["tmp"] / "rl.parquet"
    virl39k.main(virl_argv(virl_fixture, output))
    dataset = rlhf_dataset(output, tiny_tokenizer, tiny_processor, virl_fixture["tmp"])
    assert len(dataset) == 5

    item = dataset[1]  # q2: two images
    content = item["raw_prompt"][0]["content"]
    images = [part["image"] for part in content if part["type"] == "image"]
    texts = "".join(part["text"] for part in content if part["type"] == "text")
    assert [image.size for image in images] == [(20, 10), (16, 16)]
    assert images[0].convert("RGB").getpixel((0, 0)) == (0, 255, 0)
    assert texts.startswith("Compare the two triangles.") and texts.endswith(prep.INSTRUCTION)
    assert item["reward_model"]["ground_truth"] == "B"
    assert item["solution"] == "<think>The right one has longer sides.</think>\n<answer>B</answer>"
    assert item["index"] == 1 and item["data_source"] == "virl39k"

    too_short = rlhf_dataset(output, tiny_tokenizer, tiny_processor, virl_fixture["tmp"], max_prompt_length=8)
    assert len(too_short) == 0  # the length filter really tokenised our prompts


def test_rlhf_dataset_loads_text_only_output_with_tokenizer(tmp_path: Path, tiny_tokenizer) -> None:
    source = write_jsonl(tmp_path / "t.jsonl", [{"qid": "a", "question": "What is 1+1?", "answer": "2"},
                                                  {"qid": "b", "question": "What is 2+2?", "answer": "4"}])  # fmt: skip
    output = tmp_path / "text.parquet"
    summary = virl39k.main(["--input", str(source), "--output", str(output), "--image-column", ""])
    assert summary["rows_without_images"] == 2
    dataset = rlhf_dataset(output, tiny_tokenizer, None, tmp_path)
    assert len(dataset) == 2
    assert dataset[1]["raw_prompt"] == [{"role": "user", "content": "What is 2+2?\n" + prep.INSTRUCTION}]
    assert dataset[1]["extra_info"]["answer"] == "4"


def test_rlhf_dataset_loads_openr1_output_with_its_expert(tmp_path: Path, tiny_tokenizer) -> None:
    """The OpenR1-Math script's text-only output, expert included, through verl's RLHFDataset."""
    openr1_math = load_script("openr1_math")
    trace = "<think>\n2 plus 2 is 4.\n</think>\nThus $\\boxed{4}$."
    record = {"problem": "What is 2+2?", "answer": "4", "uuid": "u1", "generations": [trace],
              "correctness_math_verify": [True], "is_reasoning_complete": [True]}  # fmt: skip
    source = write_jsonl(tmp_path / "openr1.jsonl", [record, {**record, "uuid": "u2", "answer": "5"}])
    output = tmp_path / "openr1.parquet"
    summary = openr1_math.main(["--input", str(source), "--output", str(output)])
    assert summary["expert_r1_trace"] == 1 and summary["trace_reward_rejected"] == 1
    dataset = rlhf_dataset(output, tiny_tokenizer, None, tmp_path)
    assert len(dataset) == 2
    assert dataset[0]["raw_prompt"] == [{"role": "user", "content": "What is 2+2?\n" + prep.INSTRUCTION}]
    assert dataset[0]["solution"] == "<think>2 plus 2 is 4.</think><answer>4</answer>"
    assert dataset[1]["solution"] == "" and dataset[1]["reward_model"]["ground_truth"] == "5"


def test_eval_scienceqa_mmmu_and_the_benchmark_fields_kept_for_the_community_protocol(tmp_path: Path) -> None:
    for k, colour in enumerate(((1, 1, 1), (2, 2, 2), (3, 3, 3)), 1):
        png(tmp_path / "images" / f"m{k}.png", colour)
    scienceqa = [{"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "hint": "Look.",
                  "subject": "natural science", "image": "images/m1.png"}]
    mmmu = [{"id": "validation_Art_1", "question": "Compare <image 3> with <image 1>.",
             "options": "['left', \"right's\"]", "answer": "B", "question_type": "multiple-choice",
             "image_1": "images/m1.png", "image_2": "images/m2.png", "image_3": "images/m3.png"},
            {"id": "validation_Math_2", "question": "Sum?", "options": "[]", "answer": "12",
             "question_type": "open", "image_1": "images/m2.png", "image_2": None}]
    mathvista = [{"pid": "7", "question": "Length?", "choices": None, "answer": "2.5", "precision": 1.0, "unit": "cm",
                  "question_type": "free_form", "answer_type": "float", "query": "Hint: one decimal. Length?",
                  "image": "images/m1.png", "metadata": {"source": "x"}}]
    rows = {}
    for name, records in (("scienceqa", scienceqa), ("mmmu", mmmu), ("mathvista", mathvista)):
        source = write_jsonl(tmp_path / f"{name}.jsonl", records)
        eval_sets.main(["--benchmark", name, "--input", str(source), "--output", str(tmp_path / f"{name}.parquet")])
        rows[name] = read_rows(tmp_path / f"{name}.parquet")

    sqa = rows["scienceqa"][0]
    assert sqa["reward_model"]["ground_truth"] == "B"  # the answer index became the option letter
    assert json.loads(sqa["extra_info"]["meta"]) == {"question": "Which is a mammal?", "choices": ["frog", "whale"],
                                                     "answer": 1, "hint": "Look.", "subject": "natural science"}
    first, second = rows["mmmu"]
    # each image at its tag, in the order the tags appear: image_3, then image_1 (image_2 is never named)
    assert [decode(i).getpixel((0, 0)) for i in first["images"]] == [(3, 3, 3), (1, 1, 1)]
    assert first["prompt"][0]["content"].startswith("Compare <image> with <image>.\nA. left\nB. right's\n")
    assert first["reward_model"]["ground_truth"] == "B"
    assert json.loads(first["extra_info"]["meta"])["choices"] == ["left", "right's"]  # a Python list literal
    assert [decode(i).getpixel((0, 0)) for i in second["images"]] == [(2, 2, 2)]  # no tag: image_1
    assert second["reward_model"]["ground_truth"] == "12"
    assert json.loads(second["extra_info"]["meta"])["question_type"] == "open"
    vista = json.loads(rows["mathvista"][0]["extra_info"]["meta"])
    assert {k: vista[k] for k in ("query", "precision", "unit", "question_type", "answer_type", "answer")} == {
        "query": "Hint: one decimal. Length?", "precision": 1.0, "unit": "cm", "question_type": "free_form",
        "answer_type": "float", "answer": "2.5"}
