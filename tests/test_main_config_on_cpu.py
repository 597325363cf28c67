"""calibrl_trainer.yaml composed on verl's ppo_trainer, and what main_calibrl derives from it before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from calibrl_verl.config import CalibRLConfig, CalibRLConfigError
from calibrl_verl.main_calibrl import prepare_config


def _compose(*overrides: str):
    with initialize_config_module("calibrl_verl.config", version_base=None):
        return compose("calibrl_trainer", overrides=list(overrides))


def test_yaml_calibrl_section_is_the_dataclass_defaults():
    cfg = _compose()
    assert CalibRLConfig.from_config(cfg.calibrl) == CalibRLConfig()
    # verl's own sections are there, composed underneath
    assert cfg.actor_rollout_ref.actor.strategy and cfg.data.max_response_length > 0
    assert cfg.reward.custom_reward_function.path == "pkg://calibrl_verl.reward"


@pytest.mark.parametrize("mode,estimator,loss", [("calibrl", "calibrl", "calibrl"), ("grpo", "grpo", "vanilla"),
                                                 ("luffy", "calibrl", "luffy"), ("rlplus", "calibrl", "rlplus")])
def test_loss_mode_selects_estimator_and_policy_loss(mode, estimator, loss):
    cfg = _compose(f"calibrl.loss_mode={mode}")
    prepare_config(cfg)
    assert cfg.algorithm.adv_estimator == estimator
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == loss
    assert cfg.trainer.v1.trainer_mode == "calibrl"
    assert os.path.isfile(cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path)
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "calibrl_agent"


def test_hydra_overrides_reach_the_validated_section_and_verl_keys():
    cfg = _compose("calibrl.alpha=0.3", "calibrl.pass_rate_range=[0.1,0.9]", "calibrl.norm_adv_by_std=true")
    got = prepare_config(cfg)
    assert got.alpha == 0.3 and got.pass_rate_range == (0.1, 0.9)
    assert cfg.algorithm.norm_adv_by_std_in_grpo is True  # one switch for both


def test_bad_values_stop_before_anything_starts():
    with pytest.raises(CalibRLConfigError, match="calibrl.alpha"):
        prepare_config(_compose("calibrl.alpha=2"))
    with pytest.raises(CalibRLConfigError, match=r"rollout.n=1 counts on-policy samples"):
        prepare_config(_compose("actor_rollout_ref.rollout.n=1"))
    with pytest.raises(CalibRLConfigError, match="warmup_grpo_steps=5 >= the run's 5"):
        prepare_config(_compose("calibrl.warmup_grpo_steps=5", "trainer.total_training_steps=5"))


@pytest.mark.parametrize("mode", ["calibrl", "luffy", "rlplus"])
def test_rollout_correction_bypass_mode_is_refused_where_expert_old_log_probs_are_needed(mode):
    cfg = _compose(f"calibrl.loss_mode={mode}", "algorithm.rollout_correction.bypass_mode=true")
    with pytest.raises(CalibRLConfigError, match=r"algorithm.rollout_correction.bypass_mode=true cannot run "
                                                 rf"calibrl.loss_mode='{mode}'.*bypass_mode=false"):
        prepare_config(cfg)
    grpo = _compose("calibrl.loss_mode=grpo", "actor_rollout_ref.rollout.n=4",
                    "algorithm.rollout_correction.bypass_mode=true")
    prepare_config(grpo)  # no expert rows: verl's own bypass mode stays available to the GRPO baseline
    assert grpo.algorithm.adv_estimator == "grpo"


def test_register_env_is_forwarded_to_ray_workers():
    cfg = _compose()
    prepare_config(cfg)
    env = OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env.env_vars)
    assert env["CALIBRL_REGISTER_TRAINER"] == "1"


def test_verl_accepts_the_composed_config():
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = _compose("data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                   "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1", "trainer.n_gpus_per_node=1",
                   "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1")
    prepare_config(cfg)
    assert not need_critic(cfg) and not need_reference_policy(cfg)
    validate_config(config=cfg, use_reference_policy=False, use_critic=False)


_PROBE = ("import json, verl\nfrom verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY as R\n"
          "print(json.dumps({'calibrl': R['calibrl'].__module__ if 'calibrl' in R else None}))\n")


@pytest.mark.parametrize("flag,expected", [("1", "calibrl_verl.integration.trainer"), ("0", None)])
def test_trainer_registers_through_verl_plugin_loading_only_when_asked(flag, expected):
    env = {**os.environ, "CALIBRL_REGISTER_TRAINER": flag}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["calibrl"] == expected


def test_training_files_are_validated_on_the_driver_before_ray(tmp_path, capsys):
    import pandas as pd

    from calibrl_verl.data.validate import DataValidationError
    from calibrl_verl.main_calibrl import validate_train_data
    from calibrl_verl.tiny.task import make_items, write_parquet

    good = write_parquet(make_items(4, 0, "train"), "train", tmp_path / "good.parquet")
    cfg = _compose(f"data.train_files=[{good}]")
    validate_train_data(cfg, prepare_config(cfg))
    assert "good.parquet" in capsys.readouterr().out
    frame = pd.read_parquet(good)
    frame["reward_model"] = [{"style": "rule", "ground_truth": "" if i == 2 else rm["ground_truth"]}
                             for i, rm in enumerate(frame["reward_model"])]
    bad = tmp_path / "bad.parquet"
    frame.to_parquet(bad)
    cfg = _compose(f"data.train_files=[{good},{bad}]")
    with pytest.raises(DataValidationError, match=r"bad.parquet.*row 2"):
        validate_train_data(cfg, prepare_config(cfg))
