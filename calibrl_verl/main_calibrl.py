"""Train with CalibRL: ``python -m calibrl_verl.main_calibrl [hydra overrides]``.

verl 0.9.1's own entry point (``verl.trainer.main_ppo``: device set-up, config validation, Ray, the V1
TaskRunner) with our config (``config/calibrl_trainer.yaml``, composed on verl's ``ppo_trainer``) and three
things done first, on the driver, before Ray or any GPU starts:

1. the ``calibrl:`` section is validated (a bad key stops here with a message naming it), and the local
   training files are checked (``calibrl_verl.data.validate``: errors name file, row and column; counted
   fallbacks such as rows without an expert are printed once);
2. the verl keys that follow from ``calibrl.loss_mode`` are derived (estimator, policy loss, the agent-loop
   file), so one switch selects CalibRL or a baseline;
3. with ``calibrl.reward_guard`` the configured reward function is wrapped (``integration/reward_guard.py``:
   a sample whose reward raises or is NaN scores 0 and is counted); the function is loaded here first, so a
   wrong ``reward.custom_reward_function`` path fails before Ray starts;
4. ``CALIBRL_REGISTER_TRAINER=1`` is exported (also into Ray's runtime env) so that verl's plugin loading
   registers our trainer in the Ray TaskRunner process, where verl looks it up.
"""

from __future__ import annotations

import inspect
import math
import os
from importlib import resources
from typing import Any

os.environ.setdefault("CALIBRL_REGISTER_TRAINER", "1")  # before verl is imported: see calibrl_verl.plugin

import hydra  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from calibrl_verl.config import CalibRLConfig, CalibRLConfigError  # noqa: E402

_FORWARDED_ENV = ("CALIBRL_REGISTER_TRAINER", "CALIBRL_DEVICE")


def prepare_config(config: DictConfig) -> CalibRLConfig:
    """Validate ``calibrl:`` and derive the verl keys it implies; returns the validated section."""
    cfg = CalibRLConfig.from_config(config.get("calibrl"))
    rollout = config.actor_rollout_ref.rollout
    if int(rollout.n) <= cfg.n_expert:
        raise CalibRLConfigError(
            f"actor_rollout_ref.rollout.n={rollout.n} counts on-policy samples plus calibrl.experts_per_group="
            f"{cfg.n_expert} expert rows: it must be larger (e.g. n=11 for 10 samples + 1 expert)"
        )
    cfg.check_run_length(config.trainer.get("total_training_steps"))
    check_old_log_prob_mode(config, cfg)
    check_update_shape(config, cfg)
    with open_dict(config):
        grpo = cfg.loss_mode == "grpo"
        config.algorithm.adv_estimator = "grpo" if grpo else "calibrl"
        config.actor_rollout_ref.actor.policy_loss.loss_mode = "vanilla" if grpo else cfg.loss_mode
        config.trainer.v1.trainer_mode = "calibrl"
        if not rollout.agent.get("agent_loop_config_path"):
            rollout.agent.agent_loop_config_path = str(resources.files("calibrl_verl") / "config" / "agent_loops.yaml")
        if cfg.reward_guard:
            install_reward_guard(config)
        _forward_env(config)
    return cfg


def check_old_log_prob_mode(config: DictConfig, cfg: CalibRLConfig) -> None:
    """Refuse verl's rollout-correction bypass mode where the loss reads expert rows' old log-probs.

    Bypass mode (``algorithm.rollout_correction.bypass_mode=true``) skips the old-log-prob pass and uses the
    rollout's log-probs instead (verl 0.9.1 ``trainer_base.py`` ~1641). Expert rows are never sampled, so they
    carry placeholder zeros there: CalibRL's calibration baseline would silently become log-prob 0, and
    RL-PLUS's p_old 1. No expert log-prob exists without that pass, so there is nothing to fall back to.
    """
    correction = config.algorithm.get("rollout_correction") or {}
    if cfg.n_expert and bool(correction.get("bypass_mode", False)):
        raise CalibRLConfigError(
            f"algorithm.rollout_correction.bypass_mode=true cannot run calibrl.loss_mode={cfg.loss_mode!r}: it skips "
            "the old-log-prob pass, the only source of the expert rows' log-probs (the calibration baseline); "
            "set algorithm.rollout_correction.bypass_mode=false, or calibrl.loss_mode=grpo"
        )


def check_update_shape(config: DictConfig, cfg: CalibRLConfig) -> None:
    """Refuse a mini-batch the CalibRL update cannot split over the data-parallel ranks, naming a size that works.

    CalibRL updates on the on-policy rows only, so its mini-batch is ppo_mini_batch_size x (rollout.n - k) rows,
    and verl's engine asserts it splits evenly over the dp ranks, dynamic batch sizes included (verl 0.9.1
    ``engine_workers.py`` ~267). verl's own start-up check counts rollout.n rows, experts included.
    """
    actor = config.actor_rollout_ref.actor
    if cfg.loss_mode != "calibrl":
        return  # the other modes update on every row, as verl's own check assumes
    n_on = int(config.actor_rollout_ref.rollout.n) - cfg.n_expert
    sp = int(actor.get("ulysses_sequence_parallel_size", 1) or 1)
    dp = max(int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes) // sp, 1)
    mini = int(actor.ppo_mini_batch_size)
    if (mini * n_on) % dp:
        step = dp // math.gcd(dp, n_on)  # the smallest mini-batch (in prompts) whose on-policy rows split over dp
        works = -(-mini // step) * step
        raise CalibRLConfigError(
            f"actor_rollout_ref.actor.ppo_mini_batch_size={mini} gives CalibRL updates of {mini} x {n_on} on-policy "
            f"rows (actor_rollout_ref.rollout.n={n_on + cfg.n_expert} minus calibrl.experts_per_group="
            f"{cfg.n_expert}), which do not split over {dp} data-parallel ranks; use a multiple of {step}, e.g. "
            f"actor_rollout_ref.actor.ppo_mini_batch_size={works}"
        )


def install_reward_guard(config: DictConfig) -> None:
    """Point verl's reward loop at the guard, with the user's function passed on as two ``reward_kwargs``.

    Nothing to wrap without a custom function (verl then scores with its built-in rules or a reward model).
    verl's legacy top-level ``custom_reward_function`` key is moved under ``reward`` first, as verl's reward
    loop would do later, so the guard wraps it too. Idempotent.
    """
    with open_dict(config):
        _install_reward_guard(config)


def _install_reward_guard(config: DictConfig) -> None:
    from calibrl_verl.integration import reward_guard as guard

    legacy = config.get("custom_reward_function")
    if legacy is not None and legacy.get("path"):
        config.reward.custom_reward_function = legacy
        config.custom_reward_function = {key: None for key in legacy}
    fn_cfg = config.reward.custom_reward_function
    path, name = fn_cfg.get("path"), fn_cfg.get("name") or "compute_score"
    if not path or path == guard.GUARD_PATH:
        return
    try:
        inner = guard.load_inner(str(path), str(name))
    except Exception as err:
        raise CalibRLConfigError(
            f"reward.custom_reward_function: cannot load {name!r} from {path!r}: {type(err).__name__}: {err}"
        ) from err
    kwargs = dict(fn_cfg.get("reward_kwargs") or {})
    kwargs.update({guard.INNER_PATH_KEY: str(path), guard.INNER_NAME_KEY: str(name)})
    fn_cfg.path = guard.GUARD_PATH
    fn_cfg.name = "guarded_score_async" if inspect.iscoroutinefunction(inner) else "guarded_score"
    fn_cfg.reward_kwargs = kwargs


def _forward_env(config: DictConfig) -> None:
    """Ray workers of an existing cluster do not inherit the driver's environment: pass ours explicitly."""
    ray_init = config.ray_kwargs.ray_init
    if ray_init.get("runtime_env") is None:
        ray_init.runtime_env = {}
    if ray_init.runtime_env.get("env_vars") is None:
        ray_init.runtime_env.env_vars = {}
    for key in _FORWARDED_ENV:
        if key in os.environ and key not in ray_init.runtime_env.env_vars:
            ray_init.runtime_env.env_vars[key] = os.environ[key]


def validate_train_data(config: DictConfig, cfg: CalibRLConfig) -> None:
    """Check every local training file before Ray starts; remote paths (hdfs://, ...) are left to verl."""
    from calibrl_verl.data.validate import validate_parquet

    files = config.data.train_files
    for path in [files] if isinstance(files, str) else list(files):
        if "://" in str(path) or not os.path.isfile(str(path)):
            print(f"[calibrl] not validated (not a local file): {path}")
            continue
        report = validate_parquet(str(path), expert_key=cfg.expert_key, needs_expert=cfg.needs_expert_column,
                                  image_key=config.data.get("image_key", "images"),
                                  prompt_key=config.data.get("prompt_key", "prompt"))
        print(report.summary())


def run(config: DictConfig) -> None:
    """verl's own main_ppo path (device, validation, Ray, TaskRunnerV1) on the prepared config."""
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    import calibrl_verl.integration.registry  # noqa: F401  (fails loudly where the plugin would fail silently)

    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=TaskRunnerV1)


@hydra.main(config_path="config", config_name="calibrl_trainer", version_base=None)
def main(config: Any) -> None:
    cfg = prepare_config(config)
    validate_train_data(config, cfg)
    run(config)


if __name__ == "__main__":
    main()
