"""Text-only data: OpenR1-Math with R1 expert traces, the six text benchmarks, the reward on their answer forms,
and the progress helper (tqdm bar on a terminal, plain lines otherwise)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calibrl_verl.data import prep, text_prep
from calibrl_verl.data.validate import validate_parquet
from calibrl_verl.progress import Progress, progress
from calibrl_verl.reward import compute_score

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "examples" / "data_preprocess"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"text_prep_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


openr1_math = load_script("openr1_math")
text_benchmarks = load_script("text_benchmarks")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def read_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def check_output(path: Path, data_source: str, needs_expert: bool) -> list[dict]:
    """Every column has the schema's type, the rows pass the data validator, and no row has images."""
    table = pq.read_table(path)
    assert table.schema.equals(prep.OUTPUT_SCHEMA), table.schema
    validate_parquet(path, needs_expert=needs_expert)  # raises on any error finding
    rows = table.to_pylist()
    for row in rows:
        assert row["data_source"] == data_source and row["ability"] == "math"
        assert row["images"] == [] and "<image>" not in row["prompt"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith(prep.INSTRUCTION)
        assert row["reward_model"]["style"] == "rule" and row["reward_model"]["ground_truth"]
        assert row["extra_info"]["answer"] == row["reward_model"]["ground_truth"]
    assert [row["extra_info"]["index"] for row in rows] == list(range(len(rows)))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# OpenR1-Math
# --------------------------------------------------------------------------------------------------------------------


def trace(think: str, answer: str) -> str:
    """A DeepSeek-R1 generation: think block, then a summary ending in a boxed answer."""
    return f"<think>\n{think}\n</think>\n\nSo the result is $\\boxed{{{answer}}}$."


def openr1_records() -> list[dict]:
    """Six rows covering every expert-selection rule (card layout, with the unused columns present too)."""
    base = {"solution": "human-written (unused)", "problem_type": "Algebra", "question_type": "math-word-problem",
            "source": "olympiads", "correctness_llama": None, "finish_reasons": None, "correctness_count": 1,
            "messages": []}  # fmt: skip

    def row(uuid: str, problem: str, answer: str, gens: list[str], verified: list, complete: list) -> dict:
        return {**base, "uuid": uuid, "problem": problem, "answer": answer, "generations": gens,
                "correctness_math_verify": verified, "is_reasoning_complete": complete}  # fmt: skip

    return [
        # unverified first trace skipped, second (verified, complete, right) taken
        row("u1", "What is 2+2?", "4", [trace("2+2=5?", "5"), trace("2+2 is 4.", "4")], [False, True], [True, True]),
        # verified but reasoning incomplete: no expert
        row("u2", "Half of 1?", "\\frac{1}{2}", [trace("one half", "0.5")], [True], [False]),
        # verified + complete, but our reward rejects its answer; then one without </think> (unparsable)
        row(
            "u3", "What is 3*3?", "9", [trace("3*3 = 8", "8"), "no think block, \\boxed{9}"], [True, True], [True, True]
        ),
        # no traces at all
        row("u4", "What is 10-3?", "7", [], [], []),
        # numeric equivalence: the R1 answer 0.75 is graded equal to the ground truth \frac{3}{4}
        row("u5", "3/4 as a decimal?", "$\\frac{3}{4}$", [trace("3 over 4", "0.75")], [True], [True]),
        # a missing (None) flag counts as unverified: the second trace is taken
        row("u6", "What is 1+1?", "2", [trace("1+1=2", "2"), trace("again 2", "2")], [None, True], [True, True]),
    ]


def test_wrap_r1_trace() -> None:
    assert text_prep.wrap_r1_trace(trace("a\nb", "\\frac{1}{2}")) == "<think>a\nb</think><answer>\\frac{1}{2}</answer>"
    assert (
        text_prep.wrap_r1_trace("no open tag </think> answer \\boxed{3}")
        == "<think>no open tag</think><answer>3</answer>"
    )
    assert text_prep.wrap_r1_trace("<think>x</think>The answer is: 12") == "<think>x</think><answer>12</answer>"
    assert text_prep.wrap_r1_trace("<think>boxed inside \\boxed{7}</think>") == (
        "<think>boxed inside \\boxed{7}</think><answer>7</answer>"
    )  # no answer in the summary: the think part's last boxed answer
    assert text_prep.wrap_r1_trace("<think>never closed \\boxed{3}") is None
    assert text_prep.wrap_r1_trace("<think></think>\\boxed{3}") is None  # empty think
    assert text_prep.wrap_r1_trace("<think>x</think>no final answer here") is None
    assert text_prep.wrap_r1_trace("<think>x <answer>1</answer></think>\\boxed{1}") is None  # stray tags


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_openr1_math_expert_selection(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture) -> None:
    records = openr1_records()
    source = (write_parquet if fmt == "parquet" else write_jsonl)(tmp_path / f"openr1.{fmt}", records)
    out = tmp_path / "train.parquet"
    summary = openr1_math.main(["--input", str(source), "--output", str(out)])

    rows = check_output(out, "openr1_math", needs_expert=True)
    assert [r["extra_info"]["id"] for r in rows] == ["u1", "u2", "u3", "u4", "u5", "u6"]
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["4", "\\frac{1}{2}", "9", "7", "\\frac{3}{4}", "2"]
    assert rows[0]["prompt"][0]["content"] == f"What is 2+2?\n{prep.INSTRUCTION}"
    solutions = [r["solution"] for r in rows]
    assert solutions == ["<think>2+2 is 4.</think><answer>4</answer>", "", "", "",
                         "<think>3 over 4</think><answer>0.75</answer>",
                         "<think>again 2</think><answer>2</answer>"]  # fmt: skip
    for row in rows:
        if row["solution"]:  # every kept expert is correct by the training reward and well formatted
            score = compute_score("openr1_math", row["solution"], row["reward_model"]["ground_truth"])
            assert (score["acc"], score["format"]) == (1.0, 1.0)
    assert summary["rows_written"] == 6 and summary["rows_read"] == 6
    assert summary["expert_r1_trace"] == 3 and summary["expert_missing"] == 3 and summary["expert_correct"] == 3
    assert summary["traces_checked"] == 8
    assert summary["trace_unverified"] == 2  # u1's first, u6's first
    assert (
        summary["trace_incomplete"] == 1 and summary["trace_reward_rejected"] == 1 and summary["trace_unparsable"] == 1
    )
    assert validate_parquet(out).counts == {"expert_missing": 3}

    captured = capsys.readouterr()
    assert re.search(r"^trace_reward_rejected\s+1$", captured.out, re.MULTILINE)  # the printed summary
    assert "[prep openr1_math] 6/6 rows (100.0%)" in captured.err and "kept=6, dropped=0" in captured.err


def test_openr1_math_require_expert_and_limit(tmp_path: Path) -> None:
    source = write_parquet(tmp_path / "openr1.parquet", openr1_records())
    out = tmp_path / "train.parquet"
    summary = openr1_math.main(["--input", str(source), "--output", str(out), "--require-expert"])
    rows = check_output(out, "openr1_math", needs_expert=True)
    assert [r["extra_info"]["id"] for r in rows] == ["u1", "u5", "u6"] and all(r["solution"] for r in rows)
    assert summary["skipped_no_expert"] == 3 and summary["rows_written"] == 3
    assert validate_parquet(out).counts == {}
    summary = openr1_math.main(["--input", str(source), "--output", str(out), "--limit", "2"])
    assert summary["rows_written"] == 2 and [r["extra_info"]["id"] for r in read_rows(out)] == ["u1", "u2"]


def test_openr1_math_missing_columns_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = [{k: v for k, v in r.items() if k != "correctness_math_verify"} for r in openr1_records()]
    source = write_parquet(tmp_path / "no_flags.parquet", records)
    with pytest.raises(SystemExit) as exc:
        prep.run_cli(openr1_math.main, ["--input", str(source), "--output", str(tmp_path / "o.parquet")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "missing verified column (tried 'correctness_math_verify')" in err
    assert "available columns: ['answer', 'correctness_count'" in err and "'generations'" in err
    assert not (tmp_path / "o.parquet").exists()

    renamed = write_parquet(tmp_path / "renamed.parquet", [{"question": "q", "final": "1"}])
    with pytest.raises(prep.PrepError, match=r"missing answer column \(tried 'answer'\); available columns: "
                                             r"\['final', 'question'\]"):  # fmt: skip
        openr1_math.main(["--input", str(renamed), "--output", str(tmp_path / "o.parquet")])
    # the trace columns can be renamed on the command line
    flags = [{**r, "verified": r["correctness_math_verify"]} for r in openr1_records()]
    source = write_parquet(tmp_path / "renamed_flags.parquet", [{k: v for k, v in r.items() if k !=
                           "correctness_math_verify"} for r in flags])  # fmt: skip
    summary = openr1_math.main(["--input", str(source), "--output", str(tmp_path / "o.parquet"),
                                "--verified-column", "verified"])  # fmt: skip
    assert summary["expert_r1_trace"] == 3


def test_r1_picker_counts_every_rule() -> None:
    picker = text_prep.R1ExpertPicker(text_prep.TraceColumns("g", "v", "c"))
    stats: Counter = Counter()
    record = {
        "g": [trace("x", "1"), trace("y", "2"), trace("z", "3")],
        "v": [True, True, True],
        "c": [True, True, True],
    }
    assert picker(record, "3", stats) == ("<think>z</think><answer>3</answer>", "expert_r1_trace")
    assert stats == Counter(traces_checked=3, trace_reward_rejected=2)
    assert picker({"g": None, "v": None, "c": None}, "3", stats) == ("", "expert_missing")
    assert picker({"g": [123], "v": [True], "c": [True]}, "3", stats) == ("", "expert_missing")  # not a string
    assert stats["trace_unparsable"] == 1
    # flag lists shorter than the traces: an unflagged trace is neither verified nor complete
    stats.clear()
    record = {"g": [trace("x", "3"), trace("y", "3")], "v": [True], "c": [True, True]}
    assert picker(record, "3", stats) == ("<think>x</think><answer>3</answer>", "expert_r1_trace")
    assert picker({**record, "v": [False]}, "3", stats) == ("", "expert_missing")
    assert picker({**record, "v": [False, True], "c": [True]}, "3", stats) == ("", "expert_missing")
    assert stats == Counter(traces_checked=5, trace_unverified=3, trace_incomplete=1)


# --------------------------------------------------------------------------------------------------------------------
# text benchmarks
# --------------------------------------------------------------------------------------------------------------------

# (benchmark, one record in the card's layout, expected question, expected ground truth, expected id)
LAYOUTS = [
    ("math500", {"problem": "Compute $\\sqrt{12}$.", "solution": "...", "answer": "2\\sqrt{3}", "subject": "Algebra",
                 "level": 2, "unique_id": "test/algebra/1.json"}, "Compute $\\sqrt{12}$.", "2\\sqrt{3}",
     "test/algebra/1.json"),
    ("aime24", {"id": 60, "problem": "Find m+n.", "solution": "...", "answer": "033", "url": "u", "year": "2024"},
     "Find m+n.", "033", "60"),
    ("aime25", {"question": "Find the sum.", "answer": "70"}, "Find the sum.", "70", "0"),
    ("aime25", {"problem": "Find the sum.", "answer": "70", "id": "I-1"}, "Find the sum.", "70", "I-1"),
    ("amc23", {"id": 0, "problem": "How many?", "answer": 27.0, "url": "u"}, "How many?", "27", "0"),
    ("minerva", {"question": "Give the wavelength in m.", "answer": "7.5e-5"}, "Give the wavelength in m.", "7.5e-5",
     "0"),
    ("olympiadbench", {"id": 1606, "question": "Find all x.", "final_answer": ["$\\frac{1}{2}$", "$3$"],
                       "is_multiple_answer": True, "unit": None}, "Find all x.", "\\frac{1}{2}, 3", "1606"),
    ("olympiadbench", {"question": "Find x.", "answer": "$-\\frac{3}{4}$"}, "Find x.", "-\\frac{3}{4}", "0"),
]  # fmt: skip


@pytest.mark.parametrize(("benchmark", "record", "question", "truth", "row_id"), LAYOUTS)
def test_text_benchmark_layouts(
    tmp_path: Path, benchmark: str, record: dict, question: str, truth: str, row_id: str
) -> None:
    source = write_parquet(tmp_path / "raw.parquet", [record, record])
    out = tmp_path / f"{benchmark}.parquet"
    summary = text_benchmarks.main(["--benchmark", benchmark, "--input", str(source), "--output", str(out)])
    rows = check_output(out, benchmark, needs_expert=False)
    assert summary["rows_written"] == 2 and len(rows) == 2
    assert rows[0]["prompt"][0]["content"] == f"{question}\n{prep.INSTRUCTION}"
    assert rows[0]["extra_info"]["question"] == question
    assert rows[0]["reward_model"]["ground_truth"] == truth and rows[0]["extra_info"]["id"] == row_id
    assert rows[0]["solution"] == ""
    # a correct, formatted response gets the full reward on this ground truth
    assert compute_score(benchmark, f"<think>t</think><answer>{truth}</answer>", truth)["score"] == pytest.approx(1.1)


def test_text_benchmark_wrong_layout_lists_columns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "q", "target": "1"}])
    with pytest.raises(SystemExit) as exc:
        prep.run_cli(text_benchmarks.main, ["--benchmark", "minerva", "--input", str(source), "--output",
                                            str(tmp_path / "o.parquet")])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "missing question column (tried 'question', 'problem'); available columns: ['prompt', 'target']" in err
    with pytest.raises(prep.PrepError, match="missing answer column .*'final_answer', 'answer'"):
        text_benchmarks.main(["--benchmark", "olympiadbench", "--input", str(write_jsonl(tmp_path / "b.jsonl",
                             [{"question": "q"}])), "--output", str(tmp_path / "o.parquet")])  # fmt: skip
    # an override names another column
    summary = text_benchmarks.main(["--benchmark", "minerva", "--input", str(source), "--output",
                                    str(tmp_path / "o.parquet"), "--question-column", "prompt",
                                    "--answer-column", "target"])  # fmt: skip
    assert summary["rows_written"] == 1 and read_rows(tmp_path / "o.parquet")[0]["data_source"] == "minerva"


def test_text_benchmark_cli_prints_progress_lines(tmp_path: Path) -> None:
    """As a user runs it in a log (stderr not a terminal): periodic plain lines, never a \\r progress bar."""
    records = [{"problem": f"What is {i}+1?", "answer": str(i + 1), "unique_id": f"id{i}"} for i in range(5)]
    records.append({"problem": "No answer here", "answer": "", "unique_id": "id5"})
    source = write_jsonl(tmp_path / "math500.jsonl", records)
    env = {**os.environ, "CALIBRL_PROGRESS_EVERY": "2"}
    env.pop("CALIBRL_PROGRESS", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "text_benchmarks.py"), "--benchmark", "math500", "--input", str(source),
         "--output", str(tmp_path / "out.parquet")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[prep math500]")]
    assert [line.split(" rows")[0] for line in lines] == [f"[prep math500] {n}/6" for n in (2, 4, 6)]
    assert lines[-1].endswith("kept=5, dropped=1") and "\r" not in result.stderr
    assert "rows_written         5" in result.stdout and "skipped_no_answer    1" in result.stdout


# --------------------------------------------------------------------------------------------------------------------
# the reward on the benchmarks' answer forms
# --------------------------------------------------------------------------------------------------------------------

GRADED_EQUAL = [
    ("033", "33"), ("33", "033"), ("27", "27.0"), ("204", "204"),  # AIME / AMC integers
    ("\\frac{1}{2}", "\\dfrac{1}{2}"), ("\\frac{1}{2}", "0.5"), ("\\frac{1}{4}", "\\frac14"), ("-\\frac{1}{2}", "-0.5"),
    ("2\\sqrt{3}", "2\\sqrt3"), ("2\\sqrt{3}", "\\sqrt{12}"), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("5", "\\boxed{5}"), ("\\boxed{5}", "5"), ("10\\%", "10"), ("\\text{(C)}", "C"), ("32,\\!348", "32348"),
    ("(3,-1)", "(3, -1)"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("x^2+1", "1+x^2"),
    ("5 \\mathrm{~m}", "5"), ("\\text{Evelyn}", "Evelyn"),
    # fixed here: currency (MATH writes \$) and scientific notation (Minerva)
    ("\\$18.90", "18.90"), ("18.90", "\\$18.90"), ("7.5e-5", "7.5 \\times 10^{-5}"), ("7.5 \\times 10^{-5}", "7.5e-5"),
    ("3e8", "3 \\cdot 10^{8}"), ("1.6e-19", "1.6 \\times 10^{-19}"),
]  # fmt: skip
GRADED_DIFFERENT = [("1.6e-19", "3.2 \\times 10^{-19}"), ("7.5e-5", "7.6e-5"), ("33", "034"), ("\\$5", "6"),
                    ("2\\sqrt{3}", "3\\sqrt{2}"), ("1e-12", "2e-12")]  # fmt: skip


@pytest.mark.parametrize(("truth", "answer"), GRADED_EQUAL)
def test_reward_grades_benchmark_answer_forms(truth: str, answer: str) -> None:
    assert compute_score("math500", f"<think>t</think><answer>{answer}</answer>", truth)["acc"] == 1.0


@pytest.mark.parametrize(("truth", "answer"), GRADED_DIFFERENT)
def test_reward_rejects_different_values(truth: str, answer: str) -> None:
    assert compute_score("minerva", f"<think>t</think><answer>{answer}</answer>", truth)["acc"] == 0.0


# --------------------------------------------------------------------------------------------------------------------
# progress helper
# --------------------------------------------------------------------------------------------------------------------


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CALIBRL_PROGRESS", "CALIBRL_PROGRESS_EVERY", "CALIBRL_PROGRESS_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    stream = io.StringIO()
    bar = progress(range(5), desc="grid", unit="runs", every=2, stream=stream)
    assert bar.mode == "lines" and bar.total == 5
    seen = []
    for item in bar:
        seen.append(item)
        bar.set_postfix(acc=f"{10 * (item + 1)}%")
    assert seen == [0, 1, 2, 3, 4] and bar.n == 5
    lines = stream.getvalue().splitlines()
    assert [line.split(" elapsed")[0].rsplit(" ", 2)[0] for line in lines] == [
        "[grid] 2/5 runs (40.0%)", "[grid] 4/5 runs (80.0%)", "[grid] 5/5 runs (100.0%)"]  # fmt: skip
    assert lines[0].endswith(", acc=20%") and lines[-1].endswith(", acc=50%")  # each line: the items done so far
    bar.close()  # closing twice prints nothing more
    assert len(stream.getvalue().splitlines()) == 3


def test_progress_time_based_lines_and_unknown_total() -> None:
    stream = io.StringIO()
    with Progress(total=None, desc="", unit="rows", interval=0.0, mode="lines", stream=stream) as bar:
        bar.update(3)
        bar.update(4)
    lines = stream.getvalue().splitlines()
    # interval 0: a line per update; closing does not repeat the count the last line showed
    assert [line.split(" rows")[0] for line in lines] == ["3", "7"]
    stream = io.StringIO()
    with Progress(total=3, desc="runs", unit="run", every=1, mode="lines", stream=stream) as bar:
        bar.update()
    assert [line.split(" run")[0] for line in stream.getvalue().splitlines()] == ["[runs] 1/3"]
    assert Progress(total=None, mode="lines", stream=io.StringIO()).format_line(2.0) == "0 it 0.0 it/s elapsed 2s"


def test_progress_bar_on_a_terminal_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALIBRL_PROGRESS", raising=False)
    tty = TtyStream()
    bar = progress(total=4, desc="eval", unit="rows", stream=tty)
    assert bar.mode == "bar"
    bar.set_postfix(acc="50.0%")
    bar.update(4)
    bar.close()
    assert "\r" in tty.getvalue() and "4/4" in tty.getvalue() and "acc=50.0%" in tty.getvalue()

    monkeypatch.setenv("CALIBRL_PROGRESS", "lines")
    assert progress(total=1, stream=TtyStream()).mode == "lines"  # forced lines on a terminal
    monkeypatch.setenv("CALIBRL_PROGRESS", "off")
    quiet = io.StringIO()
    for _ in progress(range(3), stream=quiet):
        pass
    assert quiet.getvalue() == ""
    monkeypatch.setenv("CALIBRL_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="CALIBRL_PROGRESS / mode must be one of"):
        progress(total=1)
    monkeypatch.setenv("CALIBRL_PROGRESS", "lines")
    monkeypatch.setenv("CALIBRL_PROGRESS_EVERY", "0")
    with pytest.raises(ValueError, match="CALIBRL_PROGRESS_EVERY must be a positive integer, got '0'"):
        progress(total=1)
    monkeypatch.setenv("CALIBRL_PROGRESS_EVERY", "1")
    monkeypatch.setenv("CALIBRL_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="CALIBRL_PROGRESS_INTERVAL must be a number of seconds"):
        progress(total=1)
