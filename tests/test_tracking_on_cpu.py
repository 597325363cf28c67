"""verl's file logger across a restart: a resumed run keeps every step logged before it, each once, in order.

These use verl's own ``Tracking`` with the ``file`` backend, built as verl's trainer builds it in ``fit()``; the
resume-safe logger comes in through ``calibrl_verl.plugin`` (verl's plugin entry point, run by ``import verl``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import verl  # noqa: F401  (runs verl's plugins, ours included)
from verl.utils.tracking import Tracking


def _config(mode: str = "auto", resume_from_path: str | None = None) -> dict:
    return {"trainer": {"resume_mode": mode, "default_local_dir": "checkpoints", "resume_from_path": resume_from_path}}


def _checkpoint(root: Path, step: int) -> None:
    """What verl's trainer leaves after saving step ``step``: the folder and the tracker file naming it."""
    (root / "checkpoints" / f"global_step_{step}").mkdir(parents=True, exist_ok=True)
    (root / "checkpoints" / "latest_checkpointed_iteration.txt").write_text(str(step))


def _launch(steps: list[int], config: dict, finish: bool = True) -> None:
    """One launch: verl's Tracking with the file backend, logging ``{"loss": step / 10}`` at each step."""
    tracking = Tracking("proj", "exp", default_backend=["console", "file"], config=config)
    for step in steps:
        tracking.log({"loss": step / 10, "launch": len(steps)}, step=step)
    if finish:
        tracking.finish()


def _lines(path: Path) -> list[tuple[int, dict]]:
    return [(r["step"], r["data"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "metrics.jsonl"))
    monkeypatch.delenv("VERL_FILE_LOGGER_ROOT", raising=False)
    return tmp_path


def test_a_resumed_run_keeps_every_step_once_in_order(run_dir: Path) -> None:
    # launch 1 logs steps 1-3, saves the checkpoint of step 2 and is killed before step 3's (not finished)
    _launch([1, 2, 3], _config(), finish=False)
    _checkpoint(run_dir, 2)
    # launch 2 resumes from step 2: it repeats step 3, then step 4
    _launch([3, 4], _config())
    assert _lines(run_dir / "metrics.jsonl") == [
        (1, {"loss": 0.1, "launch": 3}),
        (2, {"loss": 0.2, "launch": 3}),
        (3, {"loss": 0.3, "launch": 2}),  # the killed run's step 3 is gone, the resumed run's is there once
        (4, {"loss": 0.4, "launch": 2}),
    ]


def test_a_fresh_run_starts_an_empty_file_as_verl_does(run_dir: Path) -> None:
    _launch([1, 2], _config())
    _checkpoint(run_dir, 2)
    _launch([1], _config(mode="disable"))
    assert _lines(run_dir / "metrics.jsonl") == [(1, {"loss": 0.1, "launch": 1})]
    # auto with no checkpoint is a fresh run too
    (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").unlink()
    _launch([1, 2], _config())
    assert _lines(run_dir / "metrics.jsonl") == [(1, {"loss": 0.1, "launch": 2}), (2, {"loss": 0.2, "launch": 2})]


def test_resume_path_keeps_the_steps_up_to_the_named_checkpoint(run_dir: Path) -> None:
    _launch([0, 1, 2, 3], _config())  # step 0: validation before training
    _launch([1, 2], _config(mode="resume_path", resume_from_path="checkpoints/global_step_1"))
    assert _lines(run_dir / "metrics.jsonl") == [
        (0, {"loss": 0.0, "launch": 4}),
        (1, {"loss": 0.1, "launch": 4}),
        (1, {"loss": 0.1, "launch": 2}),  # validation before training logs at the checkpoint's own step
        (2, {"loss": 0.2, "launch": 2}),
    ]


def test_the_default_path_under_the_logger_root_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path / "logs"))
    _launch([1, 2], _config())
    _checkpoint(tmp_path, 1)
    _launch([2], _config())
    assert _lines(tmp_path / "logs" / "proj" / "exp.jsonl") == [(1, {"loss": 0.1, "launch": 2}),
                                                                (2, {"loss": 0.2, "launch": 1})]
    assert sorted(p.name for p in (tmp_path / "logs" / "proj").iterdir()) == ["exp.jsonl"]  # no staging file left


def test_a_torn_last_line_of_the_killed_run_is_dropped(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    path = run_dir / "metrics.jsonl"
    path.write_text('{"step": 1, "data": {"loss": 0.1}}\n{"step": 2, "data": {"lo')
    _checkpoint(run_dir, 2)
    _launch([3], _config())
    assert _lines(path) == [(1, {"loss": 0.1}), (3, {"loss": 0.3, "launch": 1})]
    assert "metrics.jsonl:2: dropping an incomplete last line" in capsys.readouterr().out


def test_a_file_that_is_not_a_verl_log_is_not_rewritten(run_dir: Path) -> None:
    path = run_dir / "metrics.jsonl"
    path.write_text('{"step": 1, "data": {}}\nnot json\n{"step": 2, "data": {}}\n')
    _checkpoint(run_dir, 2)
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a verl file-logger record"):
        _launch([3], _config())
    assert path.read_text() == '{"step": 1, "data": {}}\nnot json\n{"step": 2, "data": {}}\n'
