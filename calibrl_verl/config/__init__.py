"""The ``calibrl:`` config section (docs/algorithm.md §2, §4), validated into a frozen dataclass at start-up.

Every key is overridable with Hydra (``calibrl.alpha=0.3``). ``CalibRLConfig.from_config`` accepts an
OmegaConf node or a plain mapping, rejects unknown keys, and raises ``CalibRLConfigError`` naming the key,
the value and what is allowed, before any Ray worker or GPU is started.

Importing this module registers CalibRL's OmegaConf resolvers (``calibrl_verl.config.resolvers``, where they are
all listed): ``calibrl_rollout_n``, with which ``calibrl_base.yaml`` derives ``actor_rollout_ref.rollout.n`` from
``calibrl.n_onpolicy`` (see ``rollout_n``), and those with which the recipes read their environment variables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from calibrl_verl.core_algos import GAP_MODES, SEQUENCE_NORMS, TAIL_MODES

LOSS_MODES = ("calibrl", "grpo", "luffy", "rlplus")
MIX_POLICIES = ("always", "random", "pass_rate")
EXPERT_OVERLONG = ("truncate", "drop")
# Loss modes that read the expert rows (their old log-probs or their tokens).
EXPERT_LOSS_MODES = ("calibrl", "luffy", "rlplus")


class CalibRLConfigError(ValueError):
    """A ``calibrl.*`` key has a value the algorithm cannot run with; the message names key and allowed values."""


@dataclasses.dataclass(frozen=True)
class CalibRLConfig:
    """CalibRL hyper-parameters; defaults reproduce the authors' code (docs/algorithm.md §4)."""

    loss_mode: str = "calibrl"
    expert_key: str = "solution"
    experts_per_group: int = 1
    alpha: float = 0.5
    guide_coef: float = 0.1
    all_wrong_weight: float = 0.0
    pass_threshold: float = 0.1
    gap: str = "token"
    tail: str = "zero"
    sequence_norm: str = "sum"
    norm_adv_by_std: bool = False
    mix_policy: str = "always"
    mix_ratio: float = 1.0
    pass_rate_range: tuple[float, float] = (0.0, 1.0)
    warmup_grpo_steps: int = 0
    expert_overlong: str = "truncate"
    seed: int = 0
    reward_guard: bool = True
    seeded_rollouts: bool = False
    dump_dir: str | None = None
    n_onpolicy: int = 10
    allow_verl_mismatch: bool = False
    # a dead Ray worker is found within worker_check_s; a weight sync longer than weight_sync_timeout_s (null: no
    # limit) is a hang (integration/worker_watch.py)
    worker_check_s: float = 5.0
    weight_sync_timeout_s: float | None = 600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pass_rate_range", tuple(float(x) for x in self.pass_rate_range))
        self._check_choices()
        self._check_numbers()
        self._check_combinations()

    # -- validation ------------------------------------------------------------------------------------
    def _check_choices(self) -> None:
        for key, allowed in (("loss_mode", LOSS_MODES), ("gap", GAP_MODES), ("tail", TAIL_MODES),
                             ("sequence_norm", SEQUENCE_NORMS), ("mix_policy", MIX_POLICIES),
                             ("expert_overlong", EXPERT_OVERLONG)):
            value = getattr(self, key)
            if value not in allowed:
                raise CalibRLConfigError(f"calibrl.{key}={value!r} is not allowed; choose one of {list(allowed)}")
        if not isinstance(self.expert_key, str) or not self.expert_key.strip():
            raise CalibRLConfigError(f"calibrl.expert_key={self.expert_key!r} must name a dataset column")
        if self.dump_dir is not None and (not isinstance(self.dump_dir, str) or not self.dump_dir.strip()):
            raise CalibRLConfigError(f"calibrl.dump_dir={self.dump_dir!r} must be null or a directory path")

    def _check_numbers(self) -> None:
        _require_int("experts_per_group", self.experts_per_group, minimum=0)
        _require_int("warmup_grpo_steps", self.warmup_grpo_steps, minimum=0)
        _require_int("seed", self.seed, minimum=0)
        _require_int("n_onpolicy", self.n_onpolicy, minimum=1)
        _require_range("alpha", self.alpha, 0.0, 1.0)
        _require_range("mix_ratio", self.mix_ratio, 0.0, 1.0)
        _require_range("guide_coef", self.guide_coef, 0.0, math.inf)
        _require_range("all_wrong_weight", self.all_wrong_weight, 0.0, math.inf)
        _require_range("pass_threshold", self.pass_threshold, -math.inf, math.inf)
        if len(self.pass_rate_range) != 2:
            raise CalibRLConfigError(f"calibrl.pass_rate_range={list(self.pass_rate_range)} must be [lo, hi]")
        lo, hi = self.pass_rate_range
        if not (0.0 <= lo <= hi <= 1.0):
            raise CalibRLConfigError(
                f"calibrl.pass_rate_range={[lo, hi]} must satisfy 0 <= lo <= hi <= 1 (pass rates are fractions)"
            )
        _require_range("worker_check_s", self.worker_check_s, 0.1, math.inf)
        if self.weight_sync_timeout_s is not None:
            _require_range("weight_sync_timeout_s", self.weight_sync_timeout_s, 1.0, math.inf)
        for key in ("norm_adv_by_std", "reward_guard", "seeded_rollouts", "allow_verl_mismatch"):
            if not isinstance(getattr(self, key), bool):
                raise CalibRLConfigError(f"calibrl.{key}={getattr(self, key)!r} must be true or false")

    def _check_combinations(self) -> None:
        if self.loss_mode in EXPERT_LOSS_MODES and self.experts_per_group == 0:
            raise CalibRLConfigError(
                f"calibrl.loss_mode={self.loss_mode!r} needs expert rows but calibrl.experts_per_group=0; "
                "set calibrl.experts_per_group>=1, or calibrl.loss_mode='grpo' for plain GRPO"
            )

    def check_run_length(self, total_training_steps: int | None) -> None:
        """Reject a warm-up that covers the whole run (the run would never use the expert)."""
        if total_training_steps is None or self.warmup_grpo_steps == 0 or self.loss_mode == "grpo":
            return
        if self.warmup_grpo_steps >= total_training_steps:
            raise CalibRLConfigError(
                f"calibrl.warmup_grpo_steps={self.warmup_grpo_steps} >= the run's {total_training_steps} training "
                "steps: CalibRL would never apply; lower it or use calibrl.loss_mode='grpo'"
            )

    # -- derived ---------------------------------------------------------------------------------------
    @property
    def n_expert(self) -> int:
        """Expert rows added to each group: 0 for the GRPO baseline whatever experts_per_group says."""
        return 0 if self.loss_mode == "grpo" else self.experts_per_group

    @property
    def rollout_n(self) -> int:
        """Rows per prompt, ``actor_rollout_ref.rollout.n``: the on-policy samples plus the mode's expert rows."""
        return self.n_onpolicy + self.n_expert

    @property
    def needs_expert_column(self) -> bool:
        return self.n_expert > 0

    def in_warmup(self, global_step: int) -> bool:
        """Steps 1..warmup_grpo_steps (verl counts from 1) are plain GRPO: no expert rows, no guide term."""
        return global_step <= self.warmup_grpo_steps

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, node: Mapping[str, Any] | Any | None) -> CalibRLConfig:
        """Build from an OmegaConf node / mapping; unknown keys are an error naming the allowed keys."""
        if node is None:
            return cls()
        data = _to_plain_dict(node)
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise CalibRLConfigError(f"unknown key(s) calibrl.{', calibrl.'.join(unknown)}; allowed keys: {allowed}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pass_rate_range"] = list(self.pass_rate_range)
        return out


def rollout_n(n_onpolicy: Any, experts_per_group: Any, loss_mode: Any) -> int:
    """The ``calibrl_rollout_n`` resolver: ``n = n_onpolicy + (0 if loss_mode == "grpo" else experts_per_group)``.

    Why a resolver: the on-policy count is what a user sets, so a GRPO baseline (``calibrl.loss_mode=grpo`` on any
    recipe) samples as many on-policy rows as CalibRL does, instead of inheriting CalibRL's n with its expert row.
    """
    return CalibRLConfig(loss_mode=loss_mode, experts_per_group=experts_per_group, n_onpolicy=n_onpolicy).rollout_n


from calibrl_verl.config import resolvers  # noqa: E402  (after CalibRLConfigError, which it subclasses)

resolvers.register()


def _to_plain_dict(node: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with verl
        DictConfig = ()  # type: ignore[assignment]
    if DictConfig and isinstance(node, DictConfig):
        return dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
    if isinstance(node, Mapping):
        return dict(node)
    raise CalibRLConfigError(f"the calibrl section must be a mapping, got {type(node).__name__}")


def _require_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CalibRLConfigError(f"calibrl.{key}={value!r} must be an integer >= {minimum}")


def _require_range(key: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or not lo <= value <= hi:
        raise CalibRLConfigError(f"calibrl.{key}={value!r} must be a number in [{lo}, {hi}]")
