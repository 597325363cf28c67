"""Opt-in runs, left out of the default run to keep CI under 30 minutes and selected with ``-m <marker>`` (or any -m
naming it): ``families`` (the smoke runs of the other model families, and the other opt-in launches: RL-PLUS, the
shipped recipes one step each, verl's SFT trainer and merge), ``studies`` (the toy and coverage studies' fast
presets end to end), ``serve`` (vLLM's OpenAI server on the tiny model), ``faults`` (workers killed mid-step, a run
killed mid-save or out of disk, then resumed) and ``nodes`` (the tiny recipe on a two-node Ray cluster on this
machine). Also the fixtures those launches share: ``tmpfs`` (a real small disk) and ``tiny_assets``."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

OPT_IN = {
    "families": "opt-in launch (model families, RL-PLUS, real recipes, SFT + merge): select with -m families "
                "(bash scripts/test.sh -m families)",
    "studies": "the studies' fast presets end to end (3 launches, ~7 min): select with -m studies "
               "(bash scripts/test.sh -m studies)",
    "nodes": "starts a two-node Ray cluster on this machine: select with -m nodes (bash scripts/test.sh -m nodes)",
    "serve": "starts vLLM's OpenAI server: select with -m serve (bash scripts/test.sh -m serve)",
    "faults": "kills Ray workers of tiny runs mid-step or mid-checkpoint-save, fills their disk, and resumes them "
              "(~30 min): select with -m faults (bash scripts/test.sh -m faults)",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    chosen = config.getoption("-m") or ""
    for marker, reason in OPT_IN.items():
        if marker in chosen:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, int], Path]]:
    """``mount(folder, size_bytes)``: a real tmpfs of that size at ``folder`` (created), so writes past it fail with
    the kernel's own ENOSPC (a second call resizes it, keeping its files); unmounted when the test ends. Skips where
    mounting is not allowed (CI runs as root)."""
    mounted: list[Path] = []

    def mount(folder: Path, size: int) -> Path:
        if folder in mounted:  # resize in place, files kept: a run measures a checkpoint, then the disk is shrunk
            subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):  # lazily: a process of a killed launch may still hold a file open
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model and data (``calibrl_verl.tiny``), built once for the launches of the fault tests."""
    from calibrl_verl import launch

    return launch.ensure_assets(tmp_path_factory.mktemp("tiny_assets") / "assets")
