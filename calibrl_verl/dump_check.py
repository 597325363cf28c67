"""A training step's dump (``calibrl.dump_dir``) checked against the algorithm, recomputed from its raw columns.

The trainer's own decisions (``guided``, ``expert_active``, ``expert_baseline``, ``advantage``, ``update_tokens``)
are never trusted here. They are derived again from what a step starts with: the rewards (``score``, ``acc``),
the expert flags (``is_expert``), the responses' old log-probs and lengths, the step number and the run's settings
(loss mode, mixing policy, warm-up, seed, gap); then compared with what the trainer dumped and logged. This module
is a second, independent writing of the rules in plain numpy / pandas: it imports none of the training code.
``smoke.check`` runs it on every dumped step of a smoke launch; ``python -m calibrl_verl.smoke check --dump-dir``
does the same from the command line.

The rules, as written again here (docs/algorithm.md states them):

* correct = ``acc`` > 0 when the reward returned an ``acc``, else ``score`` > ``pass_threshold``.
* Which groups get their expert row: none during the GRPO warm-up (steps 1..warmup_grpo_steps); ``random``: prompt k
  of the step's data batch iff ``default_rng([seed, step]).random(n_prompts)[k] < mix_ratio``; otherwise all. A group
  *uses* its expert when it has one and (``pass_rate``) its on-policy pass rate lies in [lo, hi].
* On-policy advantage: A_i = r_i - mean of the group's on-policy rewards (/ (their unbiased std + 1e-6) with
  ``norm_adv_by_std``); 0 when those rewards are all equal; a lone on-policy row keeps r_i (mean 0, std 1).
  Expert rows: 0 (CalibRL); LUFFY / RL-PLUS: A_e = r_e - the same on-policy mean on the experts a group uses, else 0;
  with ``norm_adv_by_std`` divided by (std + 1e-6), where a group whose on-policy rewards are all equal uses std 1.
* Guided rows (CalibRL only): the on-policy rows of a group that uses its expert. Expert baseline S(l^e): the sum
  (``sequence_norm=mean``: the mean) of an expert row's old log-probs over all its tokens, averaged over the group's
  expert rows (several with ``experts_per_group`` > 1), on guided rows, 0 elsewhere. The token gap's baseline at
  position t is the mean over the group's experts that have a token at t. Log-probs are floored at -20 first.
* Tokens the update counts per row: the response length for on-policy rows and for the expert rows LUFFY /
  RL-PLUS train on (active ones); 0 for CalibRL's expert rows and for inactive expert rows.
* ``calibrl/guide_loss``: token gap, sum over guided rows and response tokens of
  |A_i| * LeakyReLU_alpha(-s_i * (max(lp_t, -20) - l^e_t)) (l^e_t = 0 past the expert's end with ``tail=zero``; those
  tokens left out with ``tail=mask``), divided by every on-policy response token; sequence gap,
  |A_i| * LeakyReLU_alpha(-s_i * (S(lp_i) - S(l^e))) summed over guided rows, divided by the on-policy responses.
  A wrong row with A_i = 0 (its group all wrong) is weighted by ``all_wrong_weight`` instead of |A_i|.
* ``calibrl/luffy_expert_loss``: sum over active expert tokens of -A_e * p_t / (p_t + 0.1);
  ``calibrl/rlplus_expert_loss``: of -A_e * p_t / (0.75 p_old_t + 0.25) * (1 - p_t)^0.5; both divided by all the
  tokens the update counts (the dump's ``update_tokens``, summed over the step, itself checked above).

The logged losses use the log-probs of the update's forward pass; the dump holds the old ones. The smoke recipe
runs one PPO mini-batch and one epoch per step, so the two come from the same weights and differ by recompute noise
only: the loss comparisons allow ``LOSS_REL_TOL``. Checked: ``loss_agg_mode=token-mean`` (verl's default) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

LOG_PROB_FLOOR = -20.0
# a logged loss term from the update's forward vs the same term from the dumped old log-probs (same weights):
# measured differences are ~1e-6 relative; a sign flip or a wrong denominator moves the value by far more
LOSS_REL_TOL = 2e-3
LOSS_ABS_TOL = 1e-5
# per-row values the dump stores from float32 tensors
VALUE_ABS_TOL = 1e-5
VALUE_REL_TOL = 1e-5
STD_EPSILON = 1e-6
LUFFY_GAMMA = 0.1
RLPLUS_EXPLORE = 0.5
OFFPOLICY_MODES = ("luffy", "rlplus")
# overrides outside the ``calibrl`` section that the recomputation needs
_OTHER_KEYS = {"actor_rollout_ref.actor.loss_agg_mode": "loss_agg_mode"}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The settings of a run that decide what its steps must contain (defaults: the ``calibrl`` section's)."""

    loss_mode: str = "calibrl"
    mix_policy: str = "always"
    mix_ratio: float = 1.0
    pass_rate_range: tuple[float, float] = (0.0, 1.0)
    warmup_grpo_steps: int = 0
    seed: int = 0
    gap: str = "token"
    tail: str = "zero"
    sequence_norm: str = "sum"
    alpha: float = 0.5
    all_wrong_weight: float = 0.0
    pass_threshold: float = 0.1
    norm_adv_by_std: bool = False
    loss_agg_mode: str = "token-mean"
    dp_ranks: int = 1

    def __post_init__(self) -> None:
        if self.loss_agg_mode != "token-mean":
            raise ValueError(f"actor_rollout_ref.actor.loss_agg_mode={self.loss_agg_mode!r}: the dump check "
                             f"recomputes the loss terms for 'token-mean' only")
        # Hydra override strings parse as YAML, where 5e-1 is a string: numbers are cast to their field's type
        for name in ("mix_ratio", "alpha", "all_wrong_weight", "pass_threshold"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("warmup_grpo_steps", "seed", "dp_ranks"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "pass_rate_range", tuple(float(x) for x in self.pass_rate_range))

    @classmethod
    def from_overrides(cls, overrides: Iterable[str]) -> RunSettings:
        """The settings a launch's Hydra overrides give (``calibrl.<key>=<value>``; later ones win)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        gpus, nodes = 1, 1
        for item in overrides:
            key, sep, raw = item.lstrip("+~").partition("=")
            if not sep:
                continue
            value = yaml.safe_load(raw)
            name = key.removeprefix("calibrl.") if key.startswith("calibrl.") else _OTHER_KEYS.get(key)
            if name in fields:
                values[name] = value
            elif key == "trainer.n_gpus_per_node":
                gpus = int(value)
            elif key == "trainer.nnodes":
                nodes = int(value)
        return cls(**values, dp_ranks=gpus * nodes)

    @property
    def offpolicy(self) -> bool:
        return self.loss_mode in OFFPOLICY_MODES


# -- the step, recomputed -----------------------------------------------------------------------------------------
def correctness(df: pd.DataFrame, pass_threshold: float) -> np.ndarray:
    """Per row: ``acc`` > 0 where the reward returned one, else ``score`` > ``pass_threshold``."""
    acc = df["acc"].astype(float)
    return np.where(acc.notna(), acc.fillna(0.0) > 0, df["score"].astype(float) > pass_threshold).astype(bool)


def prompt_order(df: pd.DataFrame, settings: RunSettings) -> list[str]:
    """The step's groups in data-batch order (the order ``random`` mixing draws in).

    From a ``prompt_index`` column when the dump has one; else the order of the uids' first rows, which is the
    data-batch order on one data-parallel rank (rows are sorted by prompt, and verl's balancer keeps the order of a
    single partition). With more ranks, no such column and ``random`` mixing the order matters and is unknown: an
    error.
    """
    if "prompt_index" in df.columns:
        return list(df.groupby("uid")["prompt_index"].first().sort_values().index)
    if settings.dp_ranks > 1 and settings.mix_policy == "random":
        raise ValueError(f"the dump has no 'prompt_index' column and the run has {settings.dp_ranks} data-parallel "
                         f"ranks: the data-batch order that mix_policy=random draws in is unknown")
    return list(dict.fromkeys(df["uid"]))


def expert_drawn(step: int, n_prompts: int, settings: RunSettings) -> np.ndarray:
    """Per prompt of the data batch: does its expert row join the group this step (warm-up, ``random`` draws)?"""
    if step <= settings.warmup_grpo_steps:
        return np.zeros(n_prompts, dtype=bool)
    if settings.mix_policy == "random":
        return np.random.default_rng([settings.seed, step]).random(n_prompts) < settings.mix_ratio
    return np.ones(n_prompts, dtype=bool)


def group_table(df: pd.DataFrame, step: int, settings: RunSettings) -> pd.DataFrame:
    """Per group (uid, data-batch order): drawn, has_expert, on-policy count / mean / std / all-equal, pass rate,
    and whether it uses its expert this step (``active``)."""
    uids = prompt_order(df, settings)
    correct = correctness(df, settings.pass_threshold)
    on = ~df["is_expert"].to_numpy(bool)
    rows = []
    for uid, draw in zip(uids, expert_drawn(step, len(uids), settings), strict=True):
        mine = (df["uid"] == uid).to_numpy()
        scores = df["score"].to_numpy(float)[mine & on]
        count = len(scores)
        single = count <= 1
        rows.append({
            "uid": uid, "drawn": bool(draw), "has_expert": bool((mine & ~on).any()), "n_onpolicy": count,
            "mean": 0.0 if single else float(scores.mean()),
            "std": 1.0 if single else float(scores.std(ddof=1)),
            "all_equal": not single and bool(scores.max() == scores.min()),
            "pass_rate": float(correct[mine & on].mean()) if count else float("nan"),
        })
    groups = pd.DataFrame(rows).set_index("uid")
    lo, hi = settings.pass_rate_range
    in_range = (groups.pass_rate >= lo) & (groups.pass_rate <= hi) if settings.mix_policy == "pass_rate" else True
    groups["active"] = groups.drawn & groups.has_expert & in_range
    return groups


def floored(log_probs: Any) -> np.ndarray:
    return np.maximum(np.asarray(log_probs, dtype=np.float64), LOG_PROB_FLOOR)


def sequence_value(log_probs: Any, norm: str) -> float:
    """S(l): the sum of the floored log-probs, or their mean (``sequence_norm=mean``)."""
    lp = floored(log_probs)
    return float(lp.sum() / max(len(lp), 1)) if norm == "mean" else float(lp.sum())


def expected_rows(df: pd.DataFrame, step: int, settings: RunSettings) -> pd.DataFrame:
    """Per dump row: what the algorithm says it must hold (columns named like the dump's), from raw columns only."""
    groups = group_table(df, step, settings)
    baseline = df[df["is_expert"]].groupby("uid")["old_log_probs"].agg(
        lambda experts: float(np.mean([sequence_value(e, settings.sequence_norm) for e in experts])))
    out = pd.DataFrame(index=df.index)
    out["correct"] = correctness(df, settings.pass_threshold)
    active = df["uid"].map(groups["active"]).to_numpy(bool)
    expert = df["is_expert"].to_numpy(bool)
    out["expert_active"] = expert & active
    out["guided"] = ~expert & active & (settings.loss_mode == "calibrl")
    out["advantage"] = [_advantage(row, groups.loc[row.uid], settings, bool(a))
                        for row, a in zip(df.itertuples(), active, strict=True)]
    out["expert_baseline"] = [baseline[row.uid] if guided else 0.0
                              for row, guided in zip(df.itertuples(), out["guided"], strict=True)]
    lengths = df["old_log_probs"].map(len).to_numpy()
    counted = ~expert | (expert & active & settings.offpolicy)
    out["update_tokens"] = np.where(counted, lengths, 0)
    return out


def _advantage(row: Any, group: pd.Series, settings: RunSettings, active: bool) -> float:
    centred = row.score - group["mean"]
    scale = group["std"] + STD_EPSILON if settings.norm_adv_by_std else 1.0
    if row.is_expert:  # LUFFY / RL-PLUS train on the experts a group uses; CalibRL never does
        if group["all_equal"] and settings.norm_adv_by_std:
            scale = 1.0 + STD_EPSILON  # a zero on-policy std is replaced by 1 (never a blow-up)
        return centred / scale if active and settings.offpolicy else 0.0
    return 0.0 if group["all_equal"] else centred / scale


def _leaky(x: np.ndarray, alpha: float) -> np.ndarray:
    return np.where(x > 0, x, alpha * x)


def expert_token_baseline(experts: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The group's token baseline: at position t the mean of the floored old log-probs of the experts that have a
    token there, and where some expert has one (the tail rule applies past the longest expert)."""
    width = max(len(e) for e in experts)
    total, count = np.zeros(width), np.zeros(width)
    for e in experts:
        total[: len(e)] += floored(e)
        count[: len(e)] += 1
    return total / np.maximum(count, 1), count > 0


def guide_loss(df: pd.DataFrame, want: pd.DataFrame, settings: RunSettings) -> float:
    """``calibrl/guide_loss`` of the step from its old log-probs (see the module docstring)."""
    experts = df[df["is_expert"]].groupby("uid")["old_log_probs"].agg(list)
    onpolicy = ~df["is_expert"].to_numpy(bool)
    total = 0.0
    for row, guided, adv, sign, base in zip(df.itertuples(), want["guided"], want["advantage"],
                                            np.where(want["correct"], 1.0, -1.0), want["expert_baseline"],
                                            strict=True):
        if not guided:
            continue
        own = floored(row.old_log_probs)
        # a wrong row without outcome signal (its group all wrong) is weighted by all_wrong_weight, not |A| = 0
        weight = settings.all_wrong_weight if adv == 0 and sign < 0 else abs(adv)
        if settings.gap == "sequence":
            gap = sequence_value(own, settings.sequence_norm) - base
            total += weight * float(_leaky(np.asarray(-sign * gap), settings.alpha))
            continue
        ref, has = expert_token_baseline(experts[row.uid])
        n = min(len(own), len(ref))
        aligned, covered = np.zeros_like(own), np.zeros(len(own), dtype=bool)
        aligned[:n], covered[:n] = ref[:n], has[:n]
        terms = weight * _leaky(-sign * (own - aligned), settings.alpha)
        total += float(terms[covered].sum() if settings.tail == "mask" else terms.sum())
    if settings.gap == "sequence":
        return total / max(int(onpolicy.sum()), 1)
    return total / max(int(df["old_log_probs"].map(len).to_numpy()[onpolicy].sum()), 1)


def expert_token_losses(old_log_probs: Any, advantage: float, mode: str) -> np.ndarray:
    """Per expert token, LUFFY's -A p/(p + 0.1) or RL-PLUS's -A p/(0.75 p_old + 0.25) (1 - p)^0.5, with the current
    policy's p equal to the old one (one mini-batch, one epoch)."""
    p = np.exp(floored(old_log_probs))
    if mode == "luffy":
        return -advantage * p / (p + LUFFY_GAMMA)
    if mode == "rlplus":
        return -advantage * p / (0.75 * p + 0.25) * np.clip(1.0 - p, 0.0, None) ** RLPLUS_EXPLORE
    raise ValueError(f"loss_mode={mode!r} has no expert-token loss (expected one of {OFFPOLICY_MODES})")


def offpolicy_expert_loss(df: pd.DataFrame, want: pd.DataFrame, mode: str) -> float:
    """``calibrl/<mode>_expert_loss``: the active expert tokens' loss over every token the update counts."""
    total = sum(float(expert_token_losses(row.old_log_probs, adv, mode).sum())
                for row, on, adv in zip(df.itertuples(), want["expert_active"], want["advantage"], strict=True) if on)
    return total / max(int(df["update_tokens"].sum()), 1)


# -- the comparison --------------------------------------------------------------------------------------------
def _rows_differ(df: pd.DataFrame, want: pd.DataFrame, column: str) -> list[int]:
    got, exp = df[column].to_numpy(), want[column].to_numpy()
    if got.dtype.kind == "f" or exp.dtype.kind == "f":
        ok = np.isclose(got.astype(float), exp.astype(float), rtol=VALUE_REL_TOL, atol=VALUE_ABS_TOL)
    else:
        ok = got == exp
    return [int(i) for i in np.flatnonzero(~ok)]


def _close(got: Any, want: float) -> bool:
    return got is not None and bool(np.isclose(float(got), want, rtol=LOSS_REL_TOL, atol=LOSS_ABS_TOL))


def check_step(df: pd.DataFrame, logged: Mapping[str, Any], step: int, settings: RunSettings) -> list[tuple[bool, str]]:
    """One step's dump and logged metrics against the recomputation, each (ok, description)."""
    at = f"step {step}:"
    results = [(bool((df["step"] == step).all()) and not df.empty, f"{at} dump rows of this step ({len(df)} rows)")]
    groups = group_table(df, step, settings)
    results.append((bool((groups.drawn == groups.has_expert).all()),
                    f"{at} expert rows exactly in the groups that draw one ({settings.mix_policy} mixing, warm-up "
                    f"{settings.warmup_grpo_steps}): drawn {groups.drawn.tolist()}, present "
                    f"{groups.has_expert.tolist()}"))
    want = expected_rows(df, step, settings)
    for column in ("correct", "expert_active", "guided", "advantage", "expert_baseline", "update_tokens"):
        if column not in df.columns:
            results.append((False, f"{at} the dump has no {column!r} column"))
            continue
        bad = _rows_differ(df, want, column)
        detail = [(i, df[column].iloc[i].item(), want[column].iloc[i].item()) for i in bad[:4]]
        results.append((not bad, f"{at} {column} as recomputed (mismatched rows (row, dumped, expected): {detail})"))
    results += _metric_checks(df, want, groups, logged, settings, at)
    return results


def _metric_checks(df: pd.DataFrame, want: pd.DataFrame, groups: pd.DataFrame, logged: Mapping[str, Any],
                   settings: RunSettings, at: str) -> list[tuple[bool, str]]:
    frac = float(groups.active.mean()) if len(groups) else 0.0
    results = [(logged.get("calibrl/expert_groups_frac") == frac,
                f"{at} calibrl/expert_groups_frac {logged.get('calibrl/expert_groups_frac')} (recomputed {frac})")]
    experts = df[df["is_expert"]]
    if len(experts):
        mean = float(experts["score"].mean())
        results.append((_close(logged.get("calibrl/expert_reward_mean"), mean),
                        f"{at} calibrl/expert_reward_mean {logged.get('calibrl/expert_reward_mean')} "
                        f"(recomputed {mean})"))
    if settings.loss_mode == "calibrl":
        value = guide_loss(df, want, settings)
        results.append((_close(logged.get("calibrl/guide_loss"), value),
                        f"{at} calibrl/guide_loss {logged.get('calibrl/guide_loss')} (recomputed {value:.6g}, "
                        f"{settings.gap} gap)"))
    elif settings.offpolicy:
        inactive = int((df["is_expert"] & ~want["expert_active"]).sum())
        results.append((logged.get("calibrl/inactive_expert_rows") == inactive,
                        f"{at} calibrl/inactive_expert_rows {logged.get('calibrl/inactive_expert_rows')} "
                        f"(recomputed {inactive})"))
        key = f"calibrl/{settings.loss_mode}_expert_loss"
        value = offpolicy_expert_loss(df, want, settings.loss_mode) if "update_tokens" in df.columns else float("nan")
        results.append((_close(logged.get(key), value), f"{at} {key} {logged.get(key)} (recomputed {value:.6g})"))
    return results


def check_run(dump_dir: Path, logged_steps: Iterable[Mapping[str, Any]], settings: RunSettings
              ) -> list[tuple[bool, str]]:
    """Every logged step against its dump ``<dump_dir>/step_<step, 6 digits>.parquet``.

    A logged step is numbered by its ``training/global_step`` (the k-th logged step when that is missing).
    """
    results = []
    for k, logged in enumerate(logged_steps, start=1):
        step = int(logged.get("training/global_step", k))
        path = Path(dump_dir) / f"step_{step:06d}.parquet"
        if not path.exists():
            results.append((False, f"step {step}: no dump at {path}"))
            continue
        results += check_step(pd.read_parquet(path), logged, step, settings)
    return results
