"""The worker watch (integration/worker_watch.py) on real Ray actors killed with SIGKILL: a blocked ``ray.get`` in the
main thread ends within a bounded time with an error naming the dead worker, the step, the stage and the checkpoint
to resume from; a stage past its limit ends with ``WorkerTimeoutError``. No trainer is launched (the end-to-end runs
are ``tests/test_faults_on_cpu.py``, ``-m faults``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import ray

from calibrl_verl.integration import worker_watch
from calibrl_verl.integration.worker_watch import Worker, WorkerDiedError, WorkerTimeoutError, WorkerWatch

CHECK_S = 0.2


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@ray.remote
class Sleeper:
    def pid(self) -> int:
        return os.getpid()

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def fail(self, message: str) -> None:
        raise RuntimeError(message)


def _watch(workers: list[Worker], checkpoint: Path | None) -> WorkerWatch:
    return WorkerWatch(workers, CHECK_S, step=lambda: 3, checkpoint=lambda: checkpoint, root=Path("/ckpt")).start()


def _blocked_get(watch: WorkerWatch, ref) -> tuple[BaseException, float]:
    """Wait on ``ref`` as verl does (no timeout); returns what ended the wait (named by the watch) and how long."""
    start = time.monotonic()
    try:
        ray.get(ref)
    except BaseException as err:  # noqa: BLE001 - the watch's interrupt is a KeyboardInterrupt
        watch.stop()
        return watch.named(err) or err, time.monotonic() - start
    finally:
        watch.stop()
    pytest.fail("the get returned")


def test_a_worker_killed_while_the_trainer_waits_on_another_is_named_within_the_check_interval(cluster) -> None:
    """The weight-sync hang: the trainer waits on the FSDP worker, which waits on the dead vLLM server forever."""
    busy, victim = Sleeper.remote(), Sleeper.remote()
    pid = ray.get(victim.pid.remote())
    watch = _watch([Worker("FSDP actor worker (actor_rollout_ref rank 0)", busy),
                    Worker("vllm rollout replica 0 (server 0)", victim)], Path("/ckpt/global_step_2"))
    with watch.stage("weight sync"):
        ref = busy.sleep.remote(120)
        os.kill(pid, signal.SIGKILL)
        err, waited = _blocked_get(watch, ref)
    assert isinstance(err, WorkerDiedError), err
    assert waited < 10 * CHECK_S + 5
    assert (err.role, err.step, err.stage, err.checkpoint) == (
        "vllm rollout replica 0 (server 0)", 3, "weight sync", Path("/ckpt/global_step_2"))
    text = str(err)
    assert text.startswith("the vllm rollout replica 0 (server 0) died at step 3 (weight sync). ")
    assert "trainer.resume_mode=auto" in text and "trainer.resume_from_path=/ckpt/global_step_2" in text
    assert f"pid: {pid}" in text  # Ray's own account of the death


def test_a_ray_actor_error_from_a_get_names_the_worker_it_came_from(cluster) -> None:
    """The update: verl's own ``ray.get`` on the killed FSDP worker raises ActorDiedError first."""
    victim = Sleeper.remote()
    pid = ray.get(victim.pid.remote())
    watch = WorkerWatch([Worker("FSDP actor worker (actor_rollout_ref rank 0)", victim)], 60.0, step=lambda: 2,
                        checkpoint=lambda: None, root=Path("/ckpt"))  # not started: the get raises first
    watch.enter("actor update")
    ref = victim.sleep.remote(120)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError) as raised:
        ray.get(ref, timeout=60)
    err = watch.named(raised.value)
    assert isinstance(err, WorkerDiedError)
    assert str(err).startswith("the FSDP actor worker (actor_rollout_ref rank 0) died at step 2 (actor update). "
                               "No complete checkpoint under /ckpt: a restart trains from step 1")
    assert watch.named(ValueError("not a worker")) is None


def test_a_checkpoint_save_is_let_finish_before_the_interrupt(cluster) -> None:
    """A dead vLLM server is found during the save: the save completes, the run stops right after it."""
    busy, victim = Sleeper.remote(), Sleeper.remote()
    os.kill(ray.get(victim.pid.remote()), signal.SIGKILL)
    watch = _watch([Worker("FSDP actor worker (actor_rollout_ref rank 0)", busy),
                    Worker("vllm rollout replica 0 (server 0)", victim)], Path("/ckpt/global_step_1"))
    saved = None
    try:
        with watch.stage("checkpoint save"):
            saved = ray.get(busy.sleep.remote(10 * CHECK_S))
        with watch.stage("weight sync"):
            ray.get(busy.sleep.remote(120))
    except BaseException as raised:  # noqa: BLE001 - the watch's interrupt
        watch.stop()
        err = watch.named(raised) or raised
    finally:
        watch.stop()
    assert saved == 10 * CHECK_S
    assert isinstance(err, WorkerDiedError), err
    assert err.role == "vllm rollout replica 0 (server 0)" and err.stage in ("after checkpoint save", "weight sync")


def test_a_stage_past_its_limit_ends_with_a_timeout_naming_the_key(cluster) -> None:
    busy = Sleeper.remote()
    watch = _watch([Worker("FSDP actor worker (actor_rollout_ref rank 0)", busy)], Path("/ckpt/global_step_1"))
    with watch.stage("weight sync", 1.0, "calibrl.weight_sync_timeout_s"):
        err, waited = _blocked_get(watch, busy.sleep.remote(120))
    assert isinstance(err, WorkerTimeoutError), err
    assert 1.0 <= waited < 1.0 + 10 * CHECK_S + 5
    assert str(err).startswith("weight sync at step 3 did not finish within calibrl.weight_sync_timeout_s=1 s, "
                               "with every worker alive")
    assert "trainer.resume_mode=auto" in str(err)


def test_stages_are_named_and_only_a_limited_stage_times_out(cluster) -> None:
    watch = WorkerWatch([], CHECK_S, step=lambda: 1, checkpoint=lambda: None)
    assert watch.stage_name == "start-up"
    with watch.stage("actor update"):
        assert watch.stage_name == "actor update"
        time.sleep(0.3)
        assert watch.check() is None  # no limit
    assert watch.stage_name == "after actor update"
    with pytest.raises(RuntimeError), watch.stage("weight sync", 600.0):
        raise RuntimeError("a worker died")
    assert watch.stage_name == "weight sync"  # what the named error reports


def test_messages_without_a_cause_or_checkpoint() -> None:
    text = worker_watch.died_message("agent loop worker 0", 4, "generation", "", None, None)
    assert text == ("the agent loop worker 0 died at step 4 (generation). No complete checkpoint: a restart trains "
                    "from step 1 (trainer.resume_mode=auto finds nothing to load).")


def test_an_unreachable_worker_is_named_as_unreachable_not_dead() -> None:
    """A lost node: Ray's ActorUnavailableError (before it declares the node dead) names the worker as unreachable;
    Ray gave no actor id, so the watch asks its workers (none here) and names an unknown worker."""
    watch = WorkerWatch([], CHECK_S, step=lambda: 2, checkpoint=lambda: Path("/ck/global_step_1"))
    assert watch.named(RuntimeError("update failed")) is None  # not a Ray actor error
    err = ray.exceptions.ActorUnavailableError("Socket closed", None)
    fault = watch.named(err)
    assert isinstance(fault, worker_watch.WorkerDiedError)
    assert str(fault).startswith("the a Ray worker of the run (not one the watch knows) became unreachable (its "
                                 "process or its node is gone) at step 2 (start-up). The last complete checkpoint is "
                                 "/ck/global_step_1")
    assert "Socket closed" in str(fault)


def test_a_rank_whose_collective_peer_died_is_named_after_the_peer(cluster) -> None:
    """dp > 1, or a lost node: the surviving rank's task fails first (gloo: "Connection closed by peer"), a plain
    RayTaskError; the watch asks every worker and names the dead one. With every worker alive the error is not a
    worker fault, and finding that out waits only for the pings."""
    survivor, peer = Sleeper.remote(), Sleeper.remote()
    workers = [Worker("FSDP actor worker (actor_rollout_ref rank 0)", survivor),
               Worker("FSDP actor worker (actor_rollout_ref rank 1)", peer)]
    watch = WorkerWatch(workers, 60.0, step=lambda: 2, checkpoint=lambda: None, root=Path("/ckpt"))
    with pytest.raises(ray.exceptions.RayTaskError) as alive:
        ray.get(survivor.fail.remote("Connection closed by peer"))
    start = time.monotonic()
    assert watch.named(alive.value) is None
    assert time.monotonic() - start < 5

    pid = ray.get(peer.pid.remote())
    watch.check()  # a round of pings in flight, as the watch's thread leaves them, answered while the peer lives
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayTaskError) as echo:
        ray.get(survivor.fail.remote("Connection closed by peer"))
    err = watch.named(echo.value)
    assert isinstance(err, WorkerDiedError), err
    assert str(err).startswith("the FSDP actor worker (actor_rollout_ref rank 1) died at step 2 (start-up). ")
