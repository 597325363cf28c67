"""verl's file logger (``trainer.logger=[file]``), made safe to resume: nothing logged before a restart is lost.

Why: verl 0.9.1's ``FileLogger`` opens its JSONL with ``"wb"``, so a resumed run (``trainer.resume_mode=auto``
or ``resume_path``) empties the file and keeps only the steps after the restart. ``install()`` (called by
``calibrl_verl.plugin`` in every process that imports verl, so also in the Ray TaskRunner that builds verl's
``Tracking`` in ``fit()``) wraps ``Tracking.__init__``: the ``file`` backend is built as a
``ResumableFileLogger`` instead. That logger keeps verl's path rule and line format and:

- on a resumed run (checkpoint of step ``c``) keeps the lines of steps ``1..c`` (and a step-0 validation line)
  and appends after them; lines of steps ``> c``, written by the killed run after its last checkpoint, are
  dropped, since the resumed run logs those steps again (it repeats from step ``c + 1``);
- on a fresh run (``resume_mode=disable``, or no checkpoint yet) starts the file empty, as verl does.

The step ``c`` is decided from the config verl gives ``Tracking`` exactly as verl's trainer decides it in
``_load_checkpoint`` (which has already run when ``fit()`` builds ``Tracking``), with verl's own
``find_latest_ckpt_path``. The tensorboard backend needs no change: a resumed run writes a new event file
beside the old ones, and ``calibrl_verl.plots`` merges them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from verl.utils import tracking as verl_tracking

_INSTALLED_FLAG = "_calibrl_resume_safe_file_logger"


def file_logger_path(project_name: str, experiment_name: str) -> str:
    """Where verl's ``FileLogger`` writes: ``$VERL_FILE_LOGGER_PATH``, else
    ``$VERL_FILE_LOGGER_ROOT`` (default ``.``) ``/<project_name>/<experiment_name>.jsonl``.

    The same rule as verl 0.9.1's ``FileLogger.__init__`` (which does not expose it); we need the path before
    verl opens, and so empties, the file. ``ResumableFileLogger`` checks that both agree.
    """
    path = os.getenv("VERL_FILE_LOGGER_PATH")
    if path is None:
        root = os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", "."))
        path = os.path.join(root, project_name, f"{experiment_name}.jsonl")
    return path


def lines_to_keep(path: str | Path, resume_step: int) -> bytes:
    """The lines of the JSONL at ``path`` that a run resuming from step ``resume_step`` keeps: steps
    ``0..resume_step``, in file order (nothing for a fresh run, ``resume_step=0``, or a missing file).

    A last line without its newline (the killed run died mid-write) is dropped with a warning. Any other line
    that is not a verl file-logger record raises a ``ValueError`` naming the file and line, rather than
    silently rewriting a file this logger did not write.
    """
    path = Path(path)
    if resume_step <= 0 or not path.exists():
        return b""
    kept = []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            step = int(orjson.loads(line)["step"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            if number == len(lines):  # no newline after it: a torn write of the killed run
                print(f"WARNING: {path}:{number}: dropping an incomplete last line of the previous run ({err})")
                continue
            raise ValueError(f"{path}:{number}: not a verl file-logger record {{'step': int, 'data': {{...}}}}, "
                             f"cannot resume the log in this file; move it away to start a new one ({err})") from err
        if step <= resume_step:
            kept.append(line + b"\n")
    return b"".join(kept)


class ResumableFileLogger(verl_tracking.FileLogger):
    """verl's ``FileLogger`` (same path, same ``{"step": s, "data": {...}}`` lines), appending after the lines a
    run resuming from ``resume_step`` keeps (``lines_to_keep``); ``resume_step=0``: a fresh file."""

    def __init__(self, project_name: str, experiment_name: str, resume_step: int = 0):
        path = file_logger_path(project_name, experiment_name)
        kept = lines_to_keep(path, resume_step)
        staged = f"{path}.resume"
        if kept:  # staged before verl's "wb" empties the file, so a crash in between loses nothing
            Path(staged).write_bytes(kept)
        super().__init__(project_name, experiment_name)
        if os.path.abspath(self.filepath) != os.path.abspath(path):
            raise RuntimeError(f"verl's FileLogger writes {self.filepath}, but calibrl_verl.integration.tracking "
                               f"computed {path}: verl changed its path rule, update file_logger_path")
        if kept:
            self.fp.close()
            os.replace(staged, self.filepath)
            self.fp = open(self.filepath, "ab", buffering=0)  # noqa: SIM115 - closed by finish(), as verl's
        self.resume_step = resume_step


def resume_step(config: Mapping[str, Any] | None) -> int:
    """The step verl's trainer resumes from (0: a fresh run), from the run's config, as verl 0.9.1's
    ``_load_checkpoint`` decides it: ``trainer.resume_mode`` ``disable`` -> 0; ``auto`` -> the latest checkpoint
    under ``trainer.default_local_dir`` (relative to the working directory), 0 if none; ``resume_path`` -> the
    step in ``trainer.resume_from_path``'s ``global_step_<n>``. A config without ``trainer.resume_mode`` (not a
    PPO trainer's) counts as fresh.
    """
    trainer = (config or {}).get("trainer") or {}
    mode = trainer.get("resume_mode")
    if mode == "auto":
        from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

        folder = find_latest_ckpt_path(os.path.join(os.getcwd(), trainer.get("default_local_dir") or ""))
    elif mode == "resume_path":
        folder = str(trainer.get("resume_from_path") or "")
    else:
        return 0
    if not folder or "global_step_" not in folder:
        return 0
    return int(folder.rstrip("/").split("global_step_")[-1])


def install() -> None:
    """Build verl ``Tracking``'s ``file`` backend as a ``ResumableFileLogger`` (idempotent)."""
    tracking_cls = verl_tracking.Tracking
    if getattr(tracking_cls.__init__, _INSTALLED_FLAG, False):
        return
    verl_init = tracking_cls.__init__

    @functools.wraps(verl_init)
    def init(self, project_name, experiment_name, default_backend="console", config=None):
        backends = [default_backend] if isinstance(default_backend, str) else list(default_backend)
        verl_init(self, project_name, experiment_name, [b for b in backends if b != "file"], config)
        if "file" in backends:
            self.logger["file"] = ResumableFileLogger(project_name, experiment_name, resume_step(config))

    setattr(init, _INSTALLED_FLAG, True)
    tracking_cls.__init__ = init
