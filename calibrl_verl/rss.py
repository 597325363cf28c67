"""Resident memory of one launch's processes, grouped by what each process does.

A launch of ``calibrl_verl.launch`` tags every process of its Ray cluster (``launch.tagged_pids``); ``ProcessTable``
reads the parent, title and RSS of each, and ``classify`` gives each a role by its title, which Ray and vLLM set
(``ray::TaskRunner.run``, ``ray::WorkerDict.update_actor``, ``ray::vLLMHttpServer...``, ``VLLM::EngineCore``). A
process whose title matches no role takes its parent's role (vLLM's engine core under the HTTP server), else
"rest" (Ray's own daemons, TransferQueue, agent-loop and reward workers). Used by ``benchmarks/bench_step.py``
(peak RSS per role, ``TRAINER_ROLES``) and ``calibrl_verl.soak`` (RSS per role at each training step,
``SOAK_ROLES``, with the launch's own process pinned as the driver).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import psutil

# (role, substrings of the process title), first match wins
ROLLOUT_TITLES = ("vLLMHttpServer", "EngineCore", "VLLM::")
TRAINER_ROLES = (("trainer", ("TaskRunner", "WorkerDict")), ("rollout", ROLLOUT_TITLES))
# verl's single controller (the training loop) runs in the TaskRunner; the FSDP actor in the WorkerDict
SOAK_ROLES = (("driver", ("TaskRunner",)), ("actor", ("WorkerDict",)), ("rollout", ROLLOUT_TITLES))
MB = 2**20

Roles = Sequence[tuple[str, Sequence[str]]]
Info = dict[int, tuple[int, str, int]]  # pid -> (parent pid, title, RSS bytes)


def process_title(proc: psutil.Process) -> str:
    """What Ray / vLLM set as the process title (``ray::WorkerDict.update_actor``), else its name."""
    try:
        return " ".join(proc.cmdline()).strip()[:120] or proc.name()  # Ray pads its titles with spaces
    except psutil.Error:
        return "?"


def classify(info: Mapping[int, tuple[int, str, int]], roles: Roles = TRAINER_ROLES,
             pinned: Mapping[int, str] | None = None) -> dict[int, str]:
    """Role per pid: by its own title, else its parent's role, else "rest". ``pinned`` roles (pid -> role) are
    set last and not inherited: the launch's own process is the driver, but the Ray daemons it starts are not."""
    found: dict[int, str] = {}

    def role(pid: int, depth: int = 0) -> str:
        if pid in found:
            return found[pid]
        parent, title, _ = info[pid]
        match = next((r for r, needles in roles if any(n in title for n in needles)), None)
        if match is None:
            match = role(parent, depth + 1) if parent in info and depth < 16 else "rest"
        found[pid] = match
        return match

    for pid in info:
        role(pid)
    found.update({pid: r for pid, r in (pinned or {}).items() if pid in info})
    return found


def sums(info: Mapping[int, tuple[int, str, int]], roles: Mapping[int, str]) -> dict[str, int]:
    """Summed RSS bytes per role, and over all processes as "total" (shared pages count once per process)."""
    out: dict[str, int] = defaultdict(int)
    for pid, r in roles.items():
        out[r] += info[pid][2]
        out["total"] += info[pid][2]
    return dict(out)


class ProcessTable:
    """The processes of one launch, found by its tag; ``read`` gives pid -> (parent, title, RSS bytes) now."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._procs: dict[int, psutil.Process] = {}

    def read(self) -> Info:
        from calibrl_verl import launch

        info: Info = {}
        for pid in launch.tagged_pids(self.tag):
            try:
                proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                info[pid] = (proc.ppid(), process_title(proc), proc.memory_info().rss)
            except psutil.Error:
                self._procs.pop(pid, None)
        return info
