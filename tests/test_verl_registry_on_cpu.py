"""CalibRL is registered in verl 0.9.1's own registries, in every process that imports verl."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensordict import NonTensorData, TensorDict
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_adv_estimator_fn, get_policy_loss_fn
from verl.workers.config import FSDPActorConfig

from calibrl_verl import core_algos as ca
from calibrl_verl.config import CalibRLConfig
from calibrl_verl.integration import actor_loss
from calibrl_verl.integration.registry import ADV_EXTRAS, CalibRLCallError

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


# -- the context path production uses -------------------------------------------------------------------------
# The trainer sets ``registry.ADV_EXTRAS`` around verl's advantage stage and ``actor_loss.calibrl_actor_loss`` sets
# ``registry.LOSS_EXTRAS`` around verl's ``ppo_loss``: verl's stock call sites then reach the registered estimator /
# loss with only their standard arguments. Expected values below are written out per row from the rules.

def _lrelu(x: float, alpha: float) -> float:
    return x if x > 0 else alpha * x


def _ppo_token(adv: float, log_prob: float, old: float, clip: float = 0.2, clip_c: float = 3.0) -> float:
    """PPO's clipped surrogate for one token, with the dual clip for negative advantages (verl's defaults)."""
    ratio = math.exp(log_prob - old)
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - clip), 1 + clip))
    return min(loss, -adv * clip_c) if adv < 0 else loss


# one step: (key, reward, response length, expert row?, padding row?, group uses its expert?)
_STEP = [("g1_0_0", 1.0, 3, False, False, True), ("g1_1_0", 0.0, 2, False, False, True),
         ("g1_2_0", 0.1, 4, False, False, True), ("g1_3_0", 1.1, 3, True, False, True),
         ("g2_0_0", 0.0, 2, False, False, False), ("g2_1_0", 0.0, 3, False, False, False),
         ("g2_2_0", 1.1, 2, True, False, False),
         ("pad9_0_0", 0.0, 1, False, True, False)]


def _expected_advantages(mode: str, norm: bool) -> list[float]:
    """Per row: on-policy A = r - mean_on (/ (std_on + 1e-6)), 0 in a group of equal rewards; expert rows 0, or
    A_e = r_e - mean_on (same division) for LUFFY / RL-PLUS when the group uses its expert; padding 0."""
    out = []
    for key, reward, _, expert, pad, uses in _STEP:
        if pad:
            out.append(0.0)
            continue
        group = [r for k, r, _, e, p, _ in _STEP if k.split("_")[0] == key.split("_")[0] and not e and not p]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        centred = (reward - mean) / (std + 1e-6) if norm else reward - mean
        if expert:
            out.append(centred if uses and mode in ("luffy", "rlplus") else 0.0)
        else:
            out.append(0.0 if max(group) == min(group) else centred)
    return out


@pytest.mark.parametrize(("mode", "norm"), [("calibrl", False), ("calibrl", True), ("luffy", False),
                                            ("rlplus", True)])
def test_verls_advantage_stage_reaches_the_estimator_through_the_trainers_context(mode, norm):
    from verl.protocol import DataProto
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    width = max(n for _, _, n, *_ in _STEP)
    mask = torch.tensor([[float(t < n and not pad) for t in range(width)] for _, _, n, _, pad, _ in _STEP])
    rewards = torch.zeros(len(_STEP), width)
    for i, (_, reward, n, *_) in enumerate(_STEP):
        rewards[i, n - 1] = reward  # an outcome reward on the last response token, as verl's reward loop writes it
    expert = torch.tensor([e for *_, e, _, _ in _STEP])
    pad = torch.tensor([p for *_, p, _ in _STEP])
    uses = torch.tensor([u for *_, u in _STEP])
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask},
                               non_tensors={"uid": np.array([k.rsplit("_", 2)[0] for k, *_ in _STEP], dtype=object)})
    token = ADV_EXTRAS.set({"is_expert": expert | pad, "norm_adv_by_std": norm, "is_padding": pad,
                            "expert_rows": (expert & uses) if mode != "calibrl" else None})
    try:  # verl's own V1 call, as its _compute_advantage makes it (verl passes its GRPO flag; ours wins)
        out = compute_advantage_for_multi_trajectories(data, batch_keys=[k for k, *_ in _STEP], adv_estimator="calibrl",
                                                       num_repeat=4, norm_adv_by_std_in_grpo=not norm, config=None)
    finally:
        ADV_EXTRAS.reset(token)
    want = torch.tensor(_expected_advantages(mode, norm)).unsqueeze(-1) * mask
    torch.testing.assert_close(out.batch["advantages"], want)
    if norm:
        assert want.abs().max() > 1.0  # the division by the std changed the values
    with pytest.raises(CalibRLCallError):  # the context does not outlive the stage
        compute_advantage_for_multi_trajectories(data, batch_keys=[k for k, *_ in _STEP], adv_estimator="calibrl")


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


# a micro-batch: (prompt length, adv, correct, expert row?, expert length for its group (0: none), new-old deltas)
_ROWS = [(3, 0.5, True, False, 3, [0.1, -0.3, 0.25, 0.0, 0.05]),
         (2, -0.5, False, False, 3, [-0.25, 0.3, 0.1]),
         (4, 0.75, True, False, 6, [0.02, 0.4]),
         (3, -0.25, False, False, 0, [0.1, -0.1, 0.2, 0.3])]
_EXPERT_ROW = (2, 0.6, True, True, 0, [0.0, -0.15, 0.35])


def _micro_batch(mode: str, gen: torch.Generator, n_tokens: float, n_responses: int):
    """The micro-batch verl's engine hands ``calibrl_actor_loss``, the model output, and the same values as lists."""
    rows = _ROWS + ([_EXPERT_ROW] if mode != "calibrl" else [])
    ref = []
    for prompt_len, adv, correct, expert, e_len, deltas in rows:
        n = len(deltas)
        old = (-torch.rand(n, generator=gen) * 2).tolist()
        e_lp = (-torch.rand(max(e_len, 1), generator=gen) * 2).tolist()[:e_len]
        ref.append({"prompt_len": prompt_len, "adv": adv, "correct": correct, "expert": expert, "old": old,
                    "new": [o + d for o, d in zip(old, deltas, strict=True)], "e_lp": e_lp,
                    "entropy": (torch.rand(n, generator=gen) + 0.5).tolist()})
    as_t = torch.tensor

    def model_seq(values: list[float], prompt_len: int) -> torch.Tensor:  # value of response token t at p - 1 + t
        return torch.cat([torch.zeros(prompt_len - 1), as_t(values), torch.zeros(1)])

    data = TensorDict({
        "prompts": _nested([torch.ones(r["prompt_len"], dtype=torch.long) for r in ref]),
        "responses": _nested([torch.ones(len(r["old"]), dtype=torch.long) for r in ref]),
        "response_mask": _nested([torch.ones(len(r["old"])) for r in ref]),
        "old_log_probs": _nested([as_t(r["old"]) for r in ref]),
        "advantages": _nested([torch.full((len(r["old"]),), r["adv"]) for r in ref]),
        actor_loss.EXPERT_LOG_PROB: _nested([as_t([r["e_lp"][t] if t < len(r["e_lp"]) else 0.0
                                                   for t in range(len(r["old"]))]) for r in ref]),
        actor_loss.EXPERT_MASK: _nested([as_t([float(t < len(r["e_lp"])) for t in range(len(r["old"]))])
                                         for r in ref]),
        actor_loss.EXPERT_BASELINE: as_t([sum(r["e_lp"]) for r in ref]),
        actor_loss.CORRECT: as_t([float(r["correct"]) for r in ref]),
        actor_loss.IS_EXPERT: as_t([float(r["expert"]) for r in ref]),
    }, batch_size=[len(ref)])
    data["dp_size"], data["batch_num_tokens"] = NonTensorData(1), NonTensorData(n_tokens)
    data["global_batch_size"] = NonTensorData(n_responses)
    output = {"log_probs": _nested([model_seq(r["new"], r["prompt_len"]) for r in ref]),
              "entropy": _nested([model_seq(r["entropy"], r["prompt_len"]) for r in ref])}
    return data, output, ref


def _expected_loss(mode: str, gap: str, ref: list[dict], n_tokens: float, n_responses: int, cfg: CalibRLConfig,
                   entropy_coeff: float) -> tuple[float, float]:
    """(loss, the mode's extra term) from the rules, one row and token at a time (global token normalisation):

    pg: PPO clipped surrogate over on-policy tokens / N_tokens;
    calibrl token gap: |A| LeakyReLU_alpha(-s (log p_t - l^e_t)) over guided rows' tokens (l^e_t = 0 past the
    expert, tail=zero) / N_tokens; sequence gap: |A| LeakyReLU_alpha(-s (sum_t log p_t - sum l^e)) / N_responses;
    LUFFY: -A_e p/(p + 0.1) on expert tokens / N_tokens; RL-PLUS: -A_e p/(0.75 p_old + 0.25) (1 - p)^0.5;
    loss = pg + guide_coef * guide (calibrl) or pg + expert term, minus entropy_coeff * (sum of entropy / N_tokens).
    """
    pg = extra = entropy = 0.0
    for r in ref:
        entropy += sum(r["entropy"]) / n_tokens
        if r["expert"]:
            for new, old in zip(r["new"], r["old"], strict=True):
                p = math.exp(new)
                shaped = p / (p + 0.1) if mode == "luffy" else p / (0.75 * math.exp(old) + 0.25) * (1 - p) ** 0.5
                extra += -r["adv"] * shaped / n_tokens
            continue
        pg += sum(_ppo_token(r["adv"], new, old) for new, old in zip(r["new"], r["old"], strict=True)) / n_tokens
        if mode != "calibrl" or not r["e_lp"]:
            continue
        sign = 1.0 if r["correct"] else -1.0
        if gap == "token":
            for t, new in enumerate(r["new"]):
                le = r["e_lp"][t] if t < len(r["e_lp"]) else 0.0
                extra += abs(r["adv"]) * _lrelu(-sign * (new - le), cfg.alpha) / n_tokens
        else:
            extra += abs(r["adv"]) * _lrelu(-sign * (sum(r["new"]) - sum(r["e_lp"])), cfg.alpha) / n_responses
    coef = cfg.guide_coef if mode == "calibrl" else 1.0
    return pg + coef * extra - entropy_coeff * entropy, extra


@pytest.mark.parametrize(("mode", "gap", "entropy_coeff"), [("calibrl", "token", 0.0), ("calibrl", "token", 0.01),
                                                             ("calibrl", "sequence", 0.01), ("luffy", "token", 0.01),
                                                             ("rlplus", "token", 0.01)])
def test_the_actor_loss_reaches_the_registered_loss_through_verls_ppo_loss(mode, gap, entropy_coeff):
    """``calibrl_actor_loss`` on a verl-shaped micro-batch carrying the trainer's calibrl_* fields, through verl's
    real ``ppo_loss`` (which adds the entropy bonus): the loss is pg + the mode's term - entropy_coeff * entropy."""
    from verl.workers.config import PolicyLossConfig

    from calibrl_verl.integration.actor_loss import calibrl_actor_loss
    from calibrl_verl.integration.registry import LOSS_EXTRAS

    cfg = CalibRLConfig(loss_mode=mode, gap=gap, guide_coef=0.3, alpha=0.4)
    n_tokens, n_responses = 30.0, 8  # the mini-batch's counts (this micro-batch is part of it)
    data, output, ref = _micro_batch(mode, torch.Generator().manual_seed(11), n_tokens, n_responses)
    actor_cfg = FSDPActorConfig(strategy="fsdp2", rollout_n=4, ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=2,
                                policy_loss=PolicyLossConfig(loss_mode=mode), entropy_coeff=entropy_coeff,
                                clip_ratio=0.2, clip_ratio_c=3.0)
    loss, metrics = calibrl_actor_loss(actor_cfg, output, data, calibrl=cfg)
    want, extra = _expected_loss(mode, gap, ref, n_tokens, n_responses, cfg, entropy_coeff)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert extra != 0.0 and LOSS_EXTRAS.get() is None
    if entropy_coeff:
        assert metrics["actor/entropy_loss"].values == [pytest.approx(sum(sum(r["entropy"]) for r in ref) / n_tokens,
                                                                      rel=1e-5)]
