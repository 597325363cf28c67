"""The coverage study's navigation task (``--family wall``): the generator against the published definition, the
tokenizer and model as verl and transformers reload them, the exact-match reward, the closed-form pass@k measure
and the build.

Expected values come from the task's definition (arXiv 2505.22756, v5), re-derived here step by step, never from
the generator's own helpers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from calibrl_verl.reward import compute_score, graded_text
from calibrl_verl.tiny import text_model_dir, train_files, val_files
from calibrl_verl.tiny import wall_task as w
from calibrl_verl.tiny.build import main as build_main

SEED = 3
WORLD = w.make_world(SEED)


def parse_prompt(prompt: str) -> dict[str, list[int]]:
    """The prompt's fields, read with a regular expression written from the definition."""
    match = re.fullmatch(r"S (\d+)((?: P \d+ C \d+)*) P (\d+)((?: I \d+){10}) :", prompt)
    assert match, prompt
    pairs = [int(x) for x in re.findall(r"\d+", match.group(2))]
    return {"s0": [int(match.group(1))], "problem": pairs[0::2] + [int(match.group(3))], "context": pairs[1::2],
            "irrelevant": [int(x) for x in re.findall(r"\d+", match.group(4))]}


def test_world_tables_follow_the_definition() -> None:
    assert WORLD.next_state.shape == (20, 20) and WORLD.next_state.min() >= 0 and WORLD.next_state.max() < 20
    for row in WORLD.next_problem:  # a permutation per problem state: consecutive problem states name the action
        assert sorted(row.tolist()) == list(range(20))
    for table in (WORLD.sft_policy, WORLD.sft_context):
        assert table.shape == (20, 20) and np.allclose(table.sum(axis=1), 1.0)
    assert w.make_world(SEED).next_state.tolist() == WORLD.next_state.tolist()
    assert w.make_world(SEED + 1).next_state.tolist() != WORLD.next_state.tolist()


@pytest.mark.parametrize("split", ["sft", "train", "val"])
def test_problems_are_walks_of_the_world(split: str) -> None:
    """Prompt and completion of every problem, re-derived from the tables: the actions read off the problem-state
    chain (inverse permutation) reproduce the completion's actions, and the states follow next_state."""
    for problem in w.make_problems(WORLD, 200, SEED, split):
        fields = parse_prompt(problem.prompt)
        n = len(fields["context"])
        assert 5 <= n <= 10 and len(fields["problem"]) == n + 1 and len(fields["irrelevant"]) == 10
        actions = [int(np.flatnonzero(WORLD.next_problem[p] == q)[0])
                   for p, q in zip(fields["problem"], fields["problem"][1:], strict=False)]
        states = fields["s0"]
        for a in actions:
            states.append(int(WORLD.next_state[states[-1], a]))
        expected = " ".join(f"S {s} A {a}" for s, a in zip(states, actions, strict=False)) + f" S {states[-1]}"
        assert problem.completion == expected


def action_entropy(problems: list[w.Problem]) -> float:
    """Mean over states of the entropy (nats) of the empirical action distribution taken in that state."""
    counts = np.zeros((20, 20))
    for p in problems:
        for s, a in zip(p.states, p.actions, strict=False):
            counts[s, a] += 1
    probs = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean([-(row[row > 0] * np.log(row[row > 0])).sum() for row in probs]))


def context_agreement(problems: list[w.Problem]) -> float:
    """How often the context token is the most frequent one for its action (the spurious cue's strength)."""
    counts = np.zeros((20, 20))
    for p in problems:
        for a, c in zip(p.actions, p.contexts, strict=True):
            counts[a, c] += 1
    best = counts.argmax(axis=1)
    hits = sum(c == best[a] for p in problems for a, c in zip(p.actions, p.contexts, strict=True))
    return hits / sum(len(p.actions) for p in problems)


def test_sft_split_is_biased_and_rl_splits_are_uniform() -> None:
    """The regime the study needs: a concentrated SFT policy with spurious context, uniform RL and test draws.
    ln 20 = 3.00 nats is the uniform entropy; 2000 problems give ~15k actions, so the figures are stable."""
    sft = w.make_problems(WORLD, 2000, SEED, "sft")
    train = w.make_problems(WORLD, 2000, SEED, "train")
    assert action_entropy(train) > 2.9 > 2.3 > action_entropy(sft)
    assert context_agreement(sft) > 0.25 > 0.1 > context_agreement(train)  # uniform: 1/20
    assert [p.completion for p in w.make_problems(WORLD, 5, SEED, "val")] != [p.completion for p in train[:5]]
    assert [p.prompt for p in w.make_problems(WORLD, 5, SEED, "train")] == [p.prompt for p in train[:5]]
    with pytest.raises(ValueError, match="split 'test'"):
        w.make_problems(WORLD, 1, SEED, "test")


@pytest.mark.parametrize(
    ("response", "acc", "fmt"),
    [
        ("S 1 A 8 S 15 A 12 S 12", 1.0, 1.0),
        ("  S 1  A 8 S 15\nA 12 S 12 ", 1.0, 1.0),  # the words count, not the spacing
        ("S 1 A 8 S 15 A 12 S 13", 0.0, 1.0),  # the last state wrong
        ("S 1 A 8 S 15", 0.0, 1.0),  # stopped early
        ("S 1 A 8 S 15 A 12 S 12 A 3 S 4", 0.0, 1.0),  # went on
        ("S 1 A 8 S 15 A 12", 0.0, 0.0),  # ends on an action
        ("<think>x</think><answer>S 1 A 8 S 15 A 12 S 12</answer>", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_exact_match_reward(response: str, acc: float, fmt: float) -> None:
    """The task's reward is the exact match alone: score = acc, the format flag adds nothing."""
    assert compute_score(w.DATA_SOURCE, response, "S 1 A 8 S 15 A 12 S 12") == {"score": acc, "acc": acc,
                                                                                "format": fmt}


def test_other_sources_keep_the_think_answer_reward() -> None:
    assert compute_score("geometry3k", "S 1 A 8 S 15", "S 1 A 8 S 15")["acc"] == 0.0


def test_graded_text_is_what_the_reward_compares() -> None:
    """maj@K votes on the graded text: the whole completion (words re-joined) here, the answer block elsewhere."""
    assert graded_text(w.DATA_SOURCE, " S 1  A 8\nS 15 ") == "S 1 A 8 S 15"
    assert graded_text("geometry3k", "S 1 A 8 S 15") is None
    assert graded_text("geometry3k", "<think>x</think><answer>12</answer>") == "12"


@pytest.fixture(scope="module")
def wall_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small build through the CLI: 640 SFT problems (10 steps), 8 samples per problem in the probe."""
    root = tmp_path_factory.mktemp("wall")
    build_main(["--family", "wall", "--out", str(root), "--n-train", "12", "--n-val", "10", "--seed", str(SEED),
                "--warmstart-items", "640", "--eval-samples", "8"])
    return root


def test_build_writes_model_data_and_summary(wall_root: Path) -> None:
    info = json.loads((wall_root / "build_info.json").read_text())
    assert info["family"] == "wall" and info["warmstart"]["steps"] == 640 // 64
    assert info["warmstart"]["loss_last"] < info["warmstart"]["loss_first"]
    assert set(info["probe"]) == {"train", "val"} and info["probe"]["val"]["problems"] == 10
    rows = pq.read_table(train_files(wall_root)).to_pylist()
    assert len(rows) == 12 and pq.read_table(val_files(wall_root)).num_rows == 10
    expected = w.make_problems(w.make_world(SEED), 12, SEED, "train")
    for row, problem in zip(rows, expected, strict=True):
        assert row["data_source"] == w.DATA_SOURCE and row["prompt"] == [{"role": "user", "content": problem.prompt}]
        assert row["solution"] == row["reward_model"]["ground_truth"] == problem.completion
        assert compute_score(row["data_source"], row["solution"], row["reward_model"]["ground_truth"])["score"] == 1.0


def test_with_warmstart_steps_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--warmstart-items"):
        build_main(["--family", "wall", "--out", str(tmp_path), "--warmstart-steps", "5"])


def test_verl_and_transformers_reload_the_same_tokens(wall_root: Path) -> None:
    """verl's tokenizer loader and dataset see the word-level tokens the SFT trained on, and decoding keeps the
    spaces the exact-match reward compares (a qwen2 checkpoint would reload with another tokenizer class)."""
    from transformers import AutoModelForCausalLM
    from verl.utils import hf_processor, hf_tokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    path = str(text_model_dir(wall_root))
    tokenizer, reference = hf_tokenizer(path), w.build_tokenizer()
    assert hf_processor(path) is None and len(tokenizer) == 29 == len(w.vocabulary())
    problem = w.make_problems(w.make_world(SEED), 1, SEED, "train")[0]
    ids = reference(problem.completion, add_special_tokens=False)["input_ids"]
    assert tokenizer(problem.completion, add_special_tokens=False)["input_ids"] == ids and len(ids) == len(
        problem.completion.split())
    assert tokenizer.decode([*ids, tokenizer.eos_token_id], skip_special_tokens=True) == problem.completion
    config = OmegaConf.create({"prompt_key": "prompt", "image_key": None, "max_prompt_length": 128,
                               "filter_overlong_prompts": True, "filter_overlong_prompts_workers": None,
                               "truncation": "error", "return_raw_chat": True})
    dataset = RLHFDataset(data_files=[str(train_files(wall_root))], tokenizer=tokenizer, config=config, processor=None)
    rendered = tokenizer.apply_chat_template(dataset[0]["raw_prompt"], add_generation_prompt=True, tokenize=False)
    assert rendered == problem.prompt  # the template passes the bare prompt through
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 128 and model.config.vocab_size == 29


def reference_gold_logprob(model: Any, tokenizer: Any, problem: w.Problem, temperature: float) -> float:
    """log P_T(completion + EOS | prompt), one token at a time without padding or batching."""
    ids = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
    gold = tokenizer(problem.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    total = 0.0
    for token in gold:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        total += float(torch.log_softmax(logits / temperature, dim=-1)[token])
        ids.append(token)
    return total


def test_gold_logprob_is_the_probability_of_a_correct_sample(wall_root: Path) -> None:
    """Batched and padded, the closed-form measure equals a token-by-token reference at two temperatures."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(text_model_dir(wall_root)).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_model_dir(wall_root))
    problems = w.make_problems(w.make_world(SEED), 5, SEED, "val")  # lengths differ: padding is exercised
    assert len({len(p.actions) for p in problems}) > 1
    for temperature in (0.5, 1.0):
        got = w.gold_logprobs(model, tokenizer, problems, temperature, batch_size=3)
        want = [reference_gold_logprob(model, tokenizer, p, temperature) for p in problems]
        assert got.shape == (5,) and np.allclose(got, want, rtol=1e-4, atol=1e-3), (got, want)
        assert all(math.isfinite(v) and v < 0 for v in got)


def test_validator_checks_the_expert_in_the_task_grammar(wall_root: Path, tmp_path: Path) -> None:
    """The gold completions pass the data check (no think/answer format asked of them); a malformed one is counted
    with the task's name."""
    from calibrl_verl.data.validate import validate_parquet

    report = validate_parquet(train_files(wall_root), needs_expert=True)
    assert report.counts.get("expert_bad_format", 0) == 0, report.summary()
    rows = pq.read_table(train_files(wall_root)).to_pylist()
    rows[1]["solution"] = rows[1]["solution"] + " A"
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(train_files(wall_root)).from_pylist(rows), bad)
    report = validate_parquet(bad, needs_expert=True)
    assert report.counts["expert_bad_format"] == 1 and f"not in {w.DATA_SOURCE}'s format" in report.summary()
