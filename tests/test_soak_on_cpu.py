"""The soak command (``calibrl_verl.soak``) without its launch: the growth fit and verdict against hand-computed
numbers, the process roles (``calibrl_verl.rss``) and the per-step sampler on real processes this test starts, and
the checkpoint checks and report on checkpoints laid out as verl saves them. The soak run itself (minutes to tens
of minutes of verl's real trainer) is a documented command (docs/reliability.md, "Soak run"), not run here."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from calibrl_verl import launch, rss, soak


# -- the fit and the verdict -----------------------------------------------------------------------------------------
def test_slope_noise_and_verdict_match_a_hand_computation() -> None:
    # x = 1..5, y = 10 12 11 15 14. By hand: mean x 3, mean y 12.4; Sxx = 4+1+0+1+4 = 10;
    # Sxy = (-2)(-2.4) + (-1)(-0.4) + 0(-1.4) + 1(2.6) + 2(1.6) = 11; slope 1.1, intercept 12.4 - 3.3 = 9.1;
    # fitted 10.2 11.3 12.4 13.5 14.6, residuals -0.2 0.7 -1.4 1.5 -0.6, SSR 5.1, noise sqrt(5.1 / 3) = 1.30384;
    # slope SE 1.30384 / sqrt(10) = 0.41231, t = 2.6679; drift over steps 1..5 = 1.1 x 4 = 4.4
    fit = soak.fit_line([1, 2, 3, 4, 5], [10, 12, 11, 15, 14])
    assert (fit.n, fit.first_step, fit.last_step) == (5, 1, 5)
    assert fit.slope == pytest.approx(1.1)
    assert fit.intercept == pytest.approx(9.1)
    assert fit.resid_std == pytest.approx(1.303840, abs=1e-6)
    assert fit.slope_se == pytest.approx(0.412311, abs=1e-6)
    assert fit.t == pytest.approx(2.667891, abs=1e-5)
    assert fit.drift == pytest.approx(4.4)
    # drift 4.4 > 3 x noise 3.91, but t 2.67 < 3: a tilt the scatter can make by chance, not growth
    assert not soak.grows(fit)
    assert soak.grows(fit, min_t=2.5)
    assert not soak.grows(fit, sigmas=3.5, min_t=2.5)  # 4.4 < 3.5 x 1.304 = 4.56
    assert not soak.grows(fit, min_t=2.5, min_drift=5.0)  # 4.4 MB < the 5 MB floor


def test_a_clean_ramp_grows_and_a_flat_or_falling_series_does_not() -> None:
    ramp = soak.fit_line([10, 20, 30, 40], [100.0, 100.5, 101.0, 101.5])  # 0.05 MB/step, no noise at all
    assert ramp.slope == pytest.approx(0.05) and ramp.resid_std == pytest.approx(0, abs=1e-9)
    assert ramp.t == math.inf and soak.grows(ramp)  # drift 1.5 MB over the window, above the 1 MB floor
    # one 4 KiB page added once, halfway through 12 steps: beyond its (tiny) noise with t 5.6, but under the floor
    pages = soak.fit_line(list(range(1, 13)), [100.0] * 6 + [100.004] * 6)
    assert pages.t > 5 and 3 * pages.resid_std < pages.drift < soak.MIN_DRIFT_MB
    assert soak.grows(pages, min_drift=0) and not soak.grows(pages)
    flat = soak.fit_line([1, 2, 3, 4], [50.0, 50.0, 50.0, 50.0])
    assert flat.slope == 0 and flat.t == 0 and not soak.grows(flat)
    falling = soak.fit_line([1, 2, 3, 4], [50.0, 49.0, 48.0, 47.0])
    assert falling.t == -math.inf and not soak.grows(falling)
    # noise around a level: x = 1..4, y = 5 7 5 7 -> slope 0.4, intercept 6 - 0.4 x 2.5 = 5, fitted 5.4 5.8 6.2
    # 6.6, residuals -0.4 1.2 -1.2 0.4, SSR 3.2, noise sqrt(3.2 / 2) = 1.26491
    noisy = soak.fit_line([1, 2, 3, 4], [5.0, 7.0, 5.0, 7.0])
    assert (noisy.slope, noisy.resid_std) == (pytest.approx(0.4), pytest.approx(1.264911, abs=1e-6))
    assert not soak.grows(noisy)  # drift 1.2 < 3 x 1.26
    with pytest.raises(ValueError, match="3 points"):
        soak.fit_line([1, 2], [1.0, 2.0])


def _row(step: int, **mb: float) -> dict:
    row = {"step": step, "t_s": float(step), "step_s": 1.0}
    for g in soak.GROUPS:
        row.update({f"{g}_mb": mb.get(g, 100.0), f"{g}_peak_mb": mb.get(g, 100.0) + 1, f"{g}_procs": 1})
    return row


def test_warmup_steps_are_left_out_of_the_fit() -> None:
    # steps 1-2 climb (warm-up), steps 3..6 are flat except the actor, which climbs 2 MB a step
    rows = [_row(s, driver=50 + (s <= 2) * (s - 3) * 40, actor=200 + 2 * s, rollout=300) for s in range(1, 7)]
    groups = soak.fit_groups(rows, warmup=2, min_points=4)
    assert groups["driver"]["points"] == 4 and groups["driver"]["fit"]["slope"] == 0
    assert groups["driver"]["grows"] is False
    assert groups["actor"]["fit"]["slope"] == pytest.approx(2) and groups["actor"]["grows"] is True
    assert groups["actor"]["first_mb"] == 206 and groups["actor"]["last_mb"] == 212
    assert soak.fit_groups(rows, warmup=0, min_points=4)["driver"]["fit"]["slope"] > 0
    assert soak.fit_groups(rows[:4], warmup=2)["actor"]["fit"] is None  # 2 points after the warm-up
    unjudged = soak.fit_groups(rows, warmup=2)["actor"]  # 4 fitted steps: the fit, but no verdict
    assert unjudged["fit"]["slope"] == pytest.approx(2) and unjudged["grows"] is None
    assert unjudged["why"] == "4 fitted steps, a verdict needs 10"
    assert soak.default_warmup(200) == 10 and soak.default_warmup(6) == 2


def test_memory_that_settles_is_told_from_memory_that_keeps_growing() -> None:
    # steps 1..20: the actor rises 2 MB a step to step 10, then stays level; the rollout rises 0.5 MB a step to the
    # end with +-0.1 MB of scatter; the driver is level
    rows = [_row(s, driver=900, actor=1000 + 2 * min(s, 10), rollout=4000 + 0.5 * s + (0.1 if s % 2 else -0.1))
            for s in range(1, 21)]
    groups = soak.fit_groups(rows, warmup=0)
    actor, rollout, driver = groups["actor"], groups["rollout"], groups["driver"]
    assert actor["fit"]["drift"] > 10 and actor["late_fit"]["slope"] == 0 and actor["late_fit"]["first_step"] == 11
    assert (actor["grows"], actor["settled"]) == (False, True)
    assert rollout["late_fit"]["slope"] == pytest.approx(0.5, abs=0.02) and rollout["late_fit"]["t"] > 3
    assert (rollout["grows"], rollout["settled"]) == (True, False)
    assert (driver["grows"], driver["settled"]) == (False, False)
    assert soak.short_title("/venv/bin/python /venv/ray/dashboard/dashboard.py --x=1") == "python dashboard.py --x=1"


# -- process roles and the per-step sampler on real processes -----------------------------------------------------
# a process that sets its title as Ray and vLLM do (setproctitle), holds MB of touched memory and starts N untitled
# children: python -c PROC TITLE MB N
PROC = ("import setproctitle, subprocess, sys, time; setproctitle.setproctitle(sys.argv[1]); "
        "b = bytearray(int(sys.argv[2]) * 2**20); b[::4096] = b'x' * len(b[::4096]); "
        "[subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']) for _ in range(int(sys.argv[3]))]; "
        "time.sleep(120)")


def _start(title: str, env: dict[str, str], mb: int = 0, children: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROC, title, str(mb), str(children)], env=env)


@pytest.fixture
def tagged_processes():
    """Processes laid out like a launch: the driver (which starts a Ray-daemon-like child), a TaskRunner, an FSDP
    worker holding 96 MB, a vLLM server with an untitled engine child, and a reward worker; all tagged."""
    tag = f"soaktest-{os.getpid()}-{time.time_ns()}"
    # SPT_NOENV: setproctitle keeps the title inside argv's memory and leaves the environment (where the tag is)
    # readable in /proc/<pid>/environ; Ray's raylet sets it for every worker it starts, vLLM's processes inherit it
    env = {**os.environ, launch.TAG_ENV: tag, "SPT_NOENV": "1"}
    titles = {"driver": "python -m calibrl_verl.main_calibrl trainer.total_training_steps=6",
              "taskrunner": "ray::TaskRunner.run", "worker": "ray::WorkerDict.actor_rollout_update_actor",
              "server": "ray::vLLMHttpServer.launch_server", "reward": "ray::RewardLoopWorker.compute_score"}
    procs = {name: _start(title, env, mb=96 if name == "worker" else 0,
                          children=1 if name in ("driver", "server") else 0) for name, title in titles.items()}
    table = rss.ProcessTable(tag)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            info = table.read()
            if (len(info) == 7 and info[procs["worker"].pid][2] > 96 * rss.MB
                    and all(info[procs[n].pid][1].startswith(t) for n, t in titles.items())):
                break
            time.sleep(0.2)
        yield tag, procs, table
    finally:
        launch.kill_tagged(tag)
        for p in procs.values():
            p.wait()


def test_processes_are_grouped_by_title_parent_and_the_pinned_driver(tagged_processes) -> None:
    tag, procs, table = tagged_processes
    info = table.read()
    assert len(info) == 7 and os.getpid() not in info  # this test's own process is not tagged
    children = {pid: parent for pid, (parent, _, _) in info.items() if parent in (procs["driver"].pid,
                                                                                 procs["server"].pid)}
    daemon = next(pid for pid, parent in children.items() if parent == procs["driver"].pid)
    engine = next(pid for pid, parent in children.items() if parent == procs["server"].pid)
    roles = rss.classify(info, rss.SOAK_ROLES, pinned={procs["driver"].pid: "driver"})
    assert roles == {procs["driver"].pid: "driver", procs["taskrunner"].pid: "driver",
                     procs["worker"].pid: "actor", procs["server"].pid: "rollout", engine: "rollout",
                     procs["reward"].pid: "rest", daemon: "rest"}  # the driver's role is not inherited
    # the benchmark's roles from the same code: trainer = TaskRunner + FSDP worker, the driver is "rest"
    assert rss.classify(info, rss.TRAINER_ROLES) == {**roles, procs["driver"].pid: "rest",
                                                     procs["taskrunner"].pid: "trainer",
                                                     procs["worker"].pid: "trainer"}
    sums = rss.sums(info, roles)
    assert sums["actor"] == info[procs["worker"].pid][2] > 96 * rss.MB
    assert sums["total"] == sum(rss_ for _, _, rss_ in info.values())
    assert sums["driver"] + sums["actor"] + sums["rollout"] + sums["rest"] == sums["total"]


def test_the_sampler_writes_one_row_per_logged_step(tagged_processes, tmp_path: Path) -> None:
    tag, procs, _ = tagged_processes
    metrics = tmp_path / "metrics.jsonl"
    sampler = soak.StepSampler(tag, procs["driver"].pid, metrics, tmp_path / "rss.csv",
                               tmp_path / "rss_processes.jsonl", interval=0.3, poll=0.05)
    sampler.start()
    with open(metrics, "ab", buffering=0) as f:
        f.write(b'{"step": 0, "data": {"val-core/acc": 0.5}}\n')  # a validation line: not a training step
        for step in (1, 2, 3):
            time.sleep(0.5)
            line = json.dumps({"step": step, "data": {"training/global_step": step, "timing_s/step": 1.25}})
            f.write(line[:10].encode())  # a line written in two parts is read once it is whole
            time.sleep(0.1)
            f.write(line[10:].encode() + b"\n")
    deadline = time.time() + 10
    while len(sampler.rows) < 3 and time.time() < deadline:
        time.sleep(0.1)
    sampler.stop()
    assert sampler.error is None
    with open(tmp_path / "rss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:
        assert (r["driver_procs"], r["actor_procs"], r["rollout_procs"], r["rest_procs"], r["total_procs"]) == (
            "2", "1", "2", "2", "7")
        assert float(r["actor_mb"]) > 96 and float(r["actor_peak_mb"]) >= float(r["actor_mb"])
        assert float(r["step_s"]) == 1.25
        assert float(r["total_mb"]) == pytest.approx(sum(float(r[f"{g}_mb"]) for g in soak.VERDICT_GROUPS)
                                                     + float(r["rest_mb"]), abs=0.05)
    per_step = [json.loads(line) for line in (tmp_path / "rss_processes.jsonl").read_text().splitlines()]
    assert [p["step"] for p in per_step] == [1, 2, 3] and all(len(p["processes"]) == 7 for p in per_step)
    worker = next(p for p in per_step[0]["processes"] if p[0] == procs["worker"].pid)
    assert worker[1] == "actor" and "WorkerDict" in worker[2]


# -- checkpoints and the report -------------------------------------------------------------------------------------
def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _save(root: Path, step: int, model, drop_key: str | None = None) -> None:
    """What verl's FSDP save leaves for one step on one rank (plain tensors where verl has 1-rank DTensors)."""
    import numpy as np

    folder = root / f"global_step_{step}"
    (folder / "actor" / "huggingface").mkdir(parents=True)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight" and k != drop_key}
    torch.save(state, folder / "actor" / "model_world_size_1_rank_0.pt")
    torch.save({"state": {}, "param_groups": [{"lr": 1e-3}]}, folder / "actor" / "optim_world_size_1_rank_0.pt")
    torch.save({"lr_scheduler": {}, "rng": {"numpy": np.random.get_state()}},
               folder / "actor" / "extra_state_world_size_1_rank_0.pt")
    (folder / "actor" / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    model.config.save_pretrained(folder / "actor" / "huggingface")
    torch.save({"_num_yielded": step}, folder / "data.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(step))


def _soak_dir(tmp_path: Path, actor_slope: float = 0.0, steps: int = 6, save_freq: int = 2) -> Path:
    """A soak output folder as the command leaves it: rss.csv, rss_processes.jsonl, the run's record, checkpoints."""
    out = tmp_path / "soak"
    root = out / "run" / "checkpoints"
    model = _tiny_model()
    for step in soak.expected_steps(steps, save_freq):
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(0.01)
        _save(root, step, model)
    # flat groups with a little alternating scatter; the actor climbs actor_slope MB a step
    rows = [_row(s, driver=900 + (s % 2) * 0.5, actor=2000 + actor_slope * s, rollout=4200 - (s % 2) * 0.4)
            for s in range(1, steps + 1)]
    with open(out / "rss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=soak.CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "rss_processes.jsonl").write_text("".join(
        json.dumps({"step": s, "processes": [[11, "actor", "ray::WorkerDict   ", 2000 + actor_slope * s]]}) + "\n"
        for s in range(1, steps + 1)))
    run = {"steps": steps, "save_freq": save_freq, "loss_mode": "calibrl", "overrides": [], "wall_s": 100.0,
           "steps_logged": steps, "error": None, "sampler_error": None, "date": "2026-12-07 22:00 UTC"}
    (out / "summary.json").write_text(json.dumps({"run": run}))
    return out


def test_checkpoints_are_checked_complete_loaded_and_moving(tmp_path: Path) -> None:
    out = _soak_dir(tmp_path)
    root = out / "run" / "checkpoints"
    assert soak.expected_steps(6, 2) == [2, 4, 6] and soak.expected_steps(7, 3) == [3, 6, 7]
    result = soak.check_checkpoints(root, 6, 2)
    assert result["ok"], result
    assert result["complete_on_disk"] == [2, 4, 6] and result["tracker"] == "global_step_6"
    first, second = result["checkpoints"][:2]
    assert first["architecture"] == "LlamaForCausalLM" and first["tensors"] == 11 and first["errors"] == []
    assert "moved_from_previous" not in first and second["moved_from_previous"] == pytest.approx(0.01)
    # a missing shard, a model state that does not fit its architecture, weights that did not move
    (root / "global_step_2" / "actor" / "optim_world_size_1_rank_0.pt").unlink()
    model = _tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.02)
    for step in (4, 6):
        shutil_rmtree(root / f"global_step_{step}")
    _save(root, 4, model, drop_key="model.norm.weight")
    _save(root, 6, model)
    bad = {c["step"]: c for c in soak.check_checkpoints(root, 6, 2)["checkpoints"]}
    assert bad[2]["missing"] == ["actor/optim_world_size_1_rank_0.pt"] and not bad[2]["ok"]
    assert "missing ['model.norm.weight']" in bad[4]["errors"][0]
    assert bad[6]["errors"] == ["weights identical to the previous checkpoint's"]
    assert not soak.check_checkpoints(root, 8, 2)["ok"]  # global_step_8 expected, the tracker names 6


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def test_report_of_a_saved_run_passes_flat_memory_and_fails_growth(tmp_path: Path, capsys) -> None:
    out = _soak_dir(tmp_path, steps=12, save_freq=4)
    assert soak.main(["--report", str(out), "--warmup", "1"]) == 0  # 11 fitted steps
    text = capsys.readouterr().out
    assert "VERDICT: PASS" in text and "global_step_12: complete, loaded (11 tensors" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warmup"] == 1 and summary["groups"]["actor"]["grows"] is False
    assert summary["checkpoints"]["expected"] == [4, 8, 12]
    assert (out / "report.txt").read_text() == text
    # the default warm-up (min(10, 12 // 3) = 4) leaves 8 fitted steps: no verdict, exit 2
    assert soak.main(["--report", str(out)]) == 2
    assert "VERDICT: NOT JUDGED" in capsys.readouterr().out

    grown = _soak_dir(tmp_path / "grown", actor_slope=5.0, steps=12, save_freq=4)
    assert soak.main(["--report", str(grown), "--warmup", "1"]) == 1
    text = capsys.readouterr().out
    assert "VERDICT: FAIL" in text and "GROWS" in text and "+5.000" in text
    assert "actor 'ray::WorkerDict' +5.000 MB/step" in text
    assert json.loads((grown / "summary.json").read_text())["steepest_processes"][0]["slope"] == pytest.approx(5)


class _Recorder:
    """A sampler that records when it was started and stopped."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")


def _real_launch(tmp_path: Path, code: str) -> launch.Launch:
    log_path = tmp_path / "launch.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    return launch.Launch(proc, tmp_path / "metrics.jsonl", log_path, "supervise-test", log)


def test_supervise_returns_a_failure_as_text_and_stops_the_sampler(tmp_path: Path) -> None:
    ok, sampler = _real_launch(tmp_path, "print('fine')"), _Recorder()
    assert ok.supervise(60, sampler) is None
    assert sampler.calls == ["start", "stop"]

    failed, sampler = _real_launch(tmp_path, "import sys; print('boom'); sys.exit(3)"), _Recorder()
    error = failed.supervise(60, sampler)
    assert error is not None and error.startswith("RuntimeError: training exited 3") and "boom" in error
    assert sampler.calls == ["start", "stop"]

    slow = _real_launch(tmp_path, "import time; time.sleep(60)")
    error = slow.supervise(1)
    assert error is not None and error.startswith("TimeoutExpired")
    assert slow.proc.poll() is not None  # killed, not left running


# -- Ray's task-event records, bounded in every launch ---------------------------------------------------------------
_TASK_EVENTS_CHILD = """
import json, sys, time
import psutil, ray
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
@ray.remote
class Echo:
    def ping(self) -> int:
        return 1
echo = Echo.remote()
ray.get([echo.ping.remote() for _ in range(int(sys.argv[1]))])
time.sleep(3)  # each worker sends its task events to the GCS every second (RAY_task_events_report_interval_ms)
stored = len(ray._private.state.state._get_all_task_events())  # what ray.timeline reads from the GCS
gcs = next(p for p in psutil.Process().children(recursive=True) if p.name().startswith("gcs_server"))
print(json.dumps({"stored": stored, "gcs_env": {k: gcs.environ().get(k) for k in sys.argv[2:]}}))
ray.shutdown()
"""


def test_the_launch_env_bounds_the_task_events_the_gcs_keeps(tmp_path: Path, monkeypatch) -> None:
    # A launch's driver starts the Ray cluster with ray.init: the GCS inherits the driver's environment, which
    # launch_env builds. A bare cluster (no launch) with that environment gets more calls than the cap and keeps only
    # the cap's number of task records (without it, Ray's default keeps 100,000: all of them).
    for key in launch.RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    env = launch.launch_env(tmp_path / "metrics.jsonl", "task-events-test", "none")
    cap = int(launch.RAY_ENV["RAY_task_events_max_num_task_in_gcs"])
    assert cap <= 1000 and env["RAY_task_events_max_dropped_task_attempts_tracked_per_job_in_gcs"] == str(cap)
    calls = cap + 200
    out = subprocess.run([sys.executable, "-c", _TASK_EVENTS_CHILD, str(calls), *launch.RAY_ENV], env=env,
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["gcs_env"] == launch.RAY_ENV
    assert record["stored"] == cap  # calls + the actor's creation + the driver's task > cap: the oldest evicted

    # the caller's own value wins (a run that wants every record kept sets it)
    monkeypatch.setenv("RAY_task_events_max_num_task_in_gcs", "-1")
    assert launch.launch_env(tmp_path / "m.jsonl", "t", "none")["RAY_task_events_max_num_task_in_gcs"] == "-1"
