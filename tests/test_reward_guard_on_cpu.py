"""Runtime faults: a reward function that raises or returns NaN, and a non-finite gradient.

The reward guard is loaded and called by verl's own loader (``get_custom_reward_fn``) and reward manager
(``NaiveRewardManager.run_single``); the optimizer skip is verl's own ``FSDPEngine.optimizer_step``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_module

from calibrl_verl.config import CalibRLConfigError
from calibrl_verl.integration import reward_guard
from calibrl_verl.integration.step_fields import fault_metrics
from calibrl_verl.main_calibrl import install_reward_guard, prepare_config

USER_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):
    if "boom" in solution_str:
        raise RuntimeError("parser exploded")
    if "nan" in solution_str:
        return float("nan")
    if "nokey" in solution_str:
        return {"acc": 1.0}
    if "plain" in solution_str:
        return 0.25
    right = float(solution_str.strip() == ground_truth)
    return {"score": right + bonus, "acc": right}


async def compute_score_async(**kwargs):
    return compute_score(**kwargs)
'''


@pytest.fixture
def user_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "my_reward.py"
    path.write_text(USER_REWARD)
    monkeypatch.setitem(reward_guard._state, "faults", 0)
    reward_guard.load_inner.cache_clear()
    return path


def _config(*overrides: str):
    with initialize_config_module(config_module="calibrl_verl.config", version_base=None):
        return compose("calibrl_trainer", overrides=list(overrides))


def _verl_reward_fn(config):
    from verl.trainer.ppo.reward import get_custom_reward_fn

    return get_custom_reward_fn(config)


def _call(fn, response: str, truth: str = "4"):
    return fn(data_source="geo", solution_str=response, ground_truth=truth, extra_info={})


def test_faulty_samples_score_zero_are_counted_and_logged_once(user_reward: Path, caplog) -> None:
    config = _config(f"reward.custom_reward_function.path={user_reward}",
                     "+reward.custom_reward_function.reward_kwargs.bonus=0.5")
    prepare_config(config)
    assert config.reward.custom_reward_function.path == reward_guard.GUARD_PATH
    fn = _verl_reward_fn(config)
    with caplog.at_level(logging.WARNING, logger=reward_guard.__name__):
        good = _call(fn, "4")
        faults = [_call(fn, r) for r in ("boom", "nan", "nokey", "boom again")]
        plain = _call(fn, "plain")
    # the user's own kwargs still reach it; its result is kept and marked fault-free
    assert good == {"score": 1.5, "acc": 1.0, "reward_fault": 0.0}
    assert plain == {"score": 0.25, "reward_fault": 0.0}
    assert faults == [reward_guard.FAULT_RESULT] * 4
    assert reward_guard._state["faults"] == 4
    warnings = [r for r in caplog.records if r.name == reward_guard.__name__]
    assert len(warnings) == 1  # the first fault only, with its input and traceback
    text = warnings[0].getMessage()
    assert "parser exploded" in text and "'boom'" in text and "ground_truth='4'" in text and "Traceback" in text


def test_verls_reward_manager_stores_the_fault_for_the_trainer(user_reward: Path, tmp_path: Path) -> None:
    """Through verl's NaiveRewardManager: the sample's reward is 0 and `reward_fault` reaches the extra info."""
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    from calibrl_verl.tiny.models import build_tokenizer
    from calibrl_verl.tiny.task import tokenizer_corpus

    config = _config(f"reward.custom_reward_function.path={user_reward}",
                     "reward.custom_reward_function.name=compute_score_async")
    prepare_config(config)
    assert config.reward.custom_reward_function.name == "guarded_score_async"
    tokenizer = build_tokenizer(tokenizer_corpus(0, n=40))
    manager = NaiveRewardManager(config, tokenizer, _verl_reward_fn(config))

    def row(response: str) -> DataProto:
        prompt = tokenizer("How many circles?", return_tensors="pt")["input_ids"]
        resp = tokenizer(response, return_tensors="pt")["input_ids"]
        return DataProto.from_dict(
            tensors={"prompts": prompt, "responses": resp,
                     "attention_mask": torch.ones(1, prompt.shape[1] + resp.shape[1], dtype=torch.long)},
            non_tensors={"data_source": ["geo"], "reward_model": [{"ground_truth": "4"}], "extra_info": [{}]},
        )

    bad = manager.loop.run_until_complete(manager.run_single(row("nan")))
    good = manager.loop.run_until_complete(manager.run_single(row("4")))
    assert bad["reward_score"] == 0.0 and bad["reward_extra_info"]["reward_fault"] == 1.0
    assert good["reward_score"] == 1.0 and good["reward_extra_info"]["reward_fault"] == 0.0


def test_trainer_counts_reward_faults_and_skipped_updates() -> None:
    extra = [{"reward_extra_info": {"reward_fault": 1.0}}, {"reward_extra_info": {"reward_fault": 0.0}},
             {"reward_extra_info": {"score": 1.0}}, {}, {"reward_extra_info": {"reward_fault": 1.0}}]
    padding = [False, False, False, False, True]  # a padding row copies row 0: never counted
    assert fault_metrics(extra, padding, 0.3) == {"calibrl/reward_faults": 1.0, "calibrl/skipped_update": 0.0}
    assert fault_metrics(extra, padding, float("nan"))["calibrl/skipped_update"] == 1.0
    assert fault_metrics(extra, padding, float("inf"))["calibrl/skipped_update"] == 1.0
    assert fault_metrics([], [], None) == {"calibrl/reward_faults": 0.0, "calibrl/skipped_update": 0.0}


def test_a_wrong_reward_path_fails_before_ray(tmp_path: Path) -> None:
    config = _config(f"reward.custom_reward_function.path={tmp_path / 'missing.py'}")
    with pytest.raises(CalibRLConfigError, match="missing.py"):
        prepare_config(config)
    config = _config("reward.custom_reward_function.name=no_such_function")
    with pytest.raises(CalibRLConfigError, match="no_such_function"):
        prepare_config(config)


def test_guard_off_and_no_custom_function_leave_verls_config_alone(user_reward: Path) -> None:
    config = _config(f"reward.custom_reward_function.path={user_reward}", "calibrl.reward_guard=false")
    prepare_config(config)
    assert config.reward.custom_reward_function.path == str(user_reward)
    config = _config("reward.custom_reward_function.path=null")  # verl's built-in scorers / a reward model
    prepare_config(config)
    assert config.reward.custom_reward_function.path is None
    config = _config(f"reward.custom_reward_function.path={user_reward}")
    install_reward_guard(config)
    install_reward_guard(config)  # idempotent: the guard never wraps itself
    assert config.reward.custom_reward_function.reward_kwargs[reward_guard.INNER_PATH_KEY] == str(user_reward)
    with pytest.raises(CalibRLConfigError, match="calibrl.reward_guard"):
        prepare_config(_config("calibrl.reward_guard=maybe"))


def test_legacy_top_level_reward_key_is_guarded_too(user_reward: Path) -> None:
    config = _config(f"custom_reward_function.path={user_reward}", "custom_reward_function.name=compute_score")
    prepare_config(config)
    assert config.reward.custom_reward_function.path == reward_guard.GUARD_PATH
    assert config.reward.custom_reward_function.reward_kwargs[reward_guard.INNER_PATH_KEY] == str(user_reward)
    assert all(v is None for v in config.custom_reward_function.values())  # verl's migration then leaves it


def test_verls_engine_skips_a_non_finite_gradient_step() -> None:
    """No NaN reaches the weights: verl's own optimizer_step skips the update when the grad norm is not finite
    (our trainer then logs calibrl/skipped_update=1, see test_trainer_counts_reward_faults_and_skipped_updates)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    model = torch.nn.Linear(4, 2)
    engine = SimpleNamespace(module=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                             optimizer_config=SimpleNamespace(clip_grad=1.0), scaler=None, _qat_enabled=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (model(torch.ones(1, 4)).sum() * float("nan")).backward()
    grad_norm = FSDPEngine.optimizer_step(engine)
    assert not torch.isfinite(torch.tensor(grad_norm))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fault_metrics([], [], grad_norm)["calibrl/skipped_update"] == 1.0
    model(torch.ones(1, 4)).sum().backward()  # a finite step still updates
    assert FSDPEngine.optimizer_step(engine) > 0
    assert not torch.equal(before["weight"], model.weight)
