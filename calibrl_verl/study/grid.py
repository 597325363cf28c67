"""Run the toy study's grid (methods x seeds) with the real recipe on the CPU backend; resumable.

    python -m calibrl_verl.study.grid --out outputs/toy_study [--preset full|fast] [--jobs 1] [hydra overrides]

Every run is one ``python -m calibrl_verl.main_calibrl`` launch of the tiny recipe (``calibrl_verl.launch``:
verl's real trainer, agent loop, reward loop and checkpoints; the rollout is verl's vLLM server on vLLM's CPU build)
with the method's overrides and the seed in ``data.seed``, ``actor_rollout_ref.rollout.seed`` and
``calibrl.seed``. All methods start from the same weakly warm-started tiny model, so rewards vary from step 1.
Held-out accuracy is verl's own validation (greedy, the whole val split) every ``test_freq`` steps.

Layout under ``--out``::

    assets/                       tiny model + data (built once)
    data/train_weak_expert.parquet  the weak-expert variant of the train split
    runs/<method>/seed<k>/        launch<n>.jsonl / .log per launch, checkpoints/, attempts.json, done.json

Resuming: a run with ``done.json`` is skipped; an unfinished run resumes from its last verl checkpoint
(``trainer.resume_mode=auto``, a checkpoint every ``save_freq`` steps), and its launches' logs are merged by
step (``read_run``). So re-running the same command after an interruption finishes the grid, not restarts it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from calibrl_verl import launch, tiny
from calibrl_verl.progress import progress


@dataclass(frozen=True)
class Method:
    """One arm of the study: a loss mode, its overrides, and whether it trains on the weak-expert data."""

    name: str
    label: str
    loss_mode: str
    overrides: tuple[str, ...] = ()
    weak_expert: bool = False


ENTROPY_COEFF = 0.01
WEAK_EXPERT_WRONG_FRAC = 0.5
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("grpo", "GRPO", "grpo"),
    Method("grpo_entropy", f"GRPO + entropy bonus {ENTROPY_COEFF}", "grpo",
           (f"actor_rollout_ref.actor.entropy_coeff={ENTROPY_COEFF}",)),
    Method("calibrl_a0.3", "CalibRL alpha=0.3", "calibrl", ("calibrl.alpha=0.3",)),
    Method("calibrl_a0.5", "CalibRL alpha=0.5", "calibrl", ("calibrl.alpha=0.5",)),
    Method("calibrl_a0.8", "CalibRL alpha=0.8", "calibrl", ("calibrl.alpha=0.8",)),
    Method("calibrl_seqgap", "CalibRL sequence gap (paper eq. 9)", "calibrl", ("calibrl.gap=sequence",)),
    Method("calibrl_weak", "CalibRL, weak expert (half wrong)", "calibrl", weak_expert=True),
    Method("luffy", "LUFFY", "luffy"),
)}


@dataclass(frozen=True)
class StudyConfig:
    """The grid and its per-run schedule (steps of 4 prompts x 4 samples, +1 expert row for guided methods)."""

    steps: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    test_freq: int = 5
    save_freq: int = 10
    n_train: int = 128
    n_val: int = 48
    # one run at a time: a launch with verl's vLLM rollout on CPU peaks at ~13.5 GB, so two need > 27 GB
    jobs: int = 1
    timeout: int = 1800
    extra: tuple[str, ...] = field(default=())


PRESETS: dict[str, StudyConfig] = {
    "full": StudyConfig(),
    # the CI version: checks the pipeline end to end (runs, logs, plots, table), not the science
    "fast": StudyConfig(steps=2, seeds=(0,), methods=("grpo", "calibrl_a0.5"), test_freq=2, save_freq=2,
                        n_train=16, n_val=8),
}


def run_dir(out: Path, method: str, seed: int) -> Path:
    """Where one run's logs and checkpoints live."""
    return out / "runs" / method / f"seed{seed}"


def weak_expert_file(train: Path, dst: Path, wrong_frac: float = WEAK_EXPERT_WRONG_FRAC, seed: int = 0) -> Path:
    """A copy of the tiny train split where ``wrong_frac`` of the expert solutions give a wrong answer.

    The wrong solution is well formed (think + answer, same template) so only its correctness differs; the
    chosen rows are a seeded sample, so every seed and method sees the same weak expert.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(train)
    rows = table.to_pylist()
    rng = random.Random(f"weak-expert:{seed}")
    for index in rng.sample(range(len(rows)), round(wrong_frac * len(rows))):
        rows[index]["solution"] = wrong_solution(rows[index]["extra_info"]["kind"],
                                                 rows[index]["reward_model"]["ground_truth"], rng)
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), dst)
    return dst


def wrong_solution(kind: str, answer: str, rng: random.Random) -> str:
    """An expert CoT in the task's own template whose answer is not ``answer``."""
    from calibrl_verl.tiny.task import COLOURS, LETTERS

    if kind == "count":
        wrong = rng.choice([c for c in "1234" if c != answer])
        noun = "circle" if wrong == "1" else "circles"
        return f"<think>I count {wrong} {noun}.</think><answer>{wrong}</answer>"
    letter = rng.choice([ltr for ltr in LETTERS if ltr != answer])
    colour = list(COLOURS)[LETTERS.index(letter)]
    return f"<think>The square is {colour}, option {letter}.</think><answer>{letter}</answer>"


def run_overrides(out: Path, method: Method, seed: int, cfg: StudyConfig) -> list[str]:
    """The Hydra overrides of one run: the tiny recipe, then the study's schedule and seed, then the method."""
    assets = out / "assets"
    rdir = run_dir(out, method.name, seed)
    args = launch.recipe_overrides(assets, rdir, cfg.steps, method.loss_mode, "cpu", save_freq=cfg.save_freq)
    train = out / "data" / "train_weak_expert.parquet" if method.weak_expert else tiny.train_files(assets)
    args += [
        f"data.train_files={train}", "data.shuffle=true", f"data.seed={seed}",
        f"actor_rollout_ref.rollout.seed={seed}", f"calibrl.seed={seed}",
        f"trainer.experiment_name={method.name}_seed{seed}", "trainer.project_name=calibrl_toy_study",
        f"trainer.test_freq={cfg.test_freq}", "trainer.val_before_train=true", "trainer.resume_mode=auto",
    ]
    return args + list(method.overrides) + list(cfg.extra)


def _attempts(rdir: Path) -> list[dict[str, Any]]:
    path = rdir / "attempts.json"
    return json.loads(path.read_text()) if path.exists() else []


def run_one(out: Path, method: Method, seed: int, cfg: StudyConfig) -> dict[str, Any]:
    """Train one (method, seed) to ``cfg.steps`` unless already done; returns its ``done.json`` or a failure."""
    return resumable_launch(run_dir(out, method.name, seed), run_overrides(out, method, seed, cfg),
                            {"method": method.name, "seed": seed}, cfg.steps, cfg.timeout)


def resumable_launch(rdir: Path, overrides: list[str], key: dict[str, Any], steps: int,
                     timeout: int) -> dict[str, Any]:
    """One study run in ``rdir``: skipped when its ``done.json`` has ``steps``, else one more launch (verl resumes
    from the run's last checkpoint), recorded in ``attempts.json``. Returns ``done.json`` (``key`` plus steps,
    launches and seconds) or ``key`` with the failure's ``error``: one failed run must not stop a grid."""
    done = rdir / "done.json"
    label = " ".join(f"{k} {v}" for k, v in key.items())
    if done.exists() and json.loads(done.read_text())["steps"] == steps:
        return json.loads(done.read_text())
    attempts = _attempts(rdir)
    name = f"launch{len(attempts) + 1}"
    print(f"[study] {label}: {name} ({'resuming' if attempts else 'fresh'})", flush=True)
    t0 = time.time()
    error = None
    try:
        launch.launch(rdir, overrides, "cpu", name=name, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - recorded, and the grid goes on
        error = f"{type(err).__name__}: {str(err)[-2000:]}"
    attempts.append({"launch": name, "seconds": round(time.time() - t0, 1), "error": error})
    (rdir / "attempts.json").write_text(json.dumps(attempts, indent=2))
    if error is not None:
        print(f"[study] {label} FAILED ({rdir / name}.log): {error[:300]}", flush=True)
        return {**key, "error": error}
    record = {**key, "steps": steps, "launches": len(attempts),
              "seconds": round(sum(a["seconds"] for a in attempts), 1)}
    done.write_text(json.dumps(record, indent=2))
    print(f"[study] {label}: done in {attempts[-1]['seconds']:.0f} s", flush=True)
    return record


def read_run(rdir: Path) -> dict[int, dict[str, float]]:
    """The merged per-step metrics of a run: every launch's JSONL in launch order, a later launch's step wins."""
    steps: dict[int, dict[str, float]] = {}
    for path in sorted(rdir.glob("launch*.jsonl"), key=lambda p: int(p.stem.removeprefix("launch"))):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                steps.setdefault(int(record["step"]), {}).update(record["data"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a verl file-logger record ({err})") from err
    return dict(sorted(steps.items()))


def prepare(out: Path, cfg: StudyConfig) -> None:
    """Build the shared assets and the weak-expert data once; record the study's config next to the runs."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    launch.ensure_assets(out / "assets", n_train=cfg.n_train, n_val=cfg.n_val)
    if any(METHODS[m].weak_expert for m in cfg.methods):
        weak = out / "data" / "train_weak_expert.parquet"
        if not weak.exists():
            weak_expert_file(tiny.train_files(out / "assets"), weak)
    (out / "study.json").write_text(json.dumps(asdict(cfg), indent=2))


def run_grid(out: Path, cfg: StudyConfig) -> list[dict[str, Any]]:
    """Every (seed, method) of the grid, seed-major so a partial grid already has every method; ``cfg.jobs``
    launches at a time. Returns each run's record (failures included, they do not stop the grid)."""
    out = out.resolve()
    prepare(out, cfg)
    jobs = [(METHODS[m], seed) for seed in cfg.seeds for m in cfg.methods]
    t0 = time.time()
    # runs take minutes: a progress line (or a bar on a terminal) after each one, with the failures so far
    with ThreadPoolExecutor(max_workers=max(1, cfg.jobs)) as pool, \
            progress(total=len(jobs), desc="study", unit="run", every=1) as bar:
        futures = [pool.submit(run_one, out, method, seed, cfg) for method, seed in jobs]
        n_failed = 0
        for future in as_completed(futures):
            n_failed += "error" in future.result()
            bar.set_postfix(failed=n_failed)
            bar.update()
        records = [future.result() for future in futures]
    failed = [r for r in records if "error" in r]
    print(f"[study] {len(records) - len(failed)}/{len(records)} runs done, {len(failed)} failed, "
          f"this invocation took {time.time() - t0:.0f} s", flush=True)
    return records


def parse_args(argv: list[str] | None = None) -> tuple[Path, StudyConfig]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/toy_study"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", help=f"subset of {list(METHODS)}")
    parser.add_argument("--jobs", type=int, help="runs launched at once (each is a whole Ray cluster, ~13.5 GB on CPU)")
    args, extra = parser.parse_known_args(argv)
    cfg = PRESETS[args.preset]
    changes = {"steps": args.steps, "seeds": tuple(args.seeds or ()) or None,
               "methods": tuple(args.methods or ()) or None, "jobs": args.jobs}
    cfg = replace(cfg, **{k: v for k, v in changes.items() if v is not None}, extra=tuple(extra))
    return args.out, cfg


def main(argv: list[str] | None = None) -> int:
    out, cfg = parse_args(argv)
    records = run_grid(out, cfg)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
