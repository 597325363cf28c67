"""A worker dies mid-step: SIGKILL of a real Ray worker of the tiny CalibRL run (verl's vLLM rollout server during
generation of step 2, or while step 1's checkpoint is saved so that the weight sync comes next; the FSDP actor worker
during the update of step 2), 4 steps with a checkpoint after every step.

Each test asserts that the run ends within a bounded time with ``WorkerDiedError`` naming the worker, the step and
the stage (integration/worker_watch.py), that the step-1 checkpoint is intact, and that relaunching the same command
(``trainer.resume_mode=auto``, set by the tiny recipe) resumes from it and trains the remaining steps. Opt-in (two
launches per test, about 4 minutes each on 2 cores): ``bash scripts/test.sh -m faults``.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from calibrl_verl import launch
from calibrl_verl.integration import checkpoints

pytestmark = pytest.mark.faults

STEPS = 4
TIMEOUT = 900
# from the kill to the launch's exit: the watch finds a dead worker within calibrl.worker_check_s (5 s by default),
# then the driver shuts its Ray cluster down; verl alone never ended the generation case (the launcher's timeout did)
END_WITHIN_S = 90
FSDP_CONTENTS = ["model", "optimizer", "extra"]


def _overrides(assets: Path, run_dir: Path) -> list[str]:
    return launch.recipe_overrides(assets, run_dir, STEPS, "calibrl", "cpu", save_freq=1)


def _kill(job: launch.Launch, pick: Callable[[dict[int, str]], list[int]], after_step_1: bool) -> float:
    """SIGKILL the processes ``pick`` chooses from the launch's process titles, once step 1 is logged (its checkpoint
    is written before its log line, and step 2 starts right after) when ``after_step_1``; returns the kill's time."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if job.proc.poll() is not None:
            pytest.fail(f"the run ended before the kill: {job.log_path.read_text()[-3000:]}")
        if not after_step_1 or 1 in launch.logged_steps(job.metrics):
            pids = pick(launch.process_titles(job.tag))
            if pids:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                return time.monotonic()
        time.sleep(0.01)
    job.kill()
    pytest.fail("no moment to kill within the timeout")


def _fault_then_resume(assets: Path, run_dir: Path, pick: Callable[[dict[int, str]], list[int]], role: str,
                       stages: tuple[str, ...], step: int = 2) -> None:
    """Kill inside step ``step`` (2: once step 1 is logged; 1: whenever ``pick`` finds its process), expect the named
    error in one of ``stages``, the intact step-1 checkpoint, and a resumed launch that trains the rest."""
    job = launch.start(run_dir, _overrides(assets, run_dir), "cpu", name="launch1")
    try:
        killed_at = _kill(job, pick, after_step_1=step == 2)
        try:
            code = job.proc.wait(timeout=END_WITHIN_S)
        except Exception:
            pytest.fail(f"the run did not end within {END_WITHIN_S} s of the kill: {job.log_path.read_text()[-3000:]}")
        ended_after = time.monotonic() - killed_at
    finally:
        job.kill()  # the launch's leftover Ray processes (a vLLM engine outliving its server, say)
        job.log_file.close()
    assert launch.tagged_pids(job.tag) == []
    log = job.log_path.read_text()
    print(f"{role}: killed in step {step}, the launch exited {code} {ended_after:.1f} s later")
    assert code != 0
    ckpt = run_dir / "checkpoints"
    named = [f"WorkerDiedError: the {role} died at step {step} ({stage}). "
             f"The last complete checkpoint is {ckpt / 'global_step_1'}" for stage in stages]
    assert any(text in log for text in named), log[-4000:]
    assert "run the same command with trainer.resume_mode=auto" in log
    # the checkpoint is intact: the tracker names step 1 and every file of it is there; step 2 never started saving
    assert checkpoints.check_resume(ckpt, FSDP_CONTENTS) == ckpt / "global_step_1"
    assert not (ckpt / "global_step_2").exists()
    assert launch.logged_steps(job.metrics) == [1][:step - 1]

    # the same command resumes (trainer.resume_mode=auto) and trains the remaining steps, logging into a copy of the
    # killed launch's metrics (integration/tracking.py keeps the steps up to the checkpoint)
    shutil.copyfile(job.metrics, run_dir / "launch2.jsonl")
    resumed = launch.launch(run_dir, _overrides(assets, run_dir), "cpu", name="launch2", timeout=TIMEOUT)
    assert f"[calibrl] resuming from {ckpt / 'global_step_1'}" in resumed.with_suffix(".log").read_text()
    assert launch.logged_steps(resumed) == [1, 2, 3, 4][:step - 1] + [2, 3, 4]
    assert checkpoints.check_resume(ckpt, FSDP_CONTENTS) == ckpt / f"global_step_{STEPS}"


def test_a_vllm_server_killed_during_generation_ends_the_run_naming_it_and_resume_trains_the_rest(
        tiny_assets: Path, tmp_path: Path) -> None:
    """verl alone ends too, with Ray's ActorDiedError from its replicas' sleep call (the failed groups come back as
    the step's batch), naming neither step, stage nor checkpoint."""
    def vllm_server(titles: dict[int, str]) -> list[int]:
        return [pid for pid, title in titles.items() if title.startswith("ray::vLLMHttpServer")]

    _fault_then_resume(tiny_assets, tmp_path / "vllm", vllm_server, "vllm rollout replica 0 (server 0)",
                       ("generation",))


def test_the_fsdp_actor_worker_killed_during_the_update_ends_the_run_naming_it_and_resume_trains_the_rest(
        tiny_assets: Path, tmp_path: Path) -> None:
    """Ray titles the worker's process ``ray::WorkerDict.actor_rollout_ref_update_actor`` while it updates."""
    def updating_actor(titles: dict[int, str]) -> list[int]:
        return [pid for pid, title in titles.items() if title.startswith("ray::WorkerDict") and "update_actor" in title]

    _fault_then_resume(tiny_assets, tmp_path / "fsdp", updating_actor, "FSDP actor worker (actor_rollout_ref rank 0)",
                       ("actor update",))


def test_a_vllm_server_killed_before_the_weight_sync_ends_the_run_naming_it_and_resume_trains_the_rest(
        tiny_assets: Path, tmp_path: Path) -> None:
    """Killed while step 1's checkpoint is saved, so the weight sync comes next: verl's FSDP worker pushes the weights
    to the dead server over ZMQ and verl's ``ray.get`` waits forever. The watch lets the save finish (a complete
    step-1 checkpoint), then ends the run."""
    def vllm_server_while_saving(titles: dict[int, str]) -> list[int]:
        if not any("save_checkpoint" in title for title in titles.values()):
            return []
        return [pid for pid, title in titles.items() if title.startswith("ray::vLLMHttpServer")]

    _fault_then_resume(tiny_assets, tmp_path / "sync", vllm_server_while_saving, "vllm rollout replica 0 (server 0)",
                       ("after checkpoint save", "weight sync"), step=1)
