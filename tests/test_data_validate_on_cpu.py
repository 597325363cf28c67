"""Load-time data validation: each bad input names file, row and column (error) or is counted (fallback)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calibrl_verl.data.validate import DataValidationError, ValidationReport, main, validate_parquet
from calibrl_verl.tiny.task import make_items, png_bytes, write_parquet

N_ROWS = 6


@pytest.fixture(scope="module")
def base_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Rows of a valid tiny-task parquet, as written by the real writer."""
    path = write_parquet(make_items(N_ROWS, 0, "train"), "train", tmp_path_factory.mktemp("base") / "train.parquet")
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def tokenizer():
    from calibrl_verl.tiny.models import build_tokenizer
    from calibrl_verl.tiny.task import tokenizer_corpus

    return build_tokenizer(tokenizer_corpus(0))


def write_rows(rows: list[dict], path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def corrupt(base_rows: list[dict], tmp_path: Path, edit: Callable[[list[dict]], None]) -> Path:
    """A copy of the base rows changed in place by ``edit``, written to tmp_path/bad.parquet."""
    rows = [dict(row) for row in base_rows]
    edit(rows)
    return write_rows(rows, tmp_path / "bad.parquet")


def raised(path: Path, **kwargs) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        validate_parquet(path, **kwargs)
    return info.value


def assert_names(message: str, path: Path, row: int, column: str) -> None:
    assert str(path) in message and f"row {row}," in message and f"column {column!r}" in message, message


def test_clean_file_has_no_findings(base_rows, tmp_path, tokenizer):
    path = write_rows(base_rows, tmp_path / "clean.parquet")
    report = validate_parquet(path, tokenizer=tokenizer, max_prompt_tokens=512, max_response_tokens=512)
    assert isinstance(report, ValidationReport)
    assert report.rows == N_ROWS and report.counts == {} and report.ok
    assert "no findings" in report.summary()


def test_missing_expert_column_is_an_error_listing_columns(base_rows, tmp_path):
    path = corrupt(base_rows, tmp_path, lambda rows: [row.pop("solution") for row in rows])
    error = raised(path)
    assert str(path) in str(error) and "'solution'" in str(error) and "available columns" in str(error)
    assert "'prompt'" in str(error) and error.findings[0].kind == "missing_column"
    assert validate_parquet(path, needs_expert=False).ok  # loss_mode=grpo needs no expert


def test_expert_key_option_picks_the_column(base_rows, tmp_path):
    def rename(rows):
        for row in rows:
            row["cot"] = row.pop("solution")

    path = corrupt(base_rows, tmp_path, rename)
    assert validate_parquet(path, expert_key="cot").counts == {}
    assert "'solution'" in str(raised(path))


def test_expert_missing_is_counted(base_rows, tmp_path):
    def blank(rows):
        rows[1]["solution"], rows[2]["solution"], rows[4]["solution"] = None, "", "  \n"

    path = corrupt(base_rows, tmp_path, blank)
    report = validate_parquet(path)
    assert report.counts == {"expert_missing": 3}
    assert [f.row for f in report.examples["expert_missing"]] == [1, 2, 4]
    assert_names(str(report.examples["expert_missing"][0]), path, 1, "solution")
    assert "expert_missing: 3" in report.summary() and "plain GRPO" in report.summary()


def test_non_string_expert_is_counted_missing(base_rows, tmp_path):
    path = corrupt(base_rows, tmp_path, lambda rows: [row.update(solution=7) for row in rows])
    assert validate_parquet(path).counts == {"expert_missing": N_ROWS}


def test_expert_bad_format_is_counted(base_rows, tmp_path):
    def plain(rows):
        rows[3]["solution"] = "I count 2 circles. The answer is 2."

    path = corrupt(base_rows, tmp_path, plain)
    report = validate_parquet(path)
    assert report.counts == {"expert_bad_format": 1}
    assert_names(str(report.examples["expert_bad_format"][0]), path, 3, "solution")


def test_expert_overlong_is_counted(base_rows, tmp_path, tokenizer):
    def long(rows):
        rows[0]["solution"] = f"<think>{'I count circles. ' * 40}</think><answer>2</answer>"

    path = corrupt(base_rows, tmp_path, long)
    report = validate_parquet(path, tokenizer=tokenizer, max_response_tokens=64)
    assert report.counts == {"expert_overlong": 1}
    assert_names(str(report.examples["expert_overlong"][0]), path, 0, "solution")
    assert "calibrl.expert_overlong" in report.summary()
    assert validate_parquet(path).counts == {}  # no tokenizer: no length check


def test_prompt_overlong_is_counted(base_rows, tmp_path, tokenizer):
    def long(rows):
        rows[2]["prompt"] = [{"role": "user", "content": "<image>" + "How many circles are there? " * 60}]

    path = corrupt(base_rows, tmp_path, long)
    report = validate_parquet(path, tokenizer=tokenizer, max_prompt_tokens=100)
    assert report.counts == {"prompt_overlong": 1}
    assert_names(str(report.examples["prompt_overlong"][0]), path, 2, "prompt")


def test_duplicate_ids_are_counted(base_rows, tmp_path):
    def dup(rows):
        rows[4]["extra_info"] = {**rows[4]["extra_info"], "index": 1}

    path = corrupt(base_rows, tmp_path, dup)
    report = validate_parquet(path)
    assert report.counts == {"duplicate_ids": 1}
    message = str(report.examples["duplicate_ids"][0])
    assert_names(message, path, 4, "extra_info.index")
    assert "already used by row 1" in message


def test_undecodable_image_names_row_and_column(base_rows, tmp_path):
    def garble(rows):
        rows[3]["images"] = [{"bytes": png_bytes_of(rows[3])[:40]}]

    path = corrupt(base_rows, tmp_path, garble)
    error = raised(path)
    assert_names(str(error), path, 3, "images")
    assert [f.kind for f in error.findings] == ["image_undecodable"]


def png_bytes_of(row: dict) -> bytes:
    return row["images"][0]["bytes"]


def test_missing_image_is_an_error(base_rows, tmp_path):
    def drop(rows):
        rows[2]["images"] = [{"bytes": None}]

    path = corrupt(base_rows, tmp_path, drop)
    error = raised(path)
    assert_names(str(error), path, 2, "images")
    assert error.findings[0].kind == "image_missing"


def test_image_paths_resolve_inside_the_parquet_folder(base_rows, tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "ok.png").write_bytes(png_bytes(Image.new("RGB", (28, 28), (255, 255, 255))))
    outside = tmp_path.parent / "outside.png"
    outside.write_bytes(b"not read")

    def paths(rows):
        rows[0]["images"] = [{"bytes": None, "path": "imgs/ok.png"}]
        rows[1]["images"] = [{"bytes": None, "path": "../outside.png"}]
        rows[2]["images"] = [{"bytes": None, "path": str(outside)}]
        rows[3]["images"] = [{"bytes": None, "path": "imgs/nope.png"}]

    path = corrupt(base_rows, tmp_path, paths)
    error = raised(path)
    kinds = {f.row: f.kind for f in error.findings}
    assert kinds == {1: "image_path_escape", 2: "image_path_escape", 3: "image_missing"}
    assert_names(str(error), path, 1, "images")
    assert "leaves the parquet's folder" in str(error) and "nope.png" in str(error)


def test_image_count_must_match_placeholders(base_rows, tmp_path):
    def extra(rows):
        rows[5]["images"] = rows[5]["images"] * 2

    path = corrupt(base_rows, tmp_path, extra)
    error = raised(path)
    assert_names(str(error), path, 5, "images")
    assert "2 images but 1 <image> placeholders" in str(error)


def test_ground_truth_missing_is_an_error(base_rows, tmp_path):
    def blank(rows):
        rows[1]["reward_model"] = {"style": "rule", "ground_truth": " "}
        rows[4]["reward_model"] = {"style": "rule", "ground_truth": None}

    path = corrupt(base_rows, tmp_path, blank)
    error = raised(path)
    assert [(f.row, f.kind) for f in error.findings] == [(1, "ground_truth_missing"), (4, "ground_truth_missing")]
    assert_names(str(error), path, 4, "reward_model.ground_truth")


def test_prompt_not_chat_messages_is_an_error(base_rows, tmp_path):
    def flat(rows):
        for row in rows:
            row["prompt"] = row["prompt"][0]["content"]

    path = corrupt(base_rows, tmp_path, flat)
    error = raised(path)
    assert len(error.findings) == N_ROWS and {f.kind for f in error.findings} == {"prompt_not_chat"}
    assert_names(str(error), path, 0, "prompt")
    assert "expected a list of chat messages, got str" in str(error)


def test_all_errors_are_listed_with_a_count(tmp_path, base_rows):
    rows = [dict(base_rows[i % N_ROWS], reward_model={"style": "rule", "ground_truth": ""}) for i in range(25)]
    for i, row in enumerate(rows):
        row["extra_info"] = {**row["extra_info"], "index": i}
    path = write_rows(rows, tmp_path / "many.parquet")
    error = raised(path)
    assert len(error.findings) == 25
    assert "25 data errors" in str(error) and "... and 5 more errors" in str(error)
    assert "row 19," in str(error) and "row 20," not in str(error)
    assert error.report is not None and error.report.counts == {"ground_truth_missing": 25}


def test_unreadable_files_are_named(tmp_path):
    missing = tmp_path / "absent.parquet"
    assert "file not found" in str(raised(missing)) and str(missing) in str(raised(missing))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    assert "not a readable parquet file" in str(raised(junk))


def test_cli_exit_codes(base_rows, tmp_path, capsys):
    clean = write_rows(base_rows, tmp_path / "clean.parquet")
    bad = write_rows([dict(row, reward_model=None) for row in base_rows], tmp_path / "bad.parquet")
    grpo_rows = [{k: v for k, v in row.items() if k != "solution"} for row in base_rows]
    no_expert = write_rows(grpo_rows, tmp_path / "grpo.parquet")
    assert main([str(clean)]) == 0
    assert "6 rows, 0 errors" in capsys.readouterr().out
    assert main([str(clean), str(bad)]) == 1
    captured = capsys.readouterr()
    assert "ERROR ground_truth_missing: 6" in captured.out and str(bad) in captured.err
    assert main([str(no_expert)]) == 1
    assert main([str(no_expert), "--no-expert"]) == 0


def test_a_list_of_expert_traces_is_checked_trace_by_trace(base_rows, tmp_path, tokenizer):
    """Several traces per problem (experts_per_group > 1): each is checked, a finding names its place in the list;
    an empty list is a missing expert."""
    def several(rows):
        good = rows[0]["solution"]
        for row in rows:
            row["solution"] = [row["solution"], good]
        rows[2]["solution"] = [good, "The answer is 2."]
        rows[3]["solution"] = []

    path = corrupt(base_rows, tmp_path, several)
    report = validate_parquet(path, tokenizer=tokenizer, max_response_tokens=512)
    assert report.counts == {"expert_bad_format": 1, "expert_missing": 1}
    assert_names(str(report.examples["expert_bad_format"][0]), path, 2, "solution[1]")
    assert_names(str(report.examples["expert_missing"][0]), path, 3, "solution")
