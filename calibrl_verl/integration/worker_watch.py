"""A worker that dies (or a weight sync that hangs) inside a step ends the run with an error that names it.

Why this module: verl 0.9.1's trainer waits on its Ray workers without a bound in three places, so a killed worker
does not always end the run:

- generation: the rollout runs in the background and ``ReplayBuffer.sample`` polls TransferQueue for finished
  groups; a group whose vLLM server died is marked failed and re-submitted, forever;
- the weight sync (``naive`` checkpoint engine): the FSDP worker pushes the weights to the vLLM server over ZMQ and
  the trainer's ``ray.get`` waits for it, forever when the server is gone (or when a weight load fails inside
  vLLM's worker, which verl never propagates: docs/cpu_backend.md, "The test suite");
- any ``ray.get`` on a worker group, when one rank of a collective died and the others wait in it.

``WorkerWatch`` is a daemon thread in the trainer's process (Ray's TaskRunner). Every ``calibrl.worker_check_s``
seconds it pings each Ray actor of the run (Ray's own ``__ray_ready__``, at most one ping in flight per actor, so a
busy actor only answers later): a dead actor's ping fails within milliseconds. It also times the stage the trainer is
in and enforces a limit on it (``calibrl.weight_sync_timeout_s`` on the weight sync). On a fault it records a
``WorkerDiedError`` / ``WorkerTimeoutError`` and interrupts the trainer's main thread (``_thread.interrupt_main``:
Ray's blocking ``get`` checks for it, and a Ray worker turns it into a ``KeyboardInterrupt`` or
``TaskCancelledError``); the trainer (``CalibRLTrainer.fit``) then raises the recorded error instead. A
``RayActorError`` that verl's own ``ray.get`` raises first is named the same way (``WorkerWatch.named``).

The message says which worker died (its role, rank, Ray actor and pid), at which step and stage, the last complete
checkpoint, and how to resume: the same command with ``trainer.resume_mode=auto``.
"""

from __future__ import annotations

import _thread
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

# How often the watch pings the run's workers, and how long a weight sync may take: the defaults of
# calibrl.worker_check_s / calibrl.weight_sync_timeout_s (config/__init__.py documents them).
DEFAULT_CHECK_S = 5.0
DEFAULT_WEIGHT_SYNC_TIMEOUT_S = 600.0
REPEAT_INTERRUPT_S = 10.0
# how long a worker's failed task waits for the watch to find a dead peer (a lost node's actors answer a ping with
# ActorUnavailableError within seconds; measured 9.4 s from the raylet kill to the surviving rank's gloo error)
PEER_WAIT_S = 30.0
# stages the watch does not interrupt: a save goes on to a complete checkpoint when a worker it does not need died
DEFERRED_STAGES = ("checkpoint save",)


class WorkerFault(RuntimeError):
    """A worker of the run died or a stage overran its limit; the message names it and how to resume."""

    def __init__(self, message: str, *, role: str, step: int, stage: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.role, self.step, self.stage, self.checkpoint = role, step, stage, checkpoint


class WorkerDiedError(WorkerFault):
    """A Ray worker (FSDP rank, vLLM server, agent-loop or reward worker) died during a step."""


class WorkerTimeoutError(WorkerFault):
    """A stage (the weight sync) ran past its limit with every worker still alive."""


@dataclass(frozen=True)
class Worker:
    """One Ray actor of the run: its role in words (``FSDP actor worker (actor_rollout_ref rank 0)``) and handle."""

    role: str
    handle: Any

    @property
    def actor_id(self) -> str:
        return self.handle._actor_id.hex()


def resume_hint(checkpoint: Path | None, root: Path | None) -> str:
    """What to do next: the last complete checkpoint and the overrides that resume from it."""
    if checkpoint is None:
        where = f" under {root}" if root is not None else ""
        return (f"No complete checkpoint{where}: a restart trains from step 1 (trainer.resume_mode=auto finds "
                "nothing to load).")
    return (f"The last complete checkpoint is {checkpoint}; run the same command with trainer.resume_mode=auto to "
            f"continue from it (or trainer.resume_mode=resume_path trainer.resume_from_path={checkpoint}).")


def died_message(role: str, step: int, stage: str, cause: str, checkpoint: Path | None, root: Path | None,
                 unreachable: bool = False) -> str:
    """The ``WorkerDiedError`` text: who died (or became unreachable: its node lost), when, Ray's own account, and how
    to resume."""
    cause = " ".join(cause.split())[:600]
    what = "became unreachable (its process or its node is gone)" if unreachable else "died"
    return (f"the {role} {what} at step {step} ({stage}). " + resume_hint(checkpoint, root)
            + (f" Ray says: {cause}" if cause else ""))


def timeout_message(stage: str, step: int, limit_s: float, key: str, checkpoint: Path | None,
                    root: Path | None) -> str:
    """The ``WorkerTimeoutError`` text: which stage overran which limit (and the key that sets it)."""
    return (f"{stage} at step {step} did not finish within {key}={limit_s:g} s, with every worker alive (a hang: "
            f"e.g. a weight load that failed inside vLLM's worker, which verl does not report). "
            + resume_hint(checkpoint, root) + f" Raise {key} if the stage is only slow.")


@dataclass
class _Stage:
    name: str = "start-up"
    started: float = field(default_factory=time.monotonic)
    limit_s: float | None = None
    key: str = ""


class WorkerWatch:
    """Pings ``workers`` every ``check_s`` seconds and times the current stage; on a fault, interrupts the main
    thread. ``step`` and ``checkpoint`` are called when a fault is named: the trainer's step and its last complete
    checkpoint (``root`` is the checkpoint folder, for the message when there is none)."""

    def __init__(self, workers: list[Worker], check_s: float, step: Callable[[], int],
                 checkpoint: Callable[[], Path | None], root: Path | None = None,
                 interrupt: Callable[[], None] = _thread.interrupt_main) -> None:
        self.workers, self.check_s = workers, float(check_s)
        self._step, self._checkpoint, self._root, self._interrupt = step, checkpoint, root, interrupt
        self._pings: dict[str, Any] = {}
        self._stage = _Stage()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fault: WorkerFault | None = None
        self._died_of: tuple[str, str, bool] | None = None  # (role, Ray's account, unreachable) of the dead worker

    # -- what the trainer calls --------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str, limit_s: float | None = None, key: str = "") -> Iterator[None]:
        """The trainer is in stage ``name`` (timed against ``limit_s`` when given); afterwards, until the next stage,
        it is "after <name>". An exception leaves the stage as it was, for the error that names it."""
        self.enter(name, limit_s, key)
        yield
        self.enter(f"after {name}")

    def enter(self, name: str, limit_s: float | None = None, key: str = "") -> None:
        """The trainer enters stage ``name`` (timed against ``limit_s`` when given)."""
        with self._lock:
            self._stage = _Stage(name, time.monotonic(), limit_s or None, key)

    @property
    def stage_name(self) -> str:
        return self._stage.name

    def start(self) -> WorkerWatch:
        self._thread = threading.Thread(target=self._run, name="calibrl-worker-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.check_s + 5)

    def named(self, err: BaseException) -> WorkerFault | None:
        """The named fault for an exception the trainer's main thread got: the one the watch recorded (its
        interrupt arrives as ``KeyboardInterrupt`` or Ray's ``TaskCancelledError``); for a ``RayActorError`` that
        verl's ``ray.get`` raised first, the worker it names; for another error raised inside a worker (a rank whose
        collective peer died: gloo's "Connection closed by peer"), a dead worker found by asking every worker now,
        else None (not a worker fault: the error is raised as it is)."""
        if self.fault is not None:
            return self.fault
        actor_err = _actor_error(err)
        if actor_err is None:
            return self._peer_died(err)
        err = actor_err
        actor_id = getattr(err, "actor_id", None)
        worker = next((w for w in self.workers if actor_id and w.actor_id == actor_id), None)
        if worker is None:  # Ray did not say which actor: ask every worker, now
            self.check(wait_s=min(self.check_s, 5.0))
            if self.fault is not None:
                return self.fault
        role = worker.role if worker is not None else "a Ray worker of the run (not one the watch knows)"
        return self._died(role, str(err), _unreachable(err))

    def _peer_died(self, err: BaseException) -> WorkerFault | None:
        """A worker's task failed (``RayTaskError``) with every actor error aside: when a worker of the run is dead
        or unreachable (its ping fails within ``PEER_WAIT_S``), that worker is the fault and ``err`` its echo. One
        round of pings: with every worker alive it ends as soon as all have answered."""
        if not isinstance(err, ray.exceptions.RayTaskError):
            return None
        self._pings.clear()  # pings sent before the failure may have been answered while the peer was alive
        self.check(wait_s=PEER_WAIT_S)
        if not isinstance(self.fault, WorkerDiedError):
            self.fault = None  # a stage limit passing meanwhile is not what ended this run
            return None
        return self.fault

    # -- the thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                fault = self.check()
            except Exception:  # noqa: BLE001 - a failed check (Ray shutting down) must not kill the run
                continue
            if fault is not None:
                break
        # a checkpoint save in progress is let finish (it needs only the FSDP workers, and verl's own get raises if
        # one of them died); the fault then names the stage and checkpoint of the moment it interrupts
        if self._stage.name in DEFERRED_STAGES and self._died_of is not None:
            while not self._stop.is_set() and self._stage.name in DEFERRED_STAGES:
                self._stop.wait(0.05)
            self.fault = self._died(*self._died_of)
        # until the trainer stops the watch: an interrupt that lands in verl code catching ``Exception`` (Ray's
        # TaskCancelledError is one) is swallowed, so repeat it, slowly enough that the trainer has long stopped the
        # watch when the first one reached it
        while not self._stop.is_set():
            self._interrupt()
            self._stop.wait(max(self.check_s, REPEAT_INTERRUPT_S))

    def check(self, wait_s: float = 0.0) -> WorkerFault | None:
        """One round: a dead worker, else an overrun stage, recorded in ``self.fault``; None when all is well."""
        for worker in self.workers:
            if worker.actor_id not in self._pings:
                self._pings[worker.actor_id] = worker.handle.__ray_ready__.remote()
        ready, _ = ray.wait(list(self._pings.values()), num_returns=len(self._pings), timeout=wait_s)
        ready = set(ready)
        for worker in self.workers:
            ping = self._pings[worker.actor_id]
            if ping not in ready:
                continue
            del self._pings[worker.actor_id]
            try:
                ray.get(ping)
            except ray.exceptions.RayActorError as err:
                self._died_of = (worker.role, str(err), _unreachable(err))
                self.fault = self._died(*self._died_of)
                return self.fault
        with self._lock:
            stage = self._stage
        if stage.limit_s is not None and time.monotonic() - stage.started > stage.limit_s:
            checkpoint = self._checkpoint()
            self.fault = WorkerTimeoutError(
                timeout_message(stage.name, self._step(), stage.limit_s, stage.key, checkpoint, self._root),
                role="", step=self._step(), stage=stage.name, checkpoint=checkpoint)
            return self.fault
        return None

    def _died(self, role: str, cause: str, unreachable: bool = False) -> WorkerDiedError:
        checkpoint, step, stage = self._checkpoint(), self._step(), self._stage.name
        return WorkerDiedError(died_message(role, step, stage, cause, checkpoint, self._root, unreachable),
                               role=role, step=step, stage=stage, checkpoint=checkpoint)


def _unreachable(err: BaseException) -> bool:
    """Ray's ``ActorUnavailableError``: the actor's process or node cannot be reached (a lost node gives this before
    Ray declares the node dead); any other ``RayActorError`` says the actor died."""
    return isinstance(err, ray.exceptions.ActorUnavailableError)


def _actor_error(err: BaseException | None) -> BaseException | None:
    """The ``RayActorError`` in ``err``'s chain (``__cause__``, ``__context__``, a Ray task error's ``cause``)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ray.exceptions.RayActorError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def run_workers(trainer: Any) -> list[Worker]:
    """The Ray actors of a verl 0.9.1 V1 trainer's run, each with its role in words: the FSDP worker groups' ranks,
    the rollout replicas' servers, the agent-loop workers and the reward-loop workers (where the run has them)."""
    workers: list[Worker] = []
    for attr, what in (("actor_rollout_wg", "FSDP actor worker (actor_rollout_ref"), ("ref_policy_wg", "FSDP "
                       "reference worker (ref"), ("critic_wg", "FSDP critic worker (critic")):
        group = getattr(trainer, attr, None)
        for rank, handle in enumerate(getattr(group, "workers", None) or []):
            workers.append(Worker(f"{what} rank {rank})", handle))
    name = str(trainer.config.actor_rollout_ref.rollout.name)
    manager = getattr(trainer, "checkpoint_manager", None)
    for i, replica in enumerate(getattr(manager, "replicas", None) or []):
        rank = getattr(replica, "replica_rank", i)
        for j, handle in enumerate(getattr(replica, "servers", None) or []):
            workers.append(Worker(f"{name} rollout replica {rank} (server {j})", handle))
    agent_loop = getattr(trainer, "agent_loop_manager", None)
    for i, handle in enumerate(getattr(agent_loop, "agent_loop_workers", None) or []):
        workers.append(Worker(f"agent loop worker {i}", handle))
    reward = getattr(trainer, "reward_loop_manager", None)
    for i, handle in enumerate(getattr(reward, "reward_loop_worker_handles", None) or []):
        workers.append(Worker(f"reward loop worker {i}", handle))
    seen: set[str] = set()  # a handle listed twice (a colocated replica's workers are the actor's) is pinged once
    return [w for w in workers if not (w.actor_id in seen or seen.add(w.actor_id))]
