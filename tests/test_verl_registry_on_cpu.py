"""CalibRL is registered in verl 0.9.1's own registries, in every process that imports verl."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_adv_estimator_fn, get_policy_loss_fn
from verl.workers.config import FSDPActorConfig

from calibrl_verl import core_algos as ca
from calibrl_verl.config import CalibRLConfig
from calibrl_verl.integration.registry import CalibRLCallError

_PROBE = (
    "import json, verl\n"
    "from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY as A, POLICY_LOSS_REGISTRY as P\n"
    "print(json.dumps({'adv': 'calibrl' in A, 'loss': sorted(k for k in ('calibrl', 'luffy', 'rlplus') if k in P),"
    " 'mod': A['calibrl'].__module__ if 'calibrl' in A else None}))\n"
)


def _probe(**env: str) -> dict:
    """Import verl (only verl) in a fresh interpreter and report what its registries hold."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=full_env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plain_import_verl_registers_calibrl_through_the_entry_point():
    got = _probe()
    assert got == {"adv": True, "loss": ["calibrl", "luffy", "rlplus"], "mod": "calibrl_verl.integration.registry"}


def test_registration_comes_from_verl_plugin_loading():
    """With verl's entry-point discovery off nothing registers; verl's VERL_USE_EXTERNAL_MODULES brings it back."""
    assert _probe(VERL_USE_EXTERNAL_PLUGINS="none")["adv"] is False
    got = _probe(VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="calibrl_verl.plugin")
    assert got["adv"] is True and got["loss"] == ["calibrl", "luffy", "rlplus"]


def test_ray_worker_processes_see_the_registration():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        @ray.remote
        def probe() -> tuple[bool, bool, int]:
            import verl.trainer.ppo.core_algos as core

            return "calibrl" in core.ADV_ESTIMATOR_REGISTRY, "calibrl" in core.POLICY_LOSS_REGISTRY, os.getpid()

        adv, loss, pid = ray.get(probe.remote(), timeout=120)
        assert adv and loss and pid != os.getpid()
    finally:
        ray.shutdown()


def _actor_config() -> FSDPActorConfig:
    return FSDPActorConfig(strategy="fsdp2", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2)


def test_stock_call_sites_get_a_clear_error_not_plain_grpo():
    rewards = torch.ones(2, 3)
    with pytest.raises(CalibRLCallError, match=r"without \['is_expert'\].*calibrl_verl.main_calibrl"):
        get_adv_estimator_fn("calibrl")(token_level_rewards=rewards, response_mask=torch.ones(2, 3),
                                        config=None, index=np.array(["a", "a"], dtype=object))
    lp = torch.zeros(2, 3)
    for name, missing in (("calibrl", "expert_log_prob"), ("luffy", "is_expert"), ("rlplus", "is_expert")):
        with pytest.raises(CalibRLCallError, match=missing):
            get_policy_loss_fn(name)(old_log_prob=lp, log_prob=lp, advantages=lp, response_mask=torch.ones(2, 3),
                                     loss_agg_mode="token-mean", config=_actor_config(), rollout_is_weights=None)


def test_registered_estimator_is_the_core_function():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 1.1]])
    index = np.array(["a", "a", "a"], dtype=object)
    is_expert = torch.tensor([False, False, True])
    got, _ = get_adv_estimator_fn("calibrl")(token_level_rewards=rewards, response_mask=torch.ones(3, 2),
                                             index=index, config=None, is_expert=is_expert)
    want, _ = ca.compute_calibrl_advantage(rewards, torch.ones(3, 2), index, is_expert)
    torch.testing.assert_close(got, want)


def _batch(seed: int = 0, rows: int = 4, length: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "old_log_prob": -torch.rand(rows, length, generator=gen),
        "log_prob": -torch.rand(rows, length, generator=gen),
        "advantages": torch.randn(rows, 1, generator=gen).expand(rows, length).contiguous(),
        "response_mask": (torch.rand(rows, length, generator=gen) > 0.2).float(),
    }


def test_calibrl_policy_loss_is_verl_ppo_plus_lambda_guide():
    b = _batch()
    cfg = CalibRLConfig(guide_coef=0.3, alpha=0.4)
    extra = {"expert_log_prob": -torch.rand(4, 6), "expert_mask": torch.rand(4, 6) > 0.3,
             "correct": torch.tensor([True, False, True, False])}
    loss, metrics = get_policy_loss_fn("calibrl")(**b, loss_agg_mode="token-mean", config=_actor_config(),
                                                  rollout_is_weights=None, calibrl=cfg, **extra)
    pg, _ = compute_policy_loss_vanilla(**b, loss_agg_mode="token-mean", config=_actor_config())
    guide, _ = ca.compute_calibrl_guide_loss(b["log_prob"], advantages=b["advantages"],
                                             response_mask=b["response_mask"], alpha=0.4, **extra)
    assert loss.item() == pytest.approx(pg.item() + 0.3 * guide.item(), rel=1e-6)
    assert metrics["calibrl/guide_loss"] == pytest.approx(guide.item(), rel=1e-6)
    assert 0.0 <= metrics["calibrl/gate_full_frac"] <= 1.0 and "actor/pg_clipfrac" in metrics


@pytest.mark.parametrize("name", ["luffy", "rlplus"])
def test_offpolicy_baselines_split_tokens_between_ppo_and_expert_shaping(name):
    b = _batch(1)
    is_expert = torch.tensor([False, False, False, True])
    cfg = _actor_config()
    loss, metrics = get_policy_loss_fn(name)(**b, loss_agg_mode="token-mean", config=cfg, rollout_is_weights=None,
                                             is_expert=is_expert)
    n_tokens = b["response_mask"].sum()
    onpolicy = b["response_mask"] * (~is_expert).float().unsqueeze(-1)
    cfg.global_batch_info["batch_num_tokens"] = n_tokens  # the whole update's token count, as verl passes it
    pg, _ = compute_policy_loss_vanilla(b["old_log_prob"], b["log_prob"], b["advantages"], onpolicy, config=cfg)
    if name == "luffy":
        token_loss = ca.luffy_expert_token_loss(b["log_prob"], b["advantages"])
    else:
        token_loss = ca.rlplus_expert_token_loss(b["log_prob"], b["old_log_prob"], b["advantages"])
    expert = (token_loss * b["response_mask"])[3].sum() / n_tokens
    assert loss.item() == pytest.approx(pg.item() + expert.item(), rel=1e-5)
    assert metrics[f"calibrl/{name}_expert_loss"] == pytest.approx(expert.item(), rel=1e-5)
