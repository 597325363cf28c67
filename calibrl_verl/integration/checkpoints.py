"""Resume only from a complete checkpoint: the one place where verl 0.9.1's resume is wrapped, and why.

verl's save (V1 ``trainer_base._save_checkpoint``) writes, in order: the actor's files (per rank
``model_``/``optim_``/``extra_state_world_size_W_rank_r.pt``, ``fsdp_config.json``, ``huggingface/``), then
``data.pt`` (the data loader's state), then ``latest_checkpointed_iteration.txt`` (the tracker). The tracker is
written last, so a run killed while saving still names the previous checkpoint, which verl resumes. Two cases
escape that order, and verl's ``find_latest_ckpt_path`` does not catch them:

1. With ``trainer.max_actor_ckpt_to_keep=1`` the actor save deletes the previous checkpoint's ``actor/`` folder as
   soon as the new actor files are written (``CheckpointManager.register_checkpoint``), before ``data.pt`` and the
   tracker. Killed there, the tracker names a folder without its actor; verl prints "Checkpoint does not exist" and
   trains from step 0, silently throwing the run away.
2. Killed between the tracker's open and write, the tracker is empty: verl stops with a bare ``ValueError``.

``check_resume`` runs before verl's own load and turns both, and a tracker naming a folder with missing files,
into a ``CheckpointError`` that names the folder and what is missing, lists the complete checkpoints on disk, and
gives the overrides that resume from one or start fresh. A kill during the first save (no tracker yet) is a fresh
start, as in verl. A ``.pt`` file counts only when it is a whole torch archive (see ``_torn``): with
``max_actor_ckpt_to_keep=1`` a kill, or a full disk, while ``data.pt`` is written leaves the newer folder with every
file present but ``data.pt`` cut short, and that folder must not be offered as the complete one to resume from.
``save_error`` names a save that failed on a full disk (verl's error arrives from a Ray worker, several exceptions
deep).
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

from verl.utils.checkpoint.checkpoint_manager import get_checkpoint_tracker_filename

# verl's FSDP checkpoint manager: file prefix per entry of actor.checkpoint.save_contents
_SHARD_PREFIX = {"model": "model", "optimizer": "optim", "extra": "extra_state"}
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


class CheckpointError(RuntimeError):
    """The checkpoint a resume would load is missing or incomplete; the message says which and what to do."""


def missing_files(folder: Path, save_contents: Sequence[str] | None) -> list[str]:
    """The files of a complete FSDP checkpoint that ``folder`` (``global_step_N``) lacks, relative to it.
    ``save_contents=None`` (another engine's layout): the folder and ``data.pt`` only."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder.name}/ (the folder itself)"]
    missing = [gap] if (gap := _absent(folder, "data.pt")) else []
    if save_contents is None:
        return missing
    config = folder / "actor" / "fsdp_config.json"
    try:
        world_size = int(json.loads(config.read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return [*missing, "actor/fsdp_config.json (missing or unreadable, so the shards cannot be counted)"]
    for content in save_contents:
        prefix = _SHARD_PREFIX.get(str(content))
        if prefix is None:  # hf_model and other contents are written next to the shards, not checked here
            continue
        for rank in range(world_size):
            name = f"actor/{prefix}_world_size_{world_size}_rank_{rank}.pt"
            if gap := _absent(folder, name):
                missing.append(gap)
    return missing


def _absent(folder: Path, name: str) -> str:
    """``name`` as ``missing_files`` lists it when it is not a whole file, else an empty string."""
    path = folder / name
    if not path.is_file():
        return name
    return f"{name} (torn: not a whole torch archive)" if _torn(path) else ""


def _torn(path: Path) -> bool:
    """Whether a torch.save file was cut short. torch.save writes a zip archive whose end-of-central-directory
    record comes last, so a write killed or stopped by a full disk part-way leaves a file without it (torch.save
    truncates the file first: no stale record of an earlier save survives). Reads only the file's tail."""
    try:
        return not zipfile.is_zipfile(path)
    except OSError:
        return True


def complete_checkpoints(root: Path, save_contents: Sequence[str] | None) -> list[Path]:
    """Every ``global_step_N`` under ``root`` with no missing file, oldest first."""
    steps = [(int(m.group(1)), p) for p in Path(root).glob("global_step_*")
             if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(steps) if not missing_files(p, save_contents)]


def tracked_step(root: Path, save_contents: Sequence[str] | None) -> int | None:
    """The step the tracker names; None when there is no tracker (nothing was ever saved completely)."""
    tracker = Path(get_checkpoint_tracker_filename(str(root)))  # verl's own name for it
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not a step number: the run was killed while writing it. "
                              + _choices(root, save_contents))
    return int(text)


def check_resume(root: Path, save_contents: Sequence[str] | None) -> Path | None:
    """The checkpoint ``trainer.resume_mode=auto`` will load, checked complete; None for a fresh start."""
    step = tracked_step(root, save_contents)
    if step is None:
        return None
    folder = Path(root) / f"global_step_{step}"
    return check_folder(folder, save_contents, f"{get_checkpoint_tracker_filename(str(root))} names step {step}, but ")


def check_folder(folder: Path, save_contents: Sequence[str] | None, why: str = "") -> Path:
    """``folder`` if it is a complete checkpoint, else ``CheckpointError`` naming what is missing."""
    missing = missing_files(folder, save_contents)
    if missing:
        raise CheckpointError(
            f"{why}the checkpoint {folder} is incomplete; missing: {', '.join(missing)}. A deleted previous "
            "checkpoint is what trainer.max_actor_ckpt_to_keep=1 leaves when a run is killed while saving (keep 2 "
            "or more). " + _choices(folder.parent, save_contents))
    return folder


def _choices(root: Path, save_contents: Sequence[str] | None) -> str:
    complete = complete_checkpoints(root, save_contents)
    resume = (f"To resume from the last complete one, add trainer.resume_mode=resume_path "
              f"trainer.resume_from_path={complete[-1]} (complete: {[p.name for p in complete]}). "
              if complete else "No complete checkpoint is left under it. ")
    return resume + f"To start fresh instead, add trainer.resume_mode=disable or move {root} away."


# below this much free space after a failed save, the disk is what failed it
LOW_FREE_BYTES = 1 << 20


def disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a save into ``folder`` failed on a full disk: ENOSPC anywhere in ``err``'s chain (``__cause__``,
    ``__context__``, a Ray task error's ``cause``), or almost no space left where it was writing. The second test
    is needed: torch.save reports a full disk only as "unexpected pos ..." from its zip writer, with no errno."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    existing = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), None)
    return existing is not None and shutil.disk_usage(existing).free < LOW_FREE_BYTES


def save_error(err: BaseException, folder: Path, save_contents: Sequence[str] | None) -> CheckpointError | None:
    """The named error for a checkpoint save into ``folder`` that failed with ``err`` (None: not a full disk)."""
    if not disk_full(err, folder):
        return None
    root = Path(folder).parent
    complete = complete_checkpoints(root, save_contents)
    try:
        step = tracked_step(root, save_contents)
    except CheckpointError:
        step = None
    kept = (f"the tracker still names step {step}, complete, which trainer.resume_mode=auto resumes"
            if step is not None and root / f"global_step_{step}" in complete
            else f"complete checkpoints on disk: {[p.name for p in complete]}")
    return CheckpointError(f"disk full while saving the checkpoint {folder}: it is incomplete and will not be "
                           f"resumed; {kept}. Free space under {root} (or lower trainer.max_actor_ckpt_to_keep, "
                           "keeping at least 2), then restart.")
