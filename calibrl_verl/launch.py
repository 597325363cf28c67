"""The launcher of the tiny recipe: one training launch of CalibRL's real trainer on a tiny model, with a timeout.

A launch is ``python -m calibrl_verl.main_calibrl`` (verl's real trainer: Ray, TransferQueue, FSDP2 engine worker,
agent loop, verl's vLLM rollout server and weight sync, reward loop) in its own process, logging its metrics with
verl's file logger into ``<run dir>/<name>.jsonl`` and its output into ``<name>.log``. This module holds:

- ``recipe_overrides``: the tiny recipe's Hydra overrides (4 prompts x (4 samples + 1 expert), short responses,
  checkpoints in the run dir) on the tiny models of ``calibrl_verl.tiny``; ``ensure_assets`` builds those once.
- ``start`` / ``launch`` / ``Launch``: start a launch, wait for it with a timeout, kill it. ``device="cpu"`` adds
  the CPU backend (``calibrl_verl.cpu``: vLLM's CPU build, gloo); ``"gpu"`` runs the same recipe on one GPU. Every
  process of a launch's Ray cluster carries a tag in its environment (``TAG_ENV``), by which ``tagged_pids`` finds
  them and ``kill_tagged`` kills them: a timed-out or pre-empted launch leaves no process behind.
  ``launch_env`` is a launch's environment, with ``RAY_ENV``: Ray's GCS keeps only the last 1,000 task records.
- ``run``: one whole run (build the assets if missing, launch, draw the curves with ``calibrl_verl.plots``).
- ``read_steps`` / ``logged_steps``: a launch's logged training steps (metrics / step numbers), from its metrics
  JSONL.

Used by the smoke CLI and checks (``calibrl_verl.smoke``: ``python -m calibrl_verl.smoke run`` is the CPU demo
``recipes/run_calibrl_tiny_cpu.sh`` and the GPU smoke ``recipes/gpu_smoke.sh``), the toy and coverage studies
(``calibrl_verl.study.grid``, ``calibrl_verl.study.coverage``), ``benchmarks/bench_step.py`` and the smoke tests
(``tests/test_smoke_*.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrl_verl import tiny

N_ONPOLICY = 4
PROMPTS_PER_STEP = 4
# A launch that runs longer is killed with its Ray cluster: a failed weight sync into vLLM hangs instead of failing
# (docs/cpu_backend.md), so no launch may wait forever. The tiny recipe takes 2-3 minutes on 2 cores.
DEFAULT_TIMEOUT_S = 1200


def recipe_overrides(assets: Path, run_dir: Path, steps: int, loss_mode: str, device: str,
                     save_freq: int | None = None, family: str = "qwen2_5_vl") -> list[str]:
    """The tiny recipe: 4 prompts x (4 samples + 1 expert), short responses, checkpoints in ``run_dir``.

    A checkpoint is saved every ``save_freq`` steps (default: at the last step only). ``family="text"`` or
    ``"wall"``: the text-only model (no processor) on that task's rows, which have no images.
    """
    text = family in ("text", "wall")
    args = [
        f"data.train_files={tiny.train_files(assets)}", f"data.val_files={tiny.val_files(assets)}",
        "data.image_key=images", f"data.train_batch_size={PROMPTS_PER_STEP}", "data.max_prompt_length=512",
        "data.max_response_length=48", "data.shuffle=false",
        f"actor_rollout_ref.model.path={tiny.text_model_dir(assets) if text else tiny.model_dir(assets)}",
        f"calibrl.n_onpolicy={N_ONPOLICY}", "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS_PER_STEP}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.optim.lr=5e-4", "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0",
        f"calibrl.loss_mode={loss_mode}",
        "trainer.logger=[console,file]", "trainer.project_name=calibrl_tiny",
        f"trainer.experiment_name={run_dir.name}", f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        f"trainer.total_training_steps={steps}", f"trainer.save_freq={save_freq or steps}",
        "trainer.max_actor_ckpt_to_keep=1", "trainer.test_freq=-1", "trainer.val_before_train=false",
        "trainer.resume_mode=auto",
        # reproducible sampling (and resume equality): a vLLM seed per request from what the request is
        "calibrl.seeded_rollouts=true",
    ]
    if family == "qwen3_vl":  # its 16-px patches (tiny/qwen3_vl.py PATCH), as recipes/models/qwen3vl_*.yaml set
        args.append("data.image_patch_size=16")
    if device == "gpu":
        args += ["actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
                 "trainer.n_gpus_per_node=1", "trainer.nnodes=1"]
    return args


TAG_ENV = "CALIBRL_LAUNCH_TAG"
# Ray's GCS keeps a record of every task and actor call ("task events": what Ray's state API and dashboard list)
# up to RAY_task_events_max_num_task_in_gcs, 100,000 by default, and, of the ones it evicted, their ids up to
# RAY_task_events_max_dropped_task_attempts_tracked_per_job_in_gcs, 1,000,000 per job. The tiny recipe adds 78
# records a step (the worker watch's pings are about 1.6 of them), about 3.9 KB each: the GCS grew +0.29 MB a step,
# the steepest growth of the 200-step soak, and would level off only near 0.4 GB after some 1,300 steps
# (docs/reliability.md, "Soak run"). Our launches keep the last 1,000 records (about the last 12 steps' calls stay
# inspectable): the GCS levels off within the soak's warm-up. ``launch_env`` puts these under the caller's
# environment, so an explicit value there wins. The GPU recipes keep Ray's defaults (docs/reliability.md).
RAY_ENV = {
    "RAY_task_events_max_num_task_in_gcs": "1000",
    "RAY_task_events_max_dropped_task_attempts_tracked_per_job_in_gcs": "1000",
}


@dataclass
class Launch:
    """A running ``main_calibrl`` process: its metrics/log paths and the tag every process of its Ray cluster
    inherits in its environment (``kill`` finds them by it)."""

    proc: subprocess.Popen
    metrics: Path
    log_path: Path
    tag: str
    log_file: Any

    def wait(self, timeout: int | None = None) -> Path:
        """Wait for the exit; returns the metrics path. Raises on a non-zero exit, quoting the end of the log."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self.log_file.close()
        kill_tagged(self.tag)  # stragglers of a finished run (a vLLM engine process outliving its server, say)
        if code != 0:
            raise RuntimeError(f"training exited {code}; last lines of {self.log_path}:\n"
                               f"{self.log_path.read_text()[-4000:]}")
        return self.metrics

    def supervise(self, timeout: int | None, sampler: Any = None) -> str | None:
        """Wait for the exit with ``sampler`` (an object with ``start``/``stop``, e.g. a memory sampler) running
        beside it. Any failure kills the launch and its cluster and is returned as text (None: it ended well), so a
        measuring tool keeps what it sampled; Ctrl-C is re-raised after the kill."""
        if sampler is not None:
            sampler.start()
        try:
            self.wait(timeout)
        except BaseException as exc:
            self.kill()
            if not isinstance(exc, Exception):
                raise
            return f"{type(exc).__name__}: {str(exc)[-2000:]}"
        finally:
            if sampler is not None:
                sampler.stop()
            kill_tagged(self.tag)
        return None

    def kill(self) -> int:
        """SIGKILL the launch and every process of its Ray cluster (a pre-emption); returns how many died.

        Ray's raylet and workers are not children of one process group, but all inherit the driver's
        environment, so they are found by ``TAG_ENV`` in ``/proc/<pid>/environ`` (Linux).
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.proc.pid, signal.SIGKILL)
        killed = 1 + kill_tagged(self.tag)
        self.proc.wait()
        return killed


def kill_tagged(tag: str, rounds: int = 50, pause_s: float = 0.1) -> int:
    """SIGKILL every process whose environment holds ``TAG_ENV=tag``; returns how many were signalled.

    Repeats until none is left (at most ``rounds`` times): a process can be forked between the scan of /proc
    and the kills (Ray starting a worker, vLLM spawning its engine core), and would otherwise escape.
    """
    killed: set[int] = set()
    for _ in range(rounds):
        pids = [pid for pid in tagged_pids(tag) if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        time.sleep(pause_s)
    return len(killed)


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment holds ``TAG_ENV=tag``."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
    return found


def process_titles(tag: str) -> dict[int, str]:
    """pid -> process title of a launch's processes (``tagged_pids``): Ray names an actor's process
    ``ray::<Class>`` and, while a method runs, ``ray::<Class>.<method>`` (the fault tests pick a worker by it)."""
    titles = {}
    for pid in tagged_pids(tag):
        with contextlib.suppress(OSError):
            titles[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    return titles


def launch_env(metrics: Path, tag: str, device: str) -> dict[str, str]:
    """The environment of a launch's driver, which the Ray cluster it starts inherits (the GCS and raylet are
    started by its ``ray.init``; the workers by the raylet): ``RAY_ENV`` under this process's environment, then the
    metrics path, the launch's tag and, for ``device="cpu"``, the CPU backend's variables."""
    env = {**RAY_ENV, **os.environ, "VERL_FILE_LOGGER_PATH": str(metrics), "PYTHONUNBUFFERED": "1", TAG_ENV: tag}
    if device == "cpu":
        from calibrl_verl.cpu import cpu_env

        env.update(cpu_env())
    return env


def start(run_dir: Path, overrides: list[str], device: str, name: str = "metrics",
          recipe: Path | None = None) -> Launch:
    """Start ``python -m calibrl_verl.main_calibrl`` with ``overrides``, logging into ``run_dir``; ``recipe``: a
    recipe YAML (``recipes/<name>.yaml``) to compose on, as its run script does (default: the base config).

    Writes ``run_dir/<name>.jsonl`` (verl's file logger, made resume-safe by ``integration.tracking``: a fresh run
    starts the file, a resumed one keeps the steps up to its checkpoint and appends) and ``run_dir/<name>.log``.
    """
    metrics = run_dir / f"{name}.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{run_dir.name}-{name}-{uuid.uuid4().hex[:8]}"
    env = launch_env(metrics, tag, device)
    cmd = [sys.executable, "-m", "calibrl_verl.main_calibrl"]
    if recipe is not None:
        cmd += ["--config-dir", str(recipe.parent.resolve()), "--config-name", recipe.stem]
    if device == "cpu":
        from calibrl_verl.cpu import cpu_overrides

        # the CPU backend's placement keys go first, so ``overrides`` can still change any of them
        cmd += cpu_overrides()
    cmd += overrides
    log_path = run_dir / f"{name}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed by Launch.wait
    proc = subprocess.Popen(cmd, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT)
    return Launch(proc, metrics, log_path, tag, log)


def launch(run_dir: Path, overrides: list[str], device: str, name: str = "metrics",
           timeout: int | None = DEFAULT_TIMEOUT_S) -> Path:
    """``start`` and wait: one whole launch; returns the metrics JSONL path, raises on a non-zero exit."""
    return start(run_dir, overrides, device, name).wait(timeout)


def ensure_assets(assets: Path, **build_kwargs: int | str) -> Path:
    """Build the tiny model and data into ``assets`` unless a finished build is already there."""
    if not (assets / "build_info.json").exists():
        args = [f"--{key.replace('_', '-')}={value}" for key, value in build_kwargs.items()]
        subprocess.run([sys.executable, "-m", "calibrl_verl.tiny.build", "--out", str(assets), *args], check=True)
    return assets


def run(out: Path, steps: int, loss_mode: str, device: str, extra: list[str],
        timeout: int | None = DEFAULT_TIMEOUT_S, name: str = "metrics", family: str = "qwen2_5_vl") -> Path:
    """Build assets if needed, train, plot; returns the metrics JSONL path. Raises on a non-zero exit.

    Checkpoints go to ``out/<loss_mode>/checkpoints`` and verl resumes from the latest one there
    (``trainer.resume_mode=auto``); ``name`` names this launch's metrics/log files (a launch that resumes into the
    same name keeps the earlier steps, ``integration.tracking``). ``family`` picks the tiny model
    (``python -m calibrl_verl.tiny.build --family``); a non-default family builds into ``out/assets_<family>``.
    """
    out = out.resolve()
    if family == "qwen2_5_vl":
        assets = ensure_assets(out / "assets")
    else:
        assets = ensure_assets(out / f"assets_{family}", family=family)
    run_dir = out / loss_mode
    overrides = recipe_overrides(assets, run_dir, steps, loss_mode, device, family=family) + extra
    metrics = launch(run_dir, overrides, device, name=name, timeout=timeout)
    from calibrl_verl.plots import main as plot

    plot([str(metrics), "--out", str(run_dir / "curves.png")])
    return metrics


def logged_steps(path: Path) -> list[int]:
    """The step numbers a launch's metrics JSONL holds, in file order ([] before its first line)."""
    if not Path(path).exists():
        return []
    return [json.loads(line)["step"] for line in Path(path).read_text().splitlines() if line.strip()]


def read_steps(path: Path) -> list[dict]:
    """The per-step metric dicts of a verl file-logger JSONL (training steps only, in order)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["data"] for r in sorted(rows, key=lambda r: r["step"]) if "training/global_step" in r["data"]
            or "actor/pg_loss" in r["data"]]
