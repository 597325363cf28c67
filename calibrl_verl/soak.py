"""Soak run: the tiny CalibRL recipe for many steps, a checkpoint every K, resident memory at every step.

    python -m calibrl_verl.soak --steps 200 --save-freq 20 --out outputs/soak
    python -m calibrl_verl.soak --report outputs/soak      # the analysis of a finished (or killed) run again

One launch of the tiny recipe (``calibrl_verl.launch``, the configuration of ``recipes/run_calibrl_tiny_cpu.sh``:
verl's real trainer, FSDP2 actor, verl's vLLM rollout on vLLM's CPU build with weight sync, 4 prompts x (4 + 1
expert) per step) for ``--steps`` steps, fresh (``trainer.resume_mode=disable``), saving every ``--save-freq``
steps and keeping every checkpoint (``trainer.max_actor_ckpt_to_keep=null``).

Memory: a thread watches the launch's metrics JSONL (verl's file logger writes one line at the end of each
training step, after that step's checkpoint) and, as soon as a step's line appears, reads the RSS of every
process of the launch (``calibrl_verl.rss``: found by the launch's tag, classed by title as
``benchmarks/bench_step.py`` does): driver = the launch's own process + verl's TaskRunner (the training loop),
actor = the FSDP WorkerDict, rollout = the vLLM HTTP server + its engine core, rest = Ray's daemons,
TransferQueue, agent-loop and reward workers; total = all of them. Between steps it samples every
``--interval`` s for the peak within the step. Rows go to ``rss.csv`` (one per step) and
``rss_processes.jsonl`` (each process at each step) as they come, so a killed run keeps its rows.

Growth: per group, a least-squares line of end-of-step RSS (MB = 2**20 bytes) on the step number over the steps
after ``--warmup`` (vLLM's and the allocator's first steps). Reported: the slope (MB/step), the noise (residual
standard deviation, n - 2 degrees of freedom), the drift the line predicts over the fitted window
(slope x (last step - first step)) and t = slope / its standard error; the same for the later half of the fitted
steps ("late"). The whole window's line grows when its drift is more than 3 x its noise and more than 1 MB AND
t > 3 (the drift stands out of the step-to-step scatter and of page granularity, and the slope is not a chance
tilt of it). A group GROWS when that line grows and the late slope is still above chance (late t > 3: it keeps
rising to the end, as a leak does); "flat (settled)" when the line grows but the late slope is not (memory still
settling after the warm-up, level by the end); otherwise "flat". No verdict from fewer than 10 fitted steps.
The verdict covers driver, actor and rollout; rest and total are shown.

Checkpoints: every ``global_step_N`` expected (each multiple of K, and the last step) must be complete by
``calibrl_verl.integration.checkpoints`` (actor shards, ``fsdp_config.json``, ``data.pt``; and the tracker
names the last one, as ``check_resume`` reads it), and load: the model and optimizer shards and ``data.pt`` with
``torch.load(weights_only=True)``, the extra state (scheduler, RNG) the same way with numpy's array types
allowed, and the model state into the architecture of the checkpoint's ``huggingface/config.json`` with every
key matched (tied weights aside) and every value finite. Each checkpoint's weights must differ from the
previous one's (training moved them).

Writes ``summary.json`` and ``report.txt`` (one screen, also printed) into ``--out``; the launch's metrics,
log and checkpoints are in ``<out>/run``. Exits 0 on PASS; 1 (FAIL) when the run failed, a judged group grows, or
a checkpoint fails; 2 (NOT JUDGED) when all else passed but fewer than 10 steps were fitted.
Needs about 13.5 GB of RAM (docs/benchmarks.md); run nothing heavy beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from calibrl_verl import launch, rss

GROUPS = ("driver", "actor", "rollout", "rest", "total")
VERDICT_GROUPS = ("driver", "actor", "rollout")
NOISE_SIGMAS = 3.0
MIN_T = 3.0
MIN_DRIFT_MB = 1.0  # below this over the whole window, a few pages: not resolvable by a run of this length
MIN_POINTS = 10  # fewer fitted steps give no verdict (t > 3 is a 10% chance with 2 degrees of freedom)
SAVE_CONTENTS = ("model", "optimizer", "extra")  # verl's default actor.checkpoint.save_contents
CSV_FIELDS = ["step", "t_s", "step_s"] + [f"{g}_{k}" for g in GROUPS for k in ("mb", "peak_mb", "procs")]


# ----------------------------------------------------------------------------------------------------------
# Growth: least-squares slope, noise, verdict
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Fit:
    n: int
    first_step: float
    last_step: float
    slope: float  # MB per step
    intercept: float
    resid_std: float  # MB, n - 2 degrees of freedom
    slope_se: float
    drift: float  # slope x (last step - first step), MB

    @property
    def t(self) -> float:
        if self.slope_se > 0:
            return self.slope / self.slope_se
        return math.copysign(math.inf, self.slope) if self.slope else 0.0


def fit_line(xs: list[float], ys: list[float]) -> Fit:
    """Ordinary least squares y = intercept + slope * x; needs 3 points or more (2 for the line, 1 for noise)."""
    n = len(xs)
    if n != len(ys) or n < 3:
        raise ValueError(f"a line with its noise needs 3 points or more, got {n}")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all points at one step")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ssr = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    resid_std = math.sqrt(ssr / (n - 2))
    return Fit(n, min(xs), max(xs), slope, intercept, resid_std, resid_std / math.sqrt(sxx),
               slope * (max(xs) - min(xs)))


def grows(fit: Fit, sigmas: float = NOISE_SIGMAS, min_t: float = MIN_T, min_drift: float = MIN_DRIFT_MB) -> bool:
    """Growth beyond noise: the drift over the window is above ``sigmas`` x the residual std and above
    ``min_drift`` MB, and t > ``min_t``."""
    return fit.drift > max(sigmas * fit.resid_std, min_drift) and fit.t > min_t


def fit_groups(rows: list[dict[str, Any]], warmup: int, min_points: int = MIN_POINTS) -> dict[str, dict[str, Any]]:
    """Per group: the fit of end-of-step RSS over the steps after ``warmup`` and over the later half of them, the
    verdict (None with fewer than ``min_points`` fitted steps), first/last/peak MB.

    A group grows when the whole window's line grows (``grows``) and the later half's slope is still above chance
    (t > ``MIN_T``): a leak keeps rising to the end, while memory still settling after the warm-up rises early and
    then stays level ("settled": no slope left in the later half)."""
    kept = [r for r in rows if r["step"] > warmup]
    out: dict[str, dict[str, Any]] = {}
    for g in GROUPS:
        pts = [(float(r["step"]), float(r[f"{g}_mb"])) for r in kept if r.get(f"{g}_mb") not in (None, "")]
        entry: dict[str, Any] = {"points": len(pts)}
        if pts:
            entry.update(first_mb=pts[0][1], last_mb=pts[-1][1], mean_mb=statistics.fmean(y for _, y in pts),
                         peak_mb=max(float(r[f"{g}_peak_mb"]) for r in kept),
                         procs=sorted({int(r[f"{g}_procs"]) for r in kept}))
        late_pts = pts[len(pts) // 2:]
        try:
            fit = fit_line([x for x, _ in pts], [y for _, y in pts])
        except ValueError as exc:
            entry.update(fit=None, late_fit=None, grows=None, settled=None, why=str(exc))
            out[g] = entry
            continue
        late = fit_line([x for x, _ in late_pts], [y for _, y in late_pts]) if len(late_pts) >= 3 else None
        entry.update(fit={**asdict(fit), "t": fit.t}, late_fit=late and {**asdict(late), "t": late.t})
        if len(pts) < min_points:
            entry.update(grows=None, settled=None, why=f"{len(pts)} fitted steps, a verdict needs {min_points}")
        else:
            still = late is None or late.t > MIN_T
            entry.update(grows=grows(fit) and still, settled=grows(fit) and not still)
        out[g] = entry
    return out


def process_slopes(per_step: list[dict[str, Any]], warmup: int, top: int = 5) -> list[dict[str, Any]]:
    """The processes alive at every fitted step with the steepest RSS slopes (which process a growth is in)."""
    kept = [r for r in per_step if r["step"] > warmup]
    series: dict[int, list[tuple[float, float, str, str]]] = {}
    for r in kept:
        for pid, role, title, mb in r["processes"]:
            series.setdefault(pid, []).append((float(r["step"]), mb, role, title))
    found = []
    for pid, pts in series.items():
        if len(pts) != len(kept) or len(pts) < 3:
            continue
        try:
            fit = fit_line([p[0] for p in pts], [p[1] for p in pts])
        except ValueError:
            continue
        found.append({"pid": pid, "role": pts[-1][2], "title": short_title(pts[-1][3], 60), "slope": fit.slope,
                      "resid_std": fit.resid_std, "last_mb": pts[-1][1], "grows": grows(fit)})
    return sorted(found, key=lambda p: -p["slope"])[:top]


# ----------------------------------------------------------------------------------------------------------
# Sampling: RSS per group at the end of every training step
# ----------------------------------------------------------------------------------------------------------
def step_lines(chunk: bytes) -> list[tuple[int, float | None]]:
    """(step, seconds) of each training-step record among complete file-logger lines."""
    found = []
    for line in chunk.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        data = record.get("data", {})
        if "training/global_step" in data or "actor/pg_loss" in data:
            found.append((int(record["step"]), data.get("timing_s/step")))
    return found


class StepSampler(threading.Thread):
    """Reads the launch's RSS per group when a new step appears in its metrics JSONL; samples every ``interval``
    s between steps for the peak. Rows are appended to ``csv_path`` and ``proc_path`` as they come."""

    def __init__(self, tag: str, driver_pid: int, metrics: Path, csv_path: Path, proc_path: Path,
                 interval: float = 1.0, poll: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.table, self.driver_pid, self.metrics = rss.ProcessTable(tag), driver_pid, metrics
        self.csv_path, self.proc_path, self.interval, self.poll = csv_path, proc_path, interval, poll
        self.rows: list[dict[str, Any]] = []
        self._offset = 0
        self._peak: dict[str, int] = {}
        self._start = time.monotonic()
        self._done = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            last = 0.0
            while not self._done.wait(self.poll):
                new = self._new_steps()
                if new or time.monotonic() - last >= self.interval:
                    last = time.monotonic()
                    snap = self._snapshot()
                    if new:
                        self._record(new[-1], snap)
        except Exception as exc:  # a sampler fault must not hang the run; reported in the summary
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self._done.set()
        self.join()
        new = self._new_steps() if self.error is None else []
        if new:  # logged in the last poll period: the processes may be gone already
            snap = self._snapshot()
            if snap[0]:
                self._record(new[-1], snap)

    def _new_steps(self) -> list[tuple[int, float | None]]:
        try:
            with open(self.metrics, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        return step_lines(chunk[: end + 1])

    def _snapshot(self) -> tuple[dict, dict[int, str], dict[str, int]]:
        info = self.table.read()
        roles = rss.classify(info, rss.SOAK_ROLES, pinned={self.driver_pid: "driver"})
        sums = rss.sums(info, roles)
        for g in GROUPS:
            self._peak[g] = max(self._peak.get(g, 0), sums.get(g, 0))
        return info, roles, sums

    def _record(self, step: tuple[int, float | None], snap: tuple[dict, dict[int, str], dict[str, int]]) -> None:
        info, roles, sums = snap
        row: dict[str, Any] = {"step": step[0], "t_s": round(time.monotonic() - self._start, 2),
                               "step_s": "" if step[1] is None else round(step[1], 3)}
        for g in GROUPS:
            row[f"{g}_mb"] = round(sums.get(g, 0) / rss.MB, 2)
            row[f"{g}_peak_mb"] = round(self._peak.get(g, 0) / rss.MB, 2)
            row[f"{g}_procs"] = len(roles) if g == "total" else sum(r == g for r in roles.values())
        self._peak = {}
        self.rows.append(row)
        new_file = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        procs = [[pid, roles[pid], info[pid][1][:100], round(info[pid][2] / rss.MB, 2)] for pid in sorted(info)]
        with open(self.proc_path, "a") as f:
            f.write(json.dumps({"step": step[0], "processes": procs}) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: complete and loadable
# ----------------------------------------------------------------------------------------------------------
def expected_steps(steps: int, save_freq: int) -> list[int]:
    """The steps verl saves at: every multiple of ``save_freq``, and the last step."""
    return sorted({s for s in range(save_freq, steps + 1, save_freq)} | {steps})


def _merge_shards(values: list[Any]) -> Any:
    """One full tensor from the per-rank DTensor shards of one parameter (FSDP2 shards along one dim)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(values[0], DTensor):
        return values[0]
    if len(values) == 1:
        return values[0].to_local()
    shard = next((p for p in values[0].placements if isinstance(p, Shard)), None)
    if shard is None:
        return values[0].to_local()
    import torch

    return torch.cat([v.to_local() for v in values], dim=shard.dim)


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load one checkpoint's files with torch (weights_only) and its model state into its HF architecture.
    Returns (record, model state) ; the record names any failure in ``errors``."""
    import numpy as np
    import torch
    import torch.distributed.tensor  # noqa: F401 - registers DTensor for weights_only loads of FSDP2 shards
    import transformers

    # "pickling/unpickling of the DeviceMesh occurred before the PGs were created": expected, no process group here
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)
    actor = folder / "actor"
    errors: list[str] = []
    world = int(json.loads((actor / "fsdp_config.json").read_text())["world_size"])

    def load(path: Path, allow: tuple = ()) -> Any:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)

    shards = [load(actor / f"model_world_size_{world}_rank_{r}.pt") for r in range(world)]
    state = {k: _merge_shards([s[k] for s in shards]) for k in shards[0]}
    optim = [load(actor / f"optim_world_size_{world}_rank_{r}.pt") for r in range(world)]
    numpy_types = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType)
    extra = [load(actor / f"extra_state_world_size_{world}_rank_{r}.pt", numpy_types) for r in range(world)]
    data = load(folder / "data.pt")
    if not all(isinstance(o, dict) and "state" in o for o in optim):
        errors.append("optimizer shard without its state")
    if not all(isinstance(e, dict) and "rng" in e for e in extra):
        errors.append("extra state without the RNG state")
    if not isinstance(data, dict):
        errors.append("data.pt is not the data loader's state dict")
    config = transformers.AutoConfig.from_pretrained(actor / "huggingface")
    arch = config.architectures[0]
    with torch.device("meta"):  # only the parameter names and shapes: load_state_dict(assign=True) fills them
        model = getattr(transformers, arch)(config)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        errors.append(f"model state does not match {arch}: missing {missing[:5]}, unexpected "
                      f"{result.unexpected_keys[:5]}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        errors.append(f"non-finite values in {bad[:5]}")
    record = {"architecture": arch, "tensors": len(state), "params": sum(v.numel() for v in state.values()),
              "world_size": world, "errors": errors}
    return record, state


def check_checkpoints(root: Path, steps: int, save_freq: int) -> dict[str, Any]:
    """Every expected checkpoint complete (``integration.checkpoints``) and loadable; the tracker names the last."""
    from calibrl_verl.integration import checkpoints

    want = expected_steps(steps, save_freq)
    complete = [int(p.name.removeprefix("global_step_")) for p in checkpoints.complete_checkpoints(root, SAVE_CONTENTS)]
    try:
        tracked = checkpoints.check_resume(root, SAVE_CONTENTS)
        tracker = tracked.name if tracked else None
    except checkpoints.CheckpointError as exc:
        tracker = f"error: {exc}"
    records, previous = [], None
    for step in want:
        folder = root / f"global_step_{step}"
        rec: dict[str, Any] = {"step": step, "missing": checkpoints.missing_files(folder, SAVE_CONTENTS)}
        if not rec["missing"]:
            try:
                loaded, state = load_checkpoint(folder)
            except Exception as exc:  # reported per checkpoint: one unreadable file must not hide the others
                rec["errors"] = [f"{type(exc).__name__}: {str(exc)[:300]}"]
                state = None
            else:
                rec.update(loaded)
                common = [k for k in state if k in (previous or {}) and state[k].is_floating_point()
                          and state[k].shape == previous[k].shape]
                if common:
                    rec["moved_from_previous"] = max(float((state[k].float() - previous[k].float()).abs().max())
                                                     for k in common)
                    if rec["moved_from_previous"] == 0:
                        rec["errors"].append("weights identical to the previous checkpoint's")
                previous = state
        rec["ok"] = not rec["missing"] and not rec.get("errors")
        records.append(rec)
    last = f"global_step_{want[-1]}"
    return {"expected": want, "complete_on_disk": complete, "tracker": tracker, "tracker_ok": tracker == last,
            "checkpoints": records, "ok": all(r["ok"] for r in records) and tracker == last
            and complete == want}


# ----------------------------------------------------------------------------------------------------------
# The run and its report
# ----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """The launch, sampled; returns the run record (wall time, steps logged, error)."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    for old in (run_dir, out / "rss.csv", out / "rss_processes.jsonl", out / "summary.json", out / "report.txt"):
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    assets = launch.ensure_assets((args.assets or out / "assets").resolve())
    overrides = launch.recipe_overrides(assets, run_dir, args.steps, args.loss_mode, "cpu", save_freq=args.save_freq)
    overrides += ["trainer.resume_mode=disable", "trainer.max_actor_ckpt_to_keep=null", *extra]
    start = time.time()
    job = launch.start(run_dir, overrides, "cpu")
    sampler = StepSampler(job.tag, job.proc.pid, job.metrics, out / "rss.csv", out / "rss_processes.jsonl",
                          interval=args.interval)
    error = job.supervise(args.timeout, sampler)
    logged = [s for s, _ in step_lines(job.metrics.read_bytes())] if job.metrics.exists() else []
    return {"steps": args.steps, "save_freq": args.save_freq, "loss_mode": args.loss_mode, "overrides": overrides,
            "wall_s": round(time.time() - start, 1), "steps_logged": len(logged), "error": error,
            "sampler_error": sampler.error, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def read_rows(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = []
    with open(out / "rss.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else "") for k, v in r.items()} | {"step": int(r["step"])})
    per_step = [json.loads(line) for line in (out / "rss_processes.jsonl").read_text().splitlines() if line.strip()]
    return rows, per_step


def summarize(out: Path, run_record: dict[str, Any], warmup: int | None) -> dict[str, Any]:
    steps, save_freq = run_record["steps"], run_record["save_freq"]
    warmup = default_warmup(steps) if warmup is None else warmup
    rows, per_step = read_rows(out) if (out / "rss.csv").exists() else ([], [])
    groups = fit_groups(rows, warmup)
    ckpt = check_checkpoints(out / "run" / "checkpoints", steps, save_freq)
    step_s = [float(r["step_s"]) for r in rows if r["step"] > warmup and r["step_s"] != ""]
    metrics = out / "run" / "metrics.jsonl"
    saves = [d["timing_s/save_checkpoint"] for d in launch.read_steps(metrics)
             if "timing_s/save_checkpoint" in d] if metrics.exists() else []
    run_ok = run_record["error"] is None and run_record["steps_logged"] == steps and len(rows) > 0
    judged = [groups[g]["grows"] for g in VERDICT_GROUPS]
    memory = "GROWS" if any(judged) else "flat" if all(v is False for v in judged) else "not judged"
    verdict = ("PASS" if run_ok and ckpt["ok"] and memory == "flat" else
               "NOT JUDGED" if run_ok and ckpt["ok"] and memory == "not judged" else "FAIL")
    return {"run": run_record, "warmup": warmup, "rows": len(rows),
            "rule": f"grows when drift > max({NOISE_SIGMAS:g} x residual std, {MIN_DRIFT_MB:g} MB) and t > {MIN_T:g} "
                    f"over the fitted steps, and late t > {MIN_T:g} over their later half; judged from {MIN_POINTS} "
                    "fitted steps",
            "median_step_s": statistics.median(step_s) if step_s else None,
            "median_save_s": statistics.median(saves) if saves else None, "groups": groups,
            "steepest_processes": process_slopes(per_step, warmup), "checkpoints": ckpt,
            "verdict": verdict, "pass": verdict == "PASS", "run_ok": run_ok, "memory": memory}


def default_warmup(steps: int) -> int:
    return min(10, steps // 3)


def short_title(title: str, width: int = 40) -> str:
    """A process title with each absolute path cut to its last part (``/venv/ray/dashboard.py`` -> ``dashboard.py``)."""
    return " ".join(t.rsplit("/", 1)[-1] if t.startswith("/") else t for t in title.split())[:width]


def report(summary: dict[str, Any]) -> str:
    r, groups, ck = summary["run"], summary["groups"], summary["checkpoints"]
    med = summary["median_step_s"]
    lines = [
        f"soak: {r['steps_logged']}/{r['steps']} steps of the tiny {r['loss_mode']} recipe, checkpoint every "
        f"{r['save_freq']}, {r['wall_s']:.0f} s wall ({r['date']}); median step {med:.2f} s"
        + (f", median save {summary['median_save_s']:.2f} s" if summary.get("median_save_s") else "") if med else
        f"soak: {r['steps_logged']}/{r['steps']} steps, {r['wall_s']:.0f} s wall ({r['date']})",
        f"RSS (MB = 2^20 B) at the end of each step, {summary['rows']} rows; fitted: steps > {summary['warmup']} "
        f"(warm-up left out); {summary['rule']}",
    ]
    head = ["group", "procs", "first", "last", "peak", "slope MB/step", "noise MB", "drift MB", "t", "late slope",
            "late t", "verdict"]
    table = [head]
    for g in GROUPS:
        e = groups[g]
        f = e.get("fit")
        if not e["points"]:
            table.append([g] + ["-"] * 10 + ["no rows"])
            continue
        procs = "/".join(str(p) for p in e["procs"])
        if f is None:
            table.append([g, procs, f"{e['first_mb']:.0f}", f"{e['last_mb']:.0f}", f"{e['peak_mb']:.0f}"]
                         + ["-"] * 6 + ["too few steps"])
            continue
        verdict = {True: "GROWS", False: "flat", None: "not judged"}[e["grows"]]
        verdict += " (settled)" if e["settled"] else ""
        verdict += "" if g in VERDICT_GROUPS else " (shown)"
        late = e["late_fit"]
        table.append([g, procs, f"{e['first_mb']:.0f}", f"{e['last_mb']:.0f}", f"{e['peak_mb']:.0f}",
                      f"{f['slope']:+.3f}", f"{f['resid_std']:.2f}", f"{f['drift']:+.1f}", f"{f['t']:+.1f}",
                      f"{late['slope']:+.3f}" if late else "-", f"{late['t']:+.1f}" if late else "-", verdict])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
              for row in table]
    steep = summary["steepest_processes"][:3]
    if steep:
        lines.append("steepest processes: " + "; ".join(
            f"{p['role']} {p['title'][:40]!r} {p['slope']:+.3f} MB/step" for p in steep))
    lines.append(f"checkpoints: expected {ck['expected']}; complete on disk {ck['complete_on_disk']}; tracker "
                 f"{ck['tracker']}")
    for c in ck["checkpoints"]:
        if c["ok"]:
            moved = f", max |w - previous| {c['moved_from_previous']:.2e}" if "moved_from_previous" in c else ""
            lines.append(f"  global_step_{c['step']}: complete, loaded ({c['tensors']} tensors, {c['params']} "
                         f"params into {c['architecture']}, optimizer, extra state, data.pt){moved}")
        else:
            lines.append(f"  global_step_{c['step']}: FAIL missing {c['missing']} errors {c.get('errors')}")
    if r["error"] or r.get("sampler_error"):
        lines.append(f"run error: {(r['error'] or '').splitlines()[0] if r['error'] else ''} "
                     f"{r.get('sampler_error') or ''}".strip())
    why = next((groups[g]["why"] for g in VERDICT_GROUPS if groups[g].get("why")), "")
    memory = summary["memory"] + (f" ({why})" if summary["memory"] == "not judged" else "")
    lines.append(f"VERDICT: {summary['verdict']} (run {'ok' if summary['run_ok'] else 'FAILED'}; memory of "
                 f"{'/'.join(VERDICT_GROUPS)} {memory}; checkpoints {'all loadable' if ck['ok'] else 'FAIL'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--save-freq", type=int, default=20, help="a checkpoint every this many steps (all kept)")
    parser.add_argument("--out", type=Path, default=Path("outputs/soak"),
                        help="output folder; its run/, rss.csv, rss_processes.jsonl, summary.json and report.txt "
                             "are replaced")
    parser.add_argument("--assets", type=Path, default=None, help="a tiny build to reuse (default OUT/assets)")
    parser.add_argument("--loss-mode", default="calibrl", choices=["calibrl", "grpo", "luffy", "rlplus"])
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps left out of the fit (default min(10, steps // 3))")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between peak samples within a step")
    parser.add_argument("--timeout", type=int, default=None,
                        help="seconds before the launch is killed (default 900 + 20 x steps)")
    parser.add_argument("--report", type=Path, default=None, metavar="OUT",
                        help="no launch: analyse the run saved in OUT again (rss.csv, run/checkpoints)")
    args, extra = parser.parse_known_args(argv)
    if bad := [e for e in extra if "=" not in e or e.startswith("-")]:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (extra arguments are Hydra overrides key=value)")
    if args.report:
        out = args.report.resolve()
        run_record = json.loads((out / "summary.json").read_text())["run"]
    else:
        if args.steps < 1 or args.save_freq < 1:
            parser.error("--steps and --save-freq must be positive")
        args.timeout = args.timeout or 900 + 20 * args.steps
        out = args.out.resolve()
        run_record = run(args, extra)
        (out / "summary.json").write_text(json.dumps({"run": run_record}, indent=1))
    summary = summarize(out, run_record, args.warmup)
    text = report(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.txt").write_text(text + "\n")
    print(text)
    return {"PASS": 0, "FAIL": 1, "NOT JUDGED": 2}[summary["verdict"]]


if __name__ == "__main__":
    sys.exit(main())
