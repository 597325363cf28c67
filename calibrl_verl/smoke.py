"""The smoke checks: the PASS/FAIL properties a tiny end-to-end run of CalibRL's real recipe must show, and their CLI.

    python -m calibrl_verl.smoke run --out outputs/tiny_cpu [--steps 3] [--loss-mode calibrl] [hydra overrides]
        [--family qwen3_vl]   (the tiny Qwen3-VL instead of the tiny Qwen2.5-VL)
        [--family text]       (the tiny text-only Qwen2 on the text task: calibrl_verl.tiny.text_task)
        [--family wall]       (the coverage study's navigation task and model: calibrl_verl.tiny.wall_task)
    python -m calibrl_verl.smoke check outputs/tiny_cpu/calibrl/metrics.jsonl --steps 3 --loss-mode calibrl \
        [--dump-dir outputs/tiny_cpu/calibrl/dump [the run's hydra overrides]]

``check`` reads a launch's metrics (and with ``--dump-dir`` recomputes every step from its dump: ``dump_check``)
and prints one PASS/FAIL line per property; it exits non-zero on any FAIL. ``run`` is one run of the tiny recipe
through the launcher (``calibrl_verl.launch.run``: builds the tiny model and data if missing, launches verl's real
trainer with a timeout, draws the curves), dumping every step (``calibrl.dump_dir``, default
``<out>/<loss mode>/dump``), then ``check`` on it. ``--device cpu`` (default) adds the CPU backend
(``calibrl_verl.cpu``: vLLM's CPU build, gloo); ``--device gpu`` runs the same recipe on one GPU: the launcher and
the checks are the same, only the overrides differ.

Used by the CPU demo (``recipes/run_calibrl_tiny_cpu.sh``) and the GPU smoke (``recipes/gpu_smoke.sh``), which are
``run``; the smoke tests (``tests/test_smoke_*.py``) launch through ``calibrl_verl.launch`` and call ``check``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from calibrl_verl import dump_check, launch, tiny

# vLLM starts from random (dummy) weights: rollout and actor probabilities agree only if weight sync worked
# (measured on CPU, fp32: mean |p_rollout - p_actor| 1e-4 to 2e-4; random weights give ~0.5)
MAX_ROLLOUT_PROB_DIFF = 0.02


def check(path: Path, steps: int, loss_mode: str, every_group_guided: bool = True, dump_dir: Path | None = None,
          overrides: Sequence[str] = ()) -> list[tuple[bool, str]]:
    """The smoke properties, each (ok, description). ``every_group_guided=False`` for a run whose mixing policy
    leaves some groups without their expert (``calibrl.mix_policy=random|pass_rate``).

    With ``dump_dir`` (the launch's ``calibrl.dump_dir``) every logged step is also recomputed from its dump
    (``dump_check``: which groups use their expert, advantages, expert baseline, the tokens the update counts, and
    the logged guide / expert-token loss); ``overrides`` are the launch's Hydra overrides, which give the settings
    that recomputation needs. LUFFY / RL-PLUS need the dump: their expert-token loss is checked only that way.
    """
    data = launch.read_steps(path)
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
    prompts, samples = batch_shape(overrides)
    guide = [d.get("calibrl/guide_loss", float("nan")) for d in data]
    gate = [d.get("calibrl/gate_full_frac", float("nan")) for d in data]
    results += [
        (all(math.isfinite(g) for g in guide) and any(g != 0 for g in guide), f"guide loss finite, non-zero: {guide}"),
        (all(0.0 < g < 1.0 for g in gate), f"gate fraction inside (0, 1): {gate}"),
        (all(d.get("calibrl/update_rows", 0) == prompts * samples for d in data),
         f"expert rows excluded from the update: {[d.get('calibrl/update_rows') for d in data]} rows "
         f"(= {prompts} prompts x {samples} samples)"),
    ]
    return results


def batch_shape(overrides: Sequence[str]) -> tuple[int, int]:
    """Prompts per step and on-policy samples per prompt of a launch: ``calibrl_verl.launch``'s, or the overrides'
    ``data.train_batch_size`` / ``calibrl.n_onpolicy`` (later ones win)."""
    shape = {"data.train_batch_size": launch.PROMPTS_PER_STEP, "calibrl.n_onpolicy": launch.N_ONPOLICY}
    for item in overrides:
        key, sep, raw = item.lstrip("+~").partition("=")
        if sep and key in shape:
            shape[key] = int(raw)
    return shape["data.train_batch_size"], shape["calibrl.n_onpolicy"]


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
        metrics = launch.run(args.out, args.steps, args.loss_mode, args.device, extra, family=args.family)
        print(f"metrics: {metrics}\ncurves:  {metrics.parent / 'curves.png'}")
        dump = next(item.partition("=")[2] for item in extra if item.lstrip("+").startswith("calibrl.dump_dir="))
        args = argparse.Namespace(metrics=metrics, steps=args.steps, loss_mode=args.loss_mode, dump_dir=Path(dump))
    results = check(args.metrics, args.steps, args.loss_mode, dump_dir=args.dump_dir, overrides=extra)
    for ok, text in results:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(_main())
