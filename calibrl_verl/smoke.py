"""The tiny end-to-end run: CalibRL's real recipe on a tiny Qwen2.5-VL, and the checks a smoke test makes of it.

    python -m calibrl_verl.smoke run --out outputs/tiny_cpu [--steps 3] [--loss-mode calibrl] [hydra overrides]
        [--family qwen3_vl]   (the tiny Qwen3-VL instead of the tiny Qwen2.5-VL)
        [--family text]       (the tiny text-only Qwen2 on the text task: calibrl_verl.tiny.text_task)
        [--family wall]       (the coverage study's navigation task and model: calibrl_verl.tiny.wall_task)
    python -m calibrl_verl.smoke check outputs/tiny_cpu/calibrl/metrics.jsonl --steps 3 --loss-mode calibrl \
        [--dump-dir outputs/tiny_cpu/calibrl/dump [the run's hydra overrides]]

``run`` builds the tiny model and data if missing (``calibrl_verl.tiny``), launches
``python -m calibrl_verl.main_calibrl`` (verl's real trainer: Ray, TransferQueue, FSDP2 engine worker, agent
loop, verl's vLLM rollout server and weight sync, reward loop) with verl's file logger and a timeout, and draws
the curves. ``--device cpu`` (default) adds the CPU backend (``calibrl_verl.cpu``: vLLM's CPU build, gloo);
``--device gpu`` runs the same recipe on one GPU (``recipes/gpu_smoke.sh``): the launcher and the checks are the
same, only the overrides differ. ``run`` dumps every step (``calibrl.dump_dir``, default ``<out>/<loss mode>/dump``).
``check`` reads the metrics (and with ``--dump-dir`` recomputes every step from its dump: ``dump_check``) and
prints one PASS/FAIL line per property; it exits non-zero on any FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrl_verl import dump_check, tiny

N_ONPOLICY = 4
PROMPTS_PER_STEP = 4
# A launch that runs longer is killed with its Ray cluster: a failed weight sync into vLLM hangs instead of failing
# (VLLM_ON_CPU.md), so no launch may wait forever. The tiny recipe takes 2-3 minutes on 2 cores.
DEFAULT_TIMEOUT_S = 1200
# vLLM starts from random (dummy) weights: rollout and actor probabilities agree only if weight sync worked
# (measured on CPU, fp32: mean |p_rollout - p_actor| 1e-4 to 2e-4; random weights give ~0.5)
MAX_ROLLOUT_PROB_DIFF = 0.02


def recipe_overrides(assets: Path, run_dir: Path, steps: int, loss_mode: str, device: str,
                     save_freq: int | None = None, family: str = "qwen2_5_vl") -> list[str]:
    """The tiny recipe: 4 prompts x (4 samples + 1 expert), short responses, checkpoints in ``run_dir``.

    A checkpoint is saved every ``save_freq`` steps (default: at the last step only). ``family="text"`` or
    ``"wall"``: the text-only model (no processor) on that task's rows, which have no images.
    """
    text = family in ("text", "wall")
    args = [
        f"data.train_files={tiny.train_files(assets)}", f"data.val_files={tiny.val_files(assets)}",
        "data.image_key=images", f"data.train_batch_size={PROMPTS_PER_STEP}", "data.max_prompt_length=512",
        "data.max_response_length=48", "data.shuffle=false",
        f"actor_rollout_ref.model.path={tiny.text_model_dir(assets) if text else tiny.model_dir(assets)}",
        f"calibrl.n_onpolicy={N_ONPOLICY}", "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={PROMPTS_PER_STEP}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.optim.lr=5e-4", "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0",
        f"calibrl.loss_mode={loss_mode}",
        "trainer.logger=[console,file]", "trainer.project_name=calibrl_tiny",
        f"trainer.experiment_name={run_dir.name}", f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        f"trainer.total_training_steps={steps}", f"trainer.save_freq={save_freq or steps}",
        "trainer.max_actor_ckpt_to_keep=1", "trainer.test_freq=-1", "trainer.val_before_train=false",
        "trainer.resume_mode=auto",
        # reproducible sampling (and resume equality): a vLLM seed per request from what the request is
        "calibrl.seeded_rollouts=true",
    ]
    if family == "qwen3_vl":  # its 16-px patches (tiny/qwen3_vl.py PATCH), as recipes/models/qwen3vl_*.yaml set
        args.append("data.image_patch_size=16")
    if device == "gpu":
        args += ["actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
                 "trainer.n_gpus_per_node=1", "trainer.nnodes=1"]
    return args


TAG_ENV = "CALIBRL_LAUNCH_TAG"


@dataclass
class Launch:
    """A running ``main_calibrl`` process: its metrics/log paths and the tag every process of its Ray cluster
    inherits in its environment (``kill`` finds them by it)."""

    proc: subprocess.Popen
    metrics: Path
    log_path: Path
    tag: str
    log_file: Any

    def wait(self, timeout: int | None = None) -> Path:
        """Wait for the exit; returns the metrics path. Raises on a non-zero exit, quoting the end of the log."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self.log_file.close()
        kill_tagged(self.tag)  # stragglers of a finished run (a vLLM engine process outliving its server, say)
        if code != 0:
            raise RuntimeError(f"training exited {code}; last lines of {self.log_path}:\n"
                               f"{self.log_path.read_text()[-4000:]}")
        return self.metrics

    def kill(self) -> int:
        """SIGKILL the launch and every process of its Ray cluster (a pre-emption); returns how many died.

        Ray's raylet and workers are not children of one process group, but all inherit the driver's
        environment, so they are found by ``TAG_ENV`` in ``/proc/<pid>/environ`` (Linux).
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.proc.pid, signal.SIGKILL)
        killed = 1 + kill_tagged(self.tag)
        self.proc.wait()
        return killed


def kill_tagged(tag: str, rounds: int = 50, pause_s: float = 0.1) -> int:
    """SIGKILL every process whose environment holds ``TAG_ENV=tag``; returns how many were signalled.

    Repeats until none is left (at most ``rounds`` times): a process can be forked between the scan of /proc
    and the kills (Ray starting a worker, vLLM spawning its engine core), and would otherwise escape.
    """
    killed: set[int] = set()
    for _ in range(rounds):
        pids = [pid for pid in tagged_pids(tag) if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        time.sleep(pause_s)
    return len(killed)


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment holds ``TAG_ENV=tag``."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
    return found


def start(run_dir: Path, overrides: list[str], device: str, name: str = "metrics") -> Launch:
    """Start ``python -m calibrl_verl.main_calibrl`` with ``overrides``, logging into ``run_dir``.

    Writes ``run_dir/<name>.jsonl`` (verl's file logger, made resume-safe by ``integration.tracking``: a fresh run
    starts the file, a resumed one keeps the steps up to its checkpoint and appends) and ``run_dir/<name>.log``.
    """
    metrics = run_dir / f"{name}.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{run_dir.name}-{name}-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "VERL_FILE_LOGGER_PATH": str(metrics), "PYTHONUNBUFFERED": "1", TAG_ENV: tag}
    cmd = [sys.executable, "-m", "calibrl_verl.main_calibrl", *overrides]
    if device == "cpu":
        from calibrl_verl.cpu import cpu_env, cpu_overrides

        env.update(cpu_env())
        # the CPU backend's placement keys go first, so ``overrides`` can still change any of them
        cmd[3:3] = cpu_overrides()
    log_path = run_dir / f"{name}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed by Launch.wait
    proc = subprocess.Popen(cmd, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT)
    return Launch(proc, metrics, log_path, tag, log)


def launch(run_dir: Path, overrides: list[str], device: str, name: str = "metrics",
           timeout: int | None = DEFAULT_TIMEOUT_S) -> Path:
    """``start`` and wait: one whole launch; returns the metrics JSONL path, raises on a non-zero exit."""
    return start(run_dir, overrides, device, name).wait(timeout)


def ensure_assets(assets: Path, **build_kwargs: int | str) -> Path:
    """Build the tiny model and data into ``assets`` unless a finished build is already there."""
    if not (assets / "build_info.json").exists():
        args = [f"--{key.replace('_', '-')}={value}" for key, value in build_kwargs.items()]
        subprocess.run([sys.executable, "-m", "calibrl_verl.tiny.build", "--out", str(assets), *args], check=True)
    return assets


def run(out: Path, steps: int, loss_mode: str, device: str, extra: list[str],
        timeout: int | None = DEFAULT_TIMEOUT_S, name: str = "metrics", family: str = "qwen2_5_vl") -> Path:
    """Build assets if needed, train, plot; returns the metrics JSONL path. Raises on a non-zero exit.

    Checkpoints go to ``out/<loss_mode>/checkpoints`` and verl resumes from the latest one there
    (``trainer.resume_mode=auto``); ``name`` names this launch's metrics/log files (a launch that resumes into the
    same name keeps the earlier steps, ``integration.tracking``). ``family`` picks the tiny model
    (``python -m calibrl_verl.tiny.build --family``); a non-default family builds into ``out/assets_<family>``.
    """
    out = out.resolve()
    if family == "qwen2_5_vl":
        assets = ensure_assets(out / "assets")
    else:
        assets = ensure_assets(out / f"assets_{family}", family=family)
    run_dir = out / loss_mode
    overrides = recipe_overrides(assets, run_dir, steps, loss_mode, device, family=family) + extra
    metrics = launch(run_dir, overrides, device, name=name, timeout=timeout)
    from calibrl_verl.plots import main as plot

    plot([str(metrics), "--out", str(run_dir / "curves.png")])
    return metrics


def read_steps(path: Path) -> list[dict]:
    """The per-step metric dicts of a verl file-logger JSONL (training steps only, in order)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["data"] for r in sorted(rows, key=lambda r: r["step"]) if "training/global_step" in r["data"]
            or "actor/pg_loss" in r["data"]]


def check(path: Path, steps: int, loss_mode: str, every_group_guided: bool = True, dump_dir: Path | None = None,
          overrides: Sequence[str] = ()) -> list[tuple[bool, str]]:
    """The smoke properties, each (ok, description). ``every_group_guided=False`` for a run whose mixing policy
    leaves some groups without their expert (``calibrl.mix_policy=random|pass_rate``).

    With ``dump_dir`` (the launch's ``calibrl.dump_dir``) every logged step is also recomputed from its dump
    (``dump_check``: which groups use their expert, advantages, expert baseline, the tokens the update counts, and
    the logged guide / expert-token loss); ``overrides`` are the launch's Hydra overrides, which give the settings
    that recomputation needs. LUFFY / RL-PLUS need the dump: their expert-token loss is checked only that way.
    """
    data = read_steps(path)
    results = [(len(data) == steps, f"{len(data)} training steps logged (expected {steps})")]
    last = data[-1] if data else {}
    grad = [d.get("actor/grad_norm", float("nan")) for d in data]
    results.append((all(math.isfinite(g) for g in grad) and any(g > 0 for g in grad),
                    f"grad norm finite and non-zero: {grad}"))
    diff = [d.get("training/rollout_probs_diff_mean", float("nan")) for d in data]
    results.append((all(0 <= v < MAX_ROLLOUT_PROB_DIFF for v in diff),
                    f"rollout weights synced (mean |p_rollout - p_actor| < {MAX_ROLLOUT_PROB_DIFF}): {diff}"))
    if loss_mode == "grpo":
        results.append((all("calibrl/guide_loss" not in d for d in data), "no guide loss in the GRPO baseline"))
        return results
    fractions = [d.get("calibrl/expert_groups_frac", float("nan")) for d in data]
    results += [(all(f == 1.0 for f in fractions) if every_group_guided else all(0.0 <= f <= 1.0 for f in fractions),
                 f"groups using their expert, every step: {fractions}"),
                ("calibrl/expert_reward_mean" in last,
                 f"expert reward logged: {last.get('calibrl/expert_reward_mean')}")]
    if dump_dir is not None:
        settings = dump_check.RunSettings.from_overrides([f"calibrl.loss_mode={loss_mode}", *overrides])
        results += dump_check.check_run(Path(dump_dir), data, settings)
    if loss_mode in ("luffy", "rlplus"):
        shaped = [d.get(f"calibrl/{loss_mode}_expert_loss", float("nan")) for d in data]
        results.append((all(math.isfinite(v) for v in shaped) and any(v != 0 for v in shaped),
                        f"expert tokens trained off-policy, loss finite and non-zero: {shaped}"))
        if dump_dir is None:  # a sign flip or a wrong denominator would pass the line above
            results.append((False, "no step dump (calibrl.dump_dir) to recompute the expert-token loss from"))
        return results
    guide = [d.get("calibrl/guide_loss", float("nan")) for d in data]
    gate = [d.get("calibrl/gate_full_frac", float("nan")) for d in data]
    results += [
        (all(math.isfinite(g) for g in guide) and any(g != 0 for g in guide), f"guide loss finite, non-zero: {guide}"),
        (all(0.0 < g < 1.0 for g in gate), f"gate fraction inside (0, 1): {gate}"),
        (all(d.get("calibrl/update_rows", 0) == PROMPTS_PER_STEP * N_ONPOLICY for d in data),
         f"expert rows excluded from the update: {[d.get('calibrl/update_rows') for d in data]} rows "
         f"(= {PROMPTS_PER_STEP} prompts x {N_ONPOLICY} samples)"),
    ]
    return results


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, default=Path("outputs/tiny_cpu"))
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--loss-mode", default="calibrl", choices=["calibrl", "grpo", "luffy", "rlplus"])
    r.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    r.add_argument("--family", default="qwen2_5_vl", choices=list(tiny.FAMILIES),
                   help="the tiny model (calibrl_verl.tiny.build --family)")
    c = sub.add_parser("check")
    c.add_argument("metrics", type=Path)
    c.add_argument("--steps", type=int, required=True)
    c.add_argument("--loss-mode", default="calibrl")
    c.add_argument("--dump-dir", type=Path, default=None,
                   help="the run's calibrl.dump_dir: recompute every step from it (pass the run's overrides too)")
    args, extra = parser.parse_known_args(argv)
    if args.cmd == "run":
        if not any(item.lstrip("+").startswith("calibrl.dump_dir=") for item in extra):
            extra.append(f"calibrl.dump_dir={args.out.resolve() / args.loss_mode / 'dump'}")
        metrics = run(args.out, args.steps, args.loss_mode, args.device, extra, family=args.family)
        print(f"metrics: {metrics}\ncurves:  {metrics.parent / 'curves.png'}")
        dump = next(item.partition("=")[2] for item in extra if item.lstrip("+").startswith("calibrl.dump_dir="))
        args = argparse.Namespace(metrics=metrics, steps=args.steps, loss_mode=args.loss_mode, dump_dir=Path(dump))
    results = check(args.metrics, args.steps, args.loss_mode, dump_dir=args.dump_dir, overrides=extra)
    for ok, text in results:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(_main())
