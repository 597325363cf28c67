"""The expert data-source hook: verl's real RLHFDataset + CalibRLAgentLoop on a tiny Qwen2.5-VL processor with images.

The agent loop is verl's own (``SingleTurnAgentLoop.run``) with only the rollout server swapped; the sampled
sessions here talk to ``FixedServer``, a stand-in for vLLM (no model runs in this test).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from verl.experimental.agent_loop.agent_loop import DictConfigWrap
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from calibrl_verl.data.expert_column import expert_traces
from calibrl_verl.integration.agent_loop import (
    CalibRLAgentLoop,
    ExpertServer,
    expert_token_ids,
    request_seed,
)
from calibrl_verl.main_calibrl import prepare_config
from calibrl_verl.tiny.models import build_processor, build_tokenizer
from calibrl_verl.tiny.task import make_items, tokenizer_corpus, write_parquet


class FixedServer:
    """A rollout server that always answers the same tokens (what the sampled sessions would get from vLLM)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.calls = 0

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, **_):
        self.calls += 1
        self.prompt_ids = list(prompt_ids)
        self.sampling_params = dict(sampling_params)
        self.image_data = image_data
        return TokenOutput(token_ids=self.token_ids, log_probs=[-0.5] * len(self.token_ids),
                           extra_fields={"global_steps": 2, "min_global_steps": 2, "max_global_steps": 2})


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hook")
    tokenizer = build_tokenizer(tokenizer_corpus(0))
    processor = build_processor(tokenizer)
    path = write_parquet(make_items(4, 0, "train"), "train", Path(root) / "train.parquet")
    return {"tokenizer": tokenizer, "processor": processor, "path": str(path)}


def _config(*overrides: str):
    with initialize_config_module("calibrl_verl.config", version_base=None):
        cfg = compose("calibrl_trainer", overrides=["data.max_prompt_length=512", "data.max_response_length=64",
                                                    "calibrl.n_onpolicy=2", *overrides])
    prepare_config(cfg)
    return cfg


def _item(assets: dict, cfg, index: int = 0) -> dict:
    dataset = RLHFDataset(data_files=assets["path"], tokenizer=assets["tokenizer"], config=cfg.data,
                          processor=assets["processor"])
    return dataset[index]


def _run(assets: dict, cfg, item: dict, session_id: int, expert: bool, server=None, global_steps: int = 3):
    kwargs = {**item, "session_id": session_id, "calibrl_expert": torch.tensor(expert), "global_steps": global_steps}

    async def session():  # verl builds a loop per session inside its running event loop
        loop = CalibRLAgentLoop(trainer_config=DictConfigWrap(cfg), server_manager=server or FixedServer([5, 6, 7]),
                                tokenizer=assets["tokenizer"], processor=assets["processor"],
                                dataset_cls=RLHFDataset, data_config=DictConfigWrap(cfg.data),
                                hf_model_type="qwen2_5_vl")
        return await loop.run({"temperature": 1.0, "top_p": 1.0, "logprobs": True}, **kwargs), loop

    return asyncio.run(session())


def test_expert_session_returns_the_tokenised_solution_with_the_same_prompt_and_images(assets):
    cfg = _config()
    item = _item(assets, cfg)
    server = FixedServer([5, 6, 7])
    sampled, _ = _run(assets, cfg, item, session_id=0, expert=True, server=server)
    expert, loop = _run(assets, cfg, item, session_id=2, expert=True)
    tok = assets["tokenizer"]
    want = tok.encode(item["solution"], add_special_tokens=False) + [tok.eos_token_id]
    assert expert.response_ids == want
    assert expert.response_mask == [1] * len(want)
    assert expert.prompt_ids == sampled.prompt_ids == server.prompt_ids  # identical prompt tokens
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert expert.prompt_ids.count(image_pad) > 0
    assert expert.multi_modal_data["images"] and sampled.multi_modal_data["images"]
    assert expert.extra_fields["is_expert"] is True and sampled.extra_fields["is_expert"] is False
    assert expert.extra_fields["expert_truncated"] is False
    assert expert.response_logprobs == [0.0] * len(want)  # placeholder, replaced by old log-probs later
    assert isinstance(expert.extra_fields["min_global_steps"], int)
    assert isinstance(loop.server_manager, ExpertServer)
    assert sampled.response_ids == [5, 6, 7] and server.calls == 1


def test_sessions_without_the_marker_or_below_n_onpolicy_sample_from_the_policy(assets):
    cfg = _config()
    item = _item(assets, cfg, 1)
    for session_id, marker in ((1, True), (2, False)):
        server = FixedServer([9, 9])
        out, _ = _run(assets, cfg, item, session_id, marker, server)
        assert out.response_ids == [9, 9] and server.calls == 1 and out.extra_fields["is_expert"] is False


def test_overlong_expert_is_truncated_or_dropped(assets):
    item = _item(assets, _config())
    n_tokens = len(assets["tokenizer"].encode(item["solution"], add_special_tokens=False)) + 1
    short = max(n_tokens // 2, 1)
    cfg = _config(f"data.max_response_length={short}")
    out, _ = _run(assets, cfg, item, session_id=2, expert=True)
    assert len(out.response_ids) == short and out.extra_fields["expert_truncated"] is True
    dropped, _ = _run(assets, _config(f"data.max_response_length={short}", "calibrl.expert_overlong=drop"),
                      item, session_id=2, expert=True)
    assert dropped == []


def test_expert_token_ids_adds_no_special_tokens_and_one_end_token(assets):
    tok = assets["tokenizer"]
    ids, truncated = expert_token_ids(tok, "<think>3 circles</think><answer>3</answer>", 100, "truncate")
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1 and not truncated
    assert tok.decode(ids[:-1]) == "<think>3 circles</think><answer>3</answer>"
    assert expert_token_ids(tok, "a b c d e f g", 2, "drop") == (None, True)


def test_seeded_rollouts_give_each_request_a_seed_from_what_it_is(assets):
    """seed = f(rollout.seed, weight version, session, prompt tokens + pixels): not from arrival order or uid."""
    cfg = _config("calibrl.seeded_rollouts=true", "actor_rollout_ref.rollout.seed=7")
    item, other = _item(assets, cfg, 0), _item(assets, cfg, 1)

    def seed_of(item, session_id, global_steps=3, cfg=cfg):
        server = FixedServer([5])
        _run(assets, cfg, item, session_id, expert=False, server=server, global_steps=global_steps)
        return server.sampling_params.get("seed"), server

    seed, server = seed_of(item, 0)
    assert isinstance(seed, int) and 0 <= seed < 2**63
    assert seed == seed_of(item, 0)[0]  # the same request again: the same seed
    assert len({seed, seed_of(item, 1)[0], seed_of(item, 0, global_steps=4)[0], seed_of(other, 0)[0],
                seed_of(item, 0, cfg=_config("calibrl.seeded_rollouts=true"))[0]}) == 5
    assert server.sampling_params["temperature"] == 1.0  # the rest of the params pass through
    # the hash covers what the server received: prompt tokens and images (weight version = global_steps - 1)
    assert server.image_data and seed == request_seed(7, 2, 0, server.prompt_ids, server.image_data)
    assert seed_of(item, 0, cfg=_config())[0] is None  # off by default: vLLM samples from its own RNG


def test_request_seed_tells_images_with_the_same_prompt_tokens_apart():
    from PIL import Image

    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    prompt = [1, 2, 3]
    assert request_seed(0, 1, 0, prompt, [red]) == request_seed(0, 1, 0, prompt, [red.copy()])
    assert request_seed(0, 1, 0, prompt, [red]) != request_seed(0, 1, 0, prompt, [blue])
    assert request_seed(0, 1, 0, prompt, None) != request_seed(0, 1, 0, [1, 2, 4], None)


def test_each_expert_session_answers_with_its_own_drawn_trace(assets):
    """k = 2: sessions n_onpolicy and n_onpolicy + 1 answer with the trainer's two drawn traces (columns
    calibrl_expert_0 / _1), not twice the same one; without those columns a list column is read in order."""
    cfg = _config("calibrl.experts_per_group=2")
    item = _item(assets, cfg)
    tok = assets["tokenizer"]
    traces = ["<think>one</think><answer>1</answer>", "<think>two two</think><answer>2</answer>"]
    drawn = {"calibrl_expert_0": traces[1], "calibrl_expert_1": traces[0]}
    got = [_run(assets, cfg, {**item, **drawn}, session_id=s, expert=True)[0].response_ids for s in (2, 3)]
    assert got == [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in (traces[1], traces[0])]
    listed = [_run(assets, cfg, {**item, "solution": traces}, session_id=s, expert=True)[0].response_ids
              for s in (2, 3)]
    assert listed == [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in traces]


def test_expert_traces_reads_one_trace_or_a_list_and_drops_empty_ones():
    assert expert_traces("a") == ["a"]
    assert expert_traces(["a", " ", "", None, "b"]) == ["a", "b"]
    assert expert_traces(np.array(["x", "y"], dtype=object)) == ["x", "y"]
    assert expert_traces(None) == [] and expert_traces("  ") == []
