"""Resuming only from a complete checkpoint (``calibrl_verl.integration.checkpoints``, hooked into the trainer's
``_load_checkpoint``). The folders are laid out as verl 0.9.1's FSDP save writes them (``global_step_N/actor/
{model,optim,extra_state}_world_size_W_rank_r.pt``, ``fsdp_config.json``, ``data.pt``, then the tracker); the smoke
resume test (``test_smoke_tiny_on_cpu.py::test_killed_run_resumes_to_the_same_next_step``) resumes a real one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from omegaconf import OmegaConf
from ray.exceptions import RayTaskError
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

from calibrl_verl.integration import checkpoints, step_dump
from calibrl_verl.integration.checkpoints import CheckpointError
from calibrl_verl.integration.trainer import CalibRLTrainer

CONTENTS = ["model", "optimizer", "extra"]


def _save(root: Path, step: int, world_size: int = 1, skip: tuple[str, ...] = (), track: bool = True) -> Path:
    """What verl's save leaves for step ``step``: actor shards per rank, fsdp_config.json, data.pt, then the
    tracker; ``skip`` leaves files out (a save killed part-way, or a file lost since)."""
    folder = root / f"global_step_{step}"
    (folder / "actor").mkdir(parents=True)
    names = [f"actor/{p}_world_size_{world_size}_rank_{r}.pt" for p in ("model", "optim", "extra_state")
             for r in range(world_size)]
    for name in [*names, "data.pt"]:
        if name not in skip:
            torch.save({"step": step}, folder / name)  # a whole torch archive, as verl's torch.save leaves
    if "actor/fsdp_config.json" not in skip:
        (folder / "actor" / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}))
    if track:
        (root / "latest_checkpointed_iteration.txt").write_text(str(step))
    return folder


def test_a_complete_checkpoint_is_resumed(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    folder = _save(tmp_path, 4, world_size=2)
    assert checkpoints.check_resume(tmp_path, CONTENTS) == folder
    assert checkpoints.complete_checkpoints(tmp_path, CONTENTS) == [tmp_path / "global_step_2", folder]


def test_no_tracker_is_a_fresh_start_even_with_a_half_written_first_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1, skip=("data.pt",), track=False)  # killed during the first save
    assert checkpoints.check_resume(tmp_path, CONTENTS) is None


def test_verl_alone_trains_from_scratch_when_the_tracked_folder_is_gone(tmp_path: Path) -> None:
    """Why the guard exists: verl's own lookup returns None (a fresh start) for a tracker naming a deleted folder,
    which is what max_actor_ckpt_to_keep=1 leaves when a run dies between the actor save and the tracker."""
    _save(tmp_path, 2)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    assert find_latest_ckpt_path(str(tmp_path)) is None
    with pytest.raises(CheckpointError) as err:
        checkpoints.check_resume(tmp_path, CONTENTS)
    text = str(err.value)
    assert "names step 4" in text and "global_step_4/ (the folder itself)" in text
    assert f"trainer.resume_from_path={tmp_path / 'global_step_2'}" in text and "resume_mode=disable" in text


def test_a_tracked_checkpoint_with_a_missing_shard_is_refused_naming_it(tmp_path: Path) -> None:
    _save(tmp_path, 3, world_size=2, skip=("actor/optim_world_size_2_rank_1.pt", "data.pt"))
    with pytest.raises(CheckpointError) as err:
        checkpoints.check_resume(tmp_path, CONTENTS)
    assert "missing: data.pt, actor/optim_world_size_2_rank_1.pt." in str(err.value)
    assert "No complete checkpoint is left" in str(err.value)
    # a run that saves and loads the model alone needs no optimizer shard
    assert checkpoints.missing_files(tmp_path / "global_step_3", ["model"]) == ["data.pt"]


def test_an_empty_or_torn_tracker_is_named(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt holds '', not a step number"):
        checkpoints.check_resume(tmp_path, CONTENTS)


def test_a_torn_data_pt_is_not_a_complete_checkpoint(tmp_path: Path) -> None:
    """max_actor_ckpt_to_keep=1, killed (or out of disk) while data.pt of step 2 is written: step 1's actor folder is
    already deleted and step 2 has every file, data.pt cut short (verl writes it after the actor save). Before, step
    2 was offered as the complete checkpoint to resume, and its data.pt would fail to load."""
    shutil.rmtree(_save(tmp_path, 1) / "actor")
    folder = _save(tmp_path, 2, track=False)
    whole = (folder / "data.pt").read_bytes()
    for cut in (1, len(whole) // 2, len(whole) - 1):  # wherever the write stopped
        (folder / "data.pt").write_bytes(whole[:cut])
        assert checkpoints.missing_files(folder, CONTENTS) == ["data.pt (torn: not a whole torch archive)"]
        with pytest.raises(CheckpointError) as err:
            checkpoints.check_resume(tmp_path, CONTENTS)
        assert "No complete checkpoint is left" in str(err.value) and "resume_from_path" not in str(err.value)
    (folder / "data.pt").write_bytes(whole)
    assert checkpoints.complete_checkpoints(tmp_path, CONTENTS) == [folder]


def test_an_unreadable_fsdp_config_is_reported_not_guessed(tmp_path: Path) -> None:
    folder = _save(tmp_path, 2, skip=("actor/fsdp_config.json",))
    assert checkpoints.missing_files(folder, CONTENTS) == [
        "actor/fsdp_config.json (missing or unreadable, so the shards cannot be counted)"]
    assert checkpoints.missing_files(folder, None) == []  # another engine's layout: folder and data.pt only


def _trainer(tmp_path: Path, **trainer: object) -> CalibRLTrainer:
    """A trainer holding only the config ``_resume_folder`` reads (as verl's composed config spells it); verl's
    own set-up (Ray workers) is not run."""
    obj = CalibRLTrainer.__new__(CalibRLTrainer)
    obj.config = OmegaConf.create({
        "trainer": {"default_local_dir": str(tmp_path), "resume_mode": "auto", "resume_from_path": None, **trainer},
        "actor_rollout_ref": {"actor": {"strategy": "fsdp", "checkpoint": {"load_contents": CONTENTS}}},
    })
    return obj


def test_the_trainer_checks_the_folder_each_resume_mode_loads(tmp_path: Path) -> None:
    old = _save(tmp_path, 2)
    _save(tmp_path, 4, skip=("actor/model_world_size_1_rank_0.pt",))
    with pytest.raises(CheckpointError, match="actor/model_world_size_1_rank_0.pt"):
        _trainer(tmp_path)._resume_folder()
    assert _trainer(tmp_path, resume_mode="resume_path", resume_from_path=str(old))._resume_folder() == old
    assert _trainer(tmp_path, resume_mode="disable")._resume_folder() is None


@pytest.fixture
def full_disk(tmp_path: Path, tmpfs: Callable[[Path, int], Path]) -> Path:
    """A real 256 KiB tmpfs (CI runs as root), so writes fail with the kernel's own ENOSPC."""
    return tmpfs(tmp_path / "small", 256 << 10)


def test_a_dump_that_does_not_fit_leaves_nothing_and_names_step_and_path(full_disk: Path) -> None:
    table = pa.table({"step": list(range(200_000))})  # ~1.6 MB of int64 against 256 KiB
    with pytest.raises(step_dump.StepDumpError) as err:
        step_dump.write_step_dump(full_disk / "dump", 3, table)
    assert f"step 3's dump could not be written to {full_disk / 'dump' / 'step_000003.parquet'}" in str(err.value)
    assert "No space left on device" in str(err.value) and "calibrl.dump_dir=null" in str(err.value)
    assert list((full_disk / "dump").iterdir()) == []  # neither the file nor its partial .tmp


def test_a_save_on_a_full_disk_is_named_and_the_tracked_checkpoint_is_kept(full_disk: Path) -> None:
    """The ENOSPC of a real torch.save, raised in a Ray worker as verl's actor save is."""
    _save(full_disk, 2)
    folder = full_disk / "global_step_4"
    (folder / "actor").mkdir(parents=True)
    # torch.save says only "unexpected pos ..." (no errno): the free space tells the full disk
    with pytest.raises(RuntimeError, match="unexpected pos") as raised:
        torch.save(torch.zeros(200_000), folder / "actor" / "model_world_size_1_rank_0.pt")
    in_worker = RayTaskError("save_checkpoint", "Traceback ...", raised.value)
    named = checkpoints.save_error(in_worker, folder, CONTENTS)
    assert named is not None and f"disk full while saving the checkpoint {folder}" in str(named)
    assert "the tracker still names step 2, complete" in str(named)
    assert checkpoints.check_resume(full_disk, CONTENTS) == full_disk / "global_step_2"  # what a restart loads
    # an ENOSPC from an OSError (pyarrow, open().write) is recognised by its errno, wherever there is space
    assert checkpoints.disk_full(RayTaskError("f", "", OSError(28, "No space left on device")), Path("/"))


def test_other_save_faults_are_raised_as_they_are(tmp_path: Path) -> None:
    assert checkpoints.save_error(RuntimeError("worker died"), tmp_path / "global_step_4", CONTENTS) is None
