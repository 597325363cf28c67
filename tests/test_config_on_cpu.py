"""The calibrl: config section: docs/algorithm.md §4 defaults, every validation error names its key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from calibrl_verl.config import CalibRLConfig, CalibRLConfigError


def test_defaults_are_the_authors_code():
    cfg = CalibRLConfig()
    assert cfg.to_dict() == {
        "loss_mode": "calibrl", "expert_key": "solution", "experts_per_group": 1, "alpha": 0.5, "guide_coef": 0.1,
        "all_wrong_weight": 0.0,
        "pass_threshold": 0.1, "gap": "token", "tail": "zero", "sequence_norm": "sum", "norm_adv_by_std": False,
        "mix_policy": "always", "mix_ratio": 1.0, "pass_rate_range": [0.0, 1.0], "warmup_grpo_steps": 0,
        "expert_overlong": "truncate", "seed": 0, "reward_guard": True, "seeded_rollouts": False,
        "dump_dir": None, "n_onpolicy": 10, "allow_verl_mismatch": False, "worker_check_s": 5.0,
        "weight_sync_timeout_s": 600.0,
    }


def test_from_omegaconf_node_with_overrides():
    node = OmegaConf.create({"alpha": 0.3, "pass_rate_range": [0.1, 0.9], "gap": "sequence"})
    cfg = CalibRLConfig.from_config(node)
    assert cfg.alpha == 0.3 and cfg.pass_rate_range == (0.1, 0.9) and cfg.gap == "sequence"
    assert CalibRLConfig.from_config(None) == CalibRLConfig()


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("alpha", 1.2, "calibrl.alpha=1.2 must be a number in [0.0, 1.0]"),
        ("alpha", -0.1, "calibrl.alpha"),
        ("alpha", float("nan"), "calibrl.alpha"),
        ("guide_coef", -0.1, "calibrl.guide_coef"),
        ("mix_ratio", 1.5, "calibrl.mix_ratio"),
        ("experts_per_group", -1, "calibrl.experts_per_group=-1 must be an integer >= 0"),
        ("experts_per_group", 1.5, "calibrl.experts_per_group"),
        ("warmup_grpo_steps", -2, "calibrl.warmup_grpo_steps"),
        ("gap", "tokens", "calibrl.gap='tokens' is not allowed; choose one of ['token', 'sequence']"),
        ("tail", "drop", "calibrl.tail"),
        ("sequence_norm", "max", "calibrl.sequence_norm"),
        ("mix_policy", "sometimes", "calibrl.mix_policy"),
        ("expert_overlong", "cut", "calibrl.expert_overlong"),
        ("loss_mode", "ppo", "['calibrl', 'grpo', 'luffy', 'rlplus']"),
        ("pass_rate_range", [0.8, 0.2], "calibrl.pass_rate_range"),
        ("pass_rate_range", [0.0, 1.5], "calibrl.pass_rate_range"),
        ("pass_rate_range", [0.5], "calibrl.pass_rate_range"),
        ("expert_key", "", "calibrl.expert_key"),
        ("norm_adv_by_std", "yes", "calibrl.norm_adv_by_std"),
        ("seeded_rollouts", 1, "calibrl.seeded_rollouts=1 must be true or false"),
        ("dump_dir", "  ", "calibrl.dump_dir='  ' must be null or a directory path"),
        ("n_onpolicy", 0, "calibrl.n_onpolicy=0 must be an integer >= 1"),
        ("n_onpolicy", 2.5, "calibrl.n_onpolicy=2.5 must be an integer >= 1"),
        ("n_onpolicy", True, "calibrl.n_onpolicy=True must be an integer >= 1"),
        ("all_wrong_weight", -0.1, "calibrl.all_wrong_weight"),
        ("allow_verl_mismatch", "yes", "calibrl.allow_verl_mismatch='yes' must be true or false"),
        ("worker_check_s", 0, "calibrl.worker_check_s=0 must be a number in [0.1, inf]"),
        ("weight_sync_timeout_s", 0.5, "calibrl.weight_sync_timeout_s=0.5 must be a number in [1.0, inf]"),
        ("weight_sync_timeout_s", "10m", "calibrl.weight_sync_timeout_s"),
    ],
)
def test_invalid_values_fail_naming_the_key(key, value, needle):
    with pytest.raises(CalibRLConfigError) as err:
        CalibRLConfig.from_config({key: value})
    assert needle in str(err.value)


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(CalibRLConfigError, match=r"unknown key\(s\) calibrl.alpah; allowed keys: .*'alpha'"):
        CalibRLConfig.from_config({"alpah": 0.3})


@pytest.mark.parametrize("mode", ["calibrl", "luffy", "rlplus"])
def test_expert_modes_need_experts(mode):
    with pytest.raises(CalibRLConfigError, match="calibrl.experts_per_group=0"):
        CalibRLConfig(loss_mode=mode, experts_per_group=0)


def test_grpo_baseline_adds_no_expert_rows():
    cfg = CalibRLConfig(loss_mode="grpo")
    assert cfg.n_expert == 0 and not cfg.needs_expert_column
    assert CalibRLConfig(loss_mode="grpo", experts_per_group=0).n_expert == 0
    assert CalibRLConfig(experts_per_group=2).n_expert == 2


@pytest.mark.parametrize("kwargs,n", [({}, 11), ({"loss_mode": "grpo"}, 10), ({"loss_mode": "luffy"}, 11),
                                      ({"n_onpolicy": 4, "experts_per_group": 2, "loss_mode": "rlplus"}, 6),
                                      ({"n_onpolicy": 4, "experts_per_group": 2, "loss_mode": "grpo"}, 4)])
def test_rollout_n_counts_the_on_policy_samples_and_the_mode_s_expert_rows(kwargs, n):
    assert CalibRLConfig(**kwargs).rollout_n == n


def test_warmup_is_counted_from_verl_step_one_and_must_fit_the_run():
    cfg = CalibRLConfig(warmup_grpo_steps=2)
    assert [cfg.in_warmup(s) for s in (1, 2, 3)] == [True, True, False]
    assert not CalibRLConfig().in_warmup(1)
    cfg.check_run_length(3)
    with pytest.raises(CalibRLConfigError, match="calibrl.warmup_grpo_steps=2 >= the run's 2 training steps"):
        cfg.check_run_length(2)
