"""Killed while saving a checkpoint, and a full disk, under a real run of the tiny CalibRL recipe (verl 0.9.1's real
trainer, launched as tests/test_faults_on_cpu.py launches it), a checkpoint after every step.

verl 0.9.1 saves step N in this order (``trainer/ppo/v1/trainer_base.py::_save_checkpoint`` and the FSDP manager,
``utils/checkpoint/fsdp_checkpoint_manager.py::save_checkpoint``; world size 1 here):

1. with ``trainer.max_actor_ckpt_to_keep`` >= 2, the oldest checkpoints this launch saved beyond keep - 1 lose their
   ``actor/`` folder (``ensure_checkpoint_capacity``);
2. ``global_step_N/actor/``: ``model_world_size_1_rank_0.pt``, ``optim_...``, ``extra_state_...`` (each one
   torch.save in the FSDP worker), then ``huggingface/`` (config, tokenizer) and ``fsdp_config.json``;
3. with ``max_actor_ckpt_to_keep=1``, the previous checkpoint this launch saved loses its ``actor/`` folder
   (``register_checkpoint``), before anything below is written;
4. ``global_step_N/data.pt`` (the data loader's state, written by the driver's TaskRunner; no ``transfer_queue/``:
   the CalibRL trainer runs verl's sync paths);
5. ``latest_checkpointed_iteration.txt`` := N. The tracker is what marks step N complete: resume
   (``trainer.resume_mode=auto``) loads the folder it names. A resumed launch deletes only checkpoints it saved itself.

The kill test SIGKILLs the whole run (every process of the launch and its Ray cluster, as a pre-emption does) when a
poll of the checkpoint folder every few ms sees a point of that order reached, then records what it actually found
(the moment races the writers) and asserts the property for that state: the same command resumes from the folder
the tracker names if that folder has every file a resume loads, and trains on; otherwise it stops with
``CheckpointError`` naming the incomplete folder. It never loads a half-written checkpoint.

The disk tests put the checkpoint folder, or ``calibrl.dump_dir``, on a real tmpfs too small for the next write.
Opt-in (8 launches, about 1.5 minutes each on 2 cores): ``bash scripts/test.sh -m faults``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from calibrl_verl import launch
from calibrl_verl.integration import checkpoints

pytestmark = pytest.mark.faults

TIMEOUT = 900
POLL_S = 0.002
KEEP = 3  # checkpoints kept while killing at points a-d, as our recipes keep: the previous one survives the save
TRACKER = "latest_checkpointed_iteration.txt"
# what verl's resume loads from global_step_N at world size 1 (order above; huggingface/ is not read back)
LOADED = ("actor/model_world_size_1_rank_0.pt", "actor/optim_world_size_1_rank_0.pt",
          "actor/extra_state_world_size_1_rank_0.pt", "actor/fsdp_config.json", "data.pt")
FSDP_CONTENTS = ["model", "optimizer", "extra"]


def _overrides(assets: Path, run_dir: Path, steps: int, keep: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
    """The tiny recipe, saving after every step and keeping ``keep`` checkpoints (the recipe keeps 1); ``extra``
    replaces the recipe's value of each key it sets (Hydra refuses a key given twice)."""
    args = launch.recipe_overrides(assets, run_dir, steps, "calibrl", "cpu", save_freq=1)
    mine = [f"trainer.max_actor_ckpt_to_keep={keep}", *extra]
    keys = {a.split("=")[0] for a in mine}
    return [a for a in args if a.split("=")[0] not in keys] + mine


def _tracker(root: Path) -> str | None:
    with contextlib.suppress(FileNotFoundError):
        return (root / TRACKER).read_text()
    return None


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _wait_until(job: launch.Launch, done: Callable[[], bool], what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not done():
        if job.proc.poll() is not None or time.monotonic() > deadline:
            ended = job.proc.poll() is not None
            job.kill()  # the driver, or what is left of its Ray cluster
            pytest.fail(f"the run ended before {what}: {job.log_path.read_text()[-3000:]}" if ended
                        else f"no {what} within {TIMEOUT} s")
        time.sleep(poll_s)


def _finish(job: launch.Launch, timeout: float = TIMEOUT) -> int:
    """The launch's exit status; whatever is left of its Ray cluster is killed after."""
    try:
        return job.proc.wait(timeout=timeout)
    except Exception:
        pytest.fail(f"the run did not end within {timeout} s: {job.log_path.read_text()[-3000:]}")
    finally:
        job.kill()
        job.log_file.close()


@dataclass(frozen=True)
class Point:
    """Where in the save of step ``n`` to kill: ``reached(checkpoints root, n)``."""

    name: str
    keep: int
    reached: Callable[[Path, int], bool]


POINTS = (
    Point("a: the model shard appears", KEEP,
          lambda root, n: (root / f"global_step_{n}" / LOADED[0]).exists()),
    Point("b: huggingface/ appears (the shards are written, fsdp_config.json is next)", KEEP,
          lambda root, n: (root / f"global_step_{n}" / "actor" / "huggingface").exists()),
    Point("c: data.pt appears (the tracker names the previous step)", KEEP,
          lambda root, n: (root / f"global_step_{n}" / "data.pt").exists()),
    Point("d: the tracker names the step", KEEP, lambda root, n: _tracker(root) == str(n)),
    # the first file of the previous checkpoint's actor/ gone: verl's rmtree has begun, data.pt and tracker follow
    Point("keep=1: the previous checkpoint's actor/ is being deleted", 1,
          lambda root, n: not all((root / f"global_step_{n - 1}" / name).exists() for name in LOADED[:4])),
)


@dataclass
class Found:
    """What a kill left: the folder being saved, its files, the tracker and the folder the tracker names."""

    point: str
    saving: int
    files: list[str]
    tracker: str | None
    tracked_files: list[str]

    def expected(self, root: Path) -> tuple[str, Path]:
        """From the save order alone: ("resume", folder) when the tracked folder has every file a resume loads,
        else ("refuse", what the CheckpointError must name)."""
        if self.tracker is None or not self.tracker.strip().isdigit():
            return "refuse", root / TRACKER
        folder = root / f"global_step_{int(self.tracker)}"
        return ("resume" if set(LOADED) <= set(self.tracked_files) else "refuse"), folder


def _kill_at(job: launch.Launch, root: Path, point: Point, resumed: int) -> Found:
    """Once the launch's first step (``resumed`` + 1) is logged, so every process is up and that step's save is done,
    poll for ``point`` in the save of the next step and SIGKILL every process of the run at once."""
    saving = resumed + 2
    _wait_until(job, lambda: resumed + 1 in launch.logged_steps(job.metrics), f"step {resumed + 1}")
    pids = [pid for pid in launch.tagged_pids(job.tag) if pid != os.getpid()]  # listed before: the kill is one loop
    _wait_until(job, lambda: point.reached(root, saving), f"point {point.name} of step {saving}", POLL_S)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.kill()  # and any process started since the list was taken
    job.log_file.close()
    assert launch.tagged_pids(job.tag) == []
    tracker = _tracker(root)
    tracked = root / f"global_step_{tracker}" if tracker and tracker.isdigit() else root / "none"
    return Found(point.name, saving, _files(root / f"global_step_{saving}"), tracker, _files(tracked))


def _relaunch(assets: Path, run_dir: Path, keep: int, steps: int, killed: launch.Launch,
              extra: tuple[str, ...] = ()) -> launch.Launch:
    """The same command again (plus ``extra``), logging into a copy of the previous launch's metrics
    (integration/tracking.py keeps the steps up to the checkpoint it resumes, the resumed steps follow)."""
    name = f"launch{int(killed.metrics.stem.removeprefix('launch')) + 1}"
    shutil.copyfile(killed.metrics, run_dir / f"{name}.jsonl")
    return launch.start(run_dir, _overrides(assets, run_dir, steps, keep, extra), "cpu", name=name)


def _assert_refused(job: launch.Launch, folder: Path) -> Path | None:
    """The launch stops with ``CheckpointError`` naming ``folder`` before loading anything; returns the checkpoint
    the message offers to resume instead (None: it offers none)."""
    code = _finish(job)
    log = job.log_path.read_text()
    named = [line for line in log.splitlines() if "CheckpointError" in line and str(folder) in line]
    assert code != 0 and named, log[-4000:]
    assert "[calibrl] resuming from" not in log
    print(f"  -> refused: {named[0][-600:]}")
    offered = [Path(part.split()[0]) for part in named[0].split("trainer.resume_from_path=")[1:]]
    # the offered checkpoint has every file a resume loads
    assert all(set(LOADED) <= set(_files(folder)) for folder in offered), named[0]
    return offered[0] if offered else None


def _assert_resumed(job: launch.Launch, folder: Path, killed_steps: list[int]) -> int:
    """The launch loads ``folder`` and logs the step after it, following the killed launch's steps up to the
    checkpoint (integration/tracking.py); returns the resumed step."""
    step = int(folder.name.removeprefix("global_step_"))
    # the copy may already end with step + 1 (logged by the killed launch): wait for this launch's own write
    copied = job.metrics.stat().st_mtime_ns
    _wait_until(job, lambda: job.metrics.stat().st_mtime_ns != copied
                and launch.logged_steps(job.metrics)[-1:] == [step + 1], f"step {step + 1} after the resume")
    assert f"[calibrl] resuming from {folder}" in job.log_path.read_text()
    assert launch.logged_steps(job.metrics) == [*(s for s in killed_steps if s <= step), step + 1]
    return step


def test_a_run_killed_at_each_point_of_a_checkpoint_save_resumes_from_a_complete_one_or_names_the_torn_one(
        tiny_assets: Path, tmp_path: Path) -> None:
    """A chain of launches of one run: each resumes the previous one's kill, then is killed at the next point, in
    the save of its second step (a folder no earlier launch wrote). A refusal is followed as its message says
    (``trainer.resume_from_path`` of the checkpoint it offers), so the chain reaches every point. The last launch
    trains to the end."""
    started: list[launch.Launch] = []
    try:
        _chain(tiny_assets, tmp_path / "chain", started)
    finally:
        for job in started:  # a failed assertion leaves the current launch running: no launch outlives the test
            job.kill()


def _chain(assets: Path, run_dir: Path, started: list[launch.Launch]) -> None:
    steps, root = 2 * len(POINTS) + 2, run_dir / "checkpoints"
    job = launch.start(run_dir, _overrides(assets, run_dir, steps, POINTS[0].keep), "cpu", name="launch1")
    started.append(job)
    resumed = 0
    for i, point in enumerate(POINTS):
        began = time.monotonic()
        found = _kill_at(job, root, point, resumed)
        print(f"[{point.name}] killed {time.monotonic() - began:.0f} s into {job.metrics.stem}, saving step "
              f"{found.saving}: global_step_{found.saving} holds {found.files}; tracker {found.tracker!r}, its "
              f"folder holds {found.tracked_files}")
        killed_steps = launch.logged_steps(job.metrics)
        keep = POINTS[i + 1].keep if i + 1 < len(POINTS) else KEEP
        job, began = _relaunch(assets, run_dir, keep, steps, job), time.monotonic()
        started.append(job)
        outcome, folder = found.expected(root)
        if outcome == "refuse":
            offered = _assert_refused(job, folder)
            if offered is None:
                return  # nothing complete to go on from: a fresh start is the user's call
            # what the message says to do, so the chain goes on to the next point
            folder, extra = offered, ("trainer.resume_mode=resume_path", f"trainer.resume_from_path={offered}")
            job, began = _relaunch(assets, run_dir, keep, steps, job, extra), time.monotonic()
            started.append(job)
        resumed = _assert_resumed(job, folder, killed_steps)
        print(f"  -> {job.metrics.stem} resumed from {folder.name}, trained step {resumed + 1} "
              f"({time.monotonic() - began:.0f} s)")
    assert _finish(job) == 0, job.log_path.read_text()[-4000:]
    assert launch.logged_steps(job.metrics)[-(steps - resumed):] == list(range(resumed + 1, steps + 1))
    assert checkpoints.check_resume(root, FSDP_CONTENTS) == root / f"global_step_{steps}"


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in _files(folder)}


def test_a_full_disk_while_saving_a_real_checkpoint_is_named_and_the_previous_checkpoint_is_kept(
        tiny_assets: Path, tmp_path: Path, tmpfs: Callable[[Path, int], Path]) -> None:
    """The checkpoint folder is a tmpfs, shrunk once step 1's checkpoint is complete to what is used plus half a
    checkpoint: step 2's model shard (a third of a checkpoint) fits, its optimizer shard does not."""
    run_dir = tmp_path / "full"
    root = tmpfs(run_dir / "checkpoints", 64 << 20)
    job = launch.start(run_dir, _overrides(tiny_assets, run_dir, steps=2), "cpu", name="launch1")
    _wait_until(job, lambda: _tracker(root) == "1", "step 1's checkpoint", POLL_S)
    size = sum((root / "global_step_1" / name).stat().st_size for name in _files(root / "global_step_1"))
    before = _digests(root / "global_step_1")
    tmpfs(root, shutil.disk_usage(root).used + size // 2)
    began = time.monotonic()
    code = _finish(job)
    log = job.log_path.read_text()
    print(f"checkpoint {size} bytes; the run exited {code} {time.monotonic() - began:.0f} s after the shrink; "
          f"global_step_2 holds {_files(root / 'global_step_2')}")
    assert code != 0
    assert f"disk full while saving the checkpoint {root / 'global_step_2'}" in log, log[-4000:]
    assert "the tracker still names step 1, complete" in log
    assert _tracker(root) == "1"
    assert _digests(root / "global_step_1") == before  # not a byte of the previous checkpoint changed
    assert set(LOADED) <= set(before)
    assert checkpoints.check_resume(root, FSDP_CONTENTS) == root / "global_step_1"


def test_a_full_disk_under_the_step_dump_ends_the_run_naming_step_and_path_and_leaves_no_partial_file(
        tiny_assets: Path, tmp_path: Path, tmpfs: Callable[[Path, int], Path]) -> None:
    """``calibrl.dump_dir`` on a 4 KiB tmpfs: a step's dump of the tiny run is 5-7 KiB of parquet."""
    run_dir = tmp_path / "dump_full"
    dump = tmpfs(tmp_path / "dump", 4 << 10)
    overrides = _overrides(tiny_assets, run_dir, steps=1) + [f"calibrl.dump_dir={dump}"]
    job = launch.start(run_dir, overrides, "cpu", name="launch1")
    began = time.monotonic()
    code = _finish(job)
    log = job.log_path.read_text()
    print(f"the run exited {code} after {time.monotonic() - began:.0f} s")
    assert code != 0, "the step-1 dump fit into 4 KiB: " + log[-2000:]
    assert "StepDumpError" in log, log[-4000:]
    assert f"step 1's dump could not be written to {dump / 'step_000001.parquet'}" in log
    assert "No space left on device" in log
    assert list(dump.iterdir()) == []  # neither the dump nor its partial .tmp
