"""Two Ray nodes on one machine: the tiny CalibRL recipe with ``trainer.nnodes=2``, as a user runs it on two hosts.

The commands are docs/multinode.md's: ``ray start --head`` (node 0) and ``ray start --address`` (node 1), each
advertising one device (``--num-gpus=1``: the CPU backend maps verl's GPU bundles onto Ray's logical ``GPU``
resource, calibrl_verl/cpu/settings.py), then the driver attached to that cluster (``RAY_ADDRESS``, as the README's
"Multi-node" section runs the recipe on node 0). Both raylets share this host's address and get their own ports;
every process of the cluster carries a tag in its environment (``launch.TAG_ENV``), so teardown kills this cluster's
processes only (``ray stop`` would stop every Ray cluster on the machine).

Checks: the run trains its steps (metrics logged, smoke.check: rollout log-probs agree with the actor's every step,
so both vLLM replicas received the weights), one actor worker and one vLLM server per node and verl's TaskRunner on
node 0, the driver's (GCS actor table); and that killing node 1's raylet mid-run ends the run in bounded time with
the worker watch's ``WorkerDiedError`` naming the lost worker and the intact step-1 checkpoint, after which node 1
rejoins and the same command with ``trainer.resume_mode=auto`` trains the remaining steps.
Opt-in: ``bash scripts/test.sh -m nodes`` (about 12 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from ray.util import get_node_ip_address

from calibrl_verl import launch, smoke
from calibrl_verl.cpu import cpu_env
from calibrl_verl.integration import checkpoints

HEAD_PORT = 46379
# this host's address, as `ray start` picks it (Ray's agents listen on it: a --node-ip-address of 127.0.0.1 leaves the
# raylet unable to reach its runtime-env agent, and it dies at start-up)
HEAD = f"{get_node_ip_address()}:{HEAD_PORT}"
# node 0 / node 1: node manager, object manager, first worker port, dashboard agent (listen, grpc), metrics,
# runtime-env agent; distinct from Ray's defaults so another cluster on this machine is left alone
PORTS = ({"node-manager-port": 46380, "object-manager-port": 46381, "min-worker-port": 46400,
          "max-worker-port": 46499, "dashboard-agent-listen-port": 46382, "dashboard-agent-grpc-port": 46383,
          "metrics-export-port": 46384, "runtime-env-agent-port": 46385},
         {"node-manager-port": 46390, "object-manager-port": 46391, "min-worker-port": 46500,
          "max-worker-port": 46599, "dashboard-agent-listen-port": 46392, "dashboard-agent-grpc-port": 46393,
          "metrics-export-port": 46394, "runtime-env-agent-port": 46395},
         # node 1 again, after its raylet was killed: fresh ports (the lost node's agents may still hold the old ones)
         {"node-manager-port": 46610, "object-manager-port": 46611, "min-worker-port": 46620,
          "max-worker-port": 46699, "dashboard-agent-listen-port": 46612, "dashboard-agent-grpc-port": 46613,
          "metrics-export-port": 46614, "runtime-env-agent-port": 46615})
# Ray 2.60's `ray start --head` turns on token authentication (the token in ~/.ray/auth_token): every node and the
# driver say so, or the second node is refused ("InvalidAuthToken"). A raylet waits for its dashboard agent, which
# takes more than the default on a loaded 2-core host ("WaitForDashboardAgentPorts" check failure): more time.
CLUSTER_ENV = {"RAY_AUTH_MODE": "token", "RAY_agent_register_timeout_ms": "120000"}
NODE_CPUS = 8
STEPS = 2
RUN_TIMEOUT = 1200
# after node 1's raylet dies, the run must end within this
DEAD_NODE_BOUND_S = 300
RAY = str(Path(sys.executable).with_name("ray"))


def multinode_overrides(nnodes: int) -> list[str]:
    """The driver joins an existing cluster: Ray refuses num_cpus / num_gpus there (the nodes declared theirs)."""
    return ["ray_kwargs.ray_init.num_cpus=null", "ray_kwargs.ray_init.num_gpus=null",
            f"trainer.nnodes={nnodes}", "trainer.n_gpus_per_node=1"]


COMMON = [f"--num-cpus={NODE_CPUS}", "--num-gpus=1", "--object-store-memory=300000000", "--disable-usage-stats"]


def ray_start_commands(temp_dir: Path) -> list[list[str]]:
    head = [RAY, "start", "--head", f"--port={HEAD_PORT}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
            *COMMON, *(f"--{k}={v}" for k, v in PORTS[0].items())]
    return [head, worker_start_command(temp_dir, PORTS[1])]


def worker_start_command(temp_dir: Path, ports: dict[str, int]) -> list[str]:
    return [RAY, "start", f"--address={HEAD}", f"--temp-dir={temp_dir}", *COMMON,
            *(f"--{k}={v}" for k, v in ports.items())]


def _gcs_query(code: str) -> object:
    """Run ``code`` (which sets ``out``) in a fresh driver attached to the cluster; returns ``out``."""
    script = (f"import json, ray\nray.init(address='{HEAD}', log_to_driver=False)\n{code}\n"
              "print('@@' + json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **CLUSTER_ENV, "RAY_ADDRESS": ""})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][2:])


def alive_nodes() -> list[dict]:
    return _gcs_query("out = [{'id': n['NodeID'], 'port': n['NodeManagerPort'], 'gpu': n['Resources'].get('GPU')}"
                      " for n in ray.nodes() if n['Alive']]")


def actor_nodes() -> list[dict]:
    """Every actor the cluster has run (dead ones included): id, class, name, node id, state."""
    return _gcs_query("from ray._private import state\nout = [{'id': a['ActorID'], 'cls': a['ActorClassName'], "
                      "'name': a['Name'], 'node': a['Address']['NodeID'], 'state': a['State']} "
                      "for a in state.actors().values()]")


def raylet_pid(tag: str, node_manager_port: int) -> int:
    for pid in launch.tagged_pids(tag):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"raylet") and f"--node_manager_port={node_manager_port}".encode() in cmd:
            return pid
    raise AssertionError(f"no raylet on port {node_manager_port}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes on this machine, torn down by tag (this cluster's processes only)."""
    tag = f"nodes-{uuid.uuid4().hex[:8]}"
    temp_dir = Path(f"/tmp/crn_{tag[-8:]}")  # short: Ray's unix sockets live under it
    env = {**os.environ, **cpu_env(), **CLUSTER_ENV, launch.TAG_ENV: tag}
    env.pop("RAY_ADDRESS", None)
    try:
        for cmd in ray_start_commands(temp_dir):
            subprocess.run(cmd, env=env, check=True, timeout=180)
        deadline = time.time() + 60
        while len(nodes := alive_nodes()) < 2 and time.time() < deadline:
            time.sleep(1)
        assert len(nodes) == 2 and all(n["gpu"] == 1 for n in nodes), nodes
        yield tag, nodes, temp_dir, env
    finally:
        launch.kill_tagged(tag)


REPO = Path(__file__).resolve().parents[1]


def tiny_command() -> list[str]:
    """docs/multinode.md's launch on node 0: the tiny CPU recipe's run script, two nodes of one device each."""
    return ["bash", str(REPO / "recipes" / "run_calibrl_tiny_cpu.sh"), *multinode_overrides(2)]


def _start(out: Path, steps: int, *overrides: str, log_name: str = "run_script.log"
           ) -> tuple[subprocess.Popen, Path, Path]:
    """The run script on node 0 (the driver attached to the cluster by RAY_ADDRESS); its own session, so a hung
    run is killed whole. Returns the process, its metrics JSONL and its output."""
    env = {**os.environ, **CLUSTER_ENV, "RAY_ADDRESS": HEAD, "OUT": str(out), "STEPS": str(steps),
           "VENV": str(Path(sys.executable).parents[1])}
    log = out / log_name
    with open(log, "w") as f:
        proc = subprocess.Popen([*tiny_command(), *overrides], env=env, cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, out / "calibrl" / "metrics.jsonl", log


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_for_step_1(proc: subprocess.Popen, metrics: Path, log: Path) -> None:
    deadline = time.time() + RUN_TIMEOUT
    while not (metrics.exists() and metrics.read_text().strip()):  # step 1 logged (its checkpoint saved before)
        if proc.poll() is not None or time.time() > deadline:
            _kill(proc)
            pytest.fail(f"no step logged: {log.read_text()[-3000:]}")
        time.sleep(1)


def _end(proc: subprocess.Popen, log: Path, within_s: float, what: str) -> int:
    try:
        return proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail(f"{what}: still running after {within_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.nodes
def test_two_nodes_train_with_one_actor_and_one_vllm_replica_each(cluster, tmp_path_factory):
    tag, nodes, _, _ = cluster
    out = tmp_path_factory.mktemp("nodes")
    t0 = time.time()
    proc, metrics, log = _start(out, STEPS)
    code = _end(proc, log, RUN_TIMEOUT, "the two-node run")
    wall = time.time() - t0
    assert code == 0, log.read_text()[-4000:]
    failed = [text for ok, text in smoke.check(metrics, STEPS, "calibrl") if not ok]
    assert not failed, failed
    actors = actor_nodes()
    node_ids = {n["id"] for n in nodes}
    workers = [a for a in actors if "WorkerDict" in a["cls"] or "ActorRollout" in a["cls"]]
    servers = [a for a in actors if a["cls"] == "vLLMHttpServer"]
    runners = [a for a in actors if "TaskRunner" in a["cls"]]
    print(json.dumps({"wall_s": round(wall, 1), "nodes": nodes, "actors": actors}, indent=1))
    assert {a["node"] for a in workers} == node_ids and len(workers) == 2, workers
    assert {a["node"] for a in servers} == node_ids and len(servers) == 2, servers
    # the training loop runs where the driver runs (main_calibrl.OnDriverNode), so losing node 1 leaves it alive
    head = next(n["id"] for n in nodes if n["port"] == PORTS[0]["node-manager-port"])
    assert [a["node"] for a in runners] == [head], runners


LOST = re.compile(r"WorkerDiedError: the (?P<role>.+?) (?:died|became unreachable \(its process or its node is "
                  r"gone\)) at step 2 \((?P<stage>[^)]+)\)\. The last complete checkpoint is (?P<ckpt>\S+);"
                  r".*Ray says: (?P<cause>.*)")
ROLES = re.compile(r"FSDP actor worker \(actor_rollout_ref rank \d\)|vllm rollout replica \d \(server 0\)"
                   r"|agent loop worker \d+|reward loop worker \d+")


@pytest.mark.nodes
def test_a_lost_node_is_named_and_the_run_resumes_once_the_node_is_back(cluster, tmp_path_factory):
    """Node 1's raylet SIGKILLed after step 1 (its checkpoint saved): the run ends within DEAD_NODE_BOUND_S with the
    worker watch's error naming a worker of node 1 and the step-1 checkpoint, which is complete; node 1 rejoins (a
    new ``ray start --address``) and the same command with ``trainer.resume_mode=auto`` trains steps 2-4."""
    tag, nodes, temp_dir, env = cluster
    node_1 = next(n["id"] for n in nodes if n["port"] == PORTS[1]["node-manager-port"])
    out = tmp_path_factory.mktemp("nodes_kill")
    proc, metrics, log = _start(out, 4, "trainer.save_freq=1")
    _wait_for_step_1(proc, metrics, log)
    os.kill(raylet_pid(tag, PORTS[1]["node-manager-port"]), signal.SIGKILL)
    killed_at = time.time()
    code = _end(proc, log, DEAD_NODE_BOUND_S, "the run after node 1's raylet died")
    took = time.time() - killed_at
    text = (out / "calibrl" / "metrics.log").read_text()  # the run's own output (the script's log has its tail)
    named = LOST.search(text)
    print(f"exit {code} {took:.1f} s after the raylet kill: {named[0] if named else text[-4000:]}")
    assert code != 0
    assert named, text[-4000:]
    ckpt = out / "calibrl" / "checkpoints"
    assert named["ckpt"] == str(ckpt / "global_step_1")
    # the worker named is one of the run's, and Ray's account names an actor that lived on node 1 (which rank or
    # replica landed there is Ray's placement)
    assert ROLES.fullmatch(named["role"]), named["role"]
    on_node_1 = {a["id"] for a in actor_nodes() if a["node"] == node_1}
    assert on_node_1 & set(re.findall(r"\b[0-9a-f]{32}\b", named["cause"])), (named["cause"], on_node_1)
    assert checkpoints.check_resume(ckpt, ["model", "optimizer", "extra"]) == ckpt / "global_step_1"

    subprocess.run(worker_start_command(temp_dir, PORTS[2]), env=env, check=True, timeout=180)
    deadline = time.time() + 60
    while len(alive_nodes()) < 2 and time.time() < deadline:
        time.sleep(1)
    proc, metrics, log = _start(out, 4, "trainer.save_freq=1", "trainer.resume_mode=auto", log_name="resume.log")
    assert _end(proc, log, RUN_TIMEOUT, "the resumed run") == 0, log.read_text()[-4000:]
    text = (out / "calibrl" / "metrics.log").read_text()  # both launches' output, appended
    assert f"[calibrl] resuming from {ckpt / 'global_step_1'}" in text, text[-4000:]
    assert launch.logged_steps(metrics) == [1, 2, 3, 4]
