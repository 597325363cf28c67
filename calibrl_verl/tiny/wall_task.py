"""The "solution-tree navigation" task (``--family wall``): a published setting where GRPO hits a coverage wall.

The task is the synthetic v5 task of Qin, Park et al., "Decomposing Elements of Problem Solving: What 'Math' Does
RL Teach?" (arXiv 2505.22756), written anew from its definition:

- a world of ``N_STATES`` = 20 states and ``N_ACTIONS`` = 20 actions with a fixed random transition table
  ``next_state[s, a]``, and a "problem-state" chain whose transition ``next_problem[p, a]`` is a permutation of
  the problem states for each p, so two consecutive problem states name the action taken between them;
- a problem: a start state, 5-10 actions, the problem-state chain they produce, one context token per action and
  ``N_IRRELEVANT`` = 10 irrelevant tokens. Prompt ``S s0 P p0 C c0 P p1 ... P pn I x ... :``, completion
  ``S s0 A a0 S s1 A a1 ... S sn``; the reward is an exact match of the whole completion (1 or 0);
- the SFT split draws actions from a per-state Dirichlet(0.3) policy and context tokens from a per-action
  Dirichlet(0.3), so context is spuriously tied to the action; the RL and test splits draw both uniformly.

SFT therefore leaves a biased policy with spurious cues, and the test problems need action sequences (and
state transitions) that SFT rarely showed: the regime where, per the paper, GRPO raises pass@1 but not coverage.
The gold completion is a perfect expert for every problem (the ``solution`` column).

The model has their shape: 4 layers, hidden 128, 2 heads, over their word-level vocabulary of 29 tokens (a Llama
with attention biases, the Qwen2 architecture but for one bias; ``build_model`` says why not a Qwen2). The
SFT warm-start follows their recipe (a language-model loss on the whole text, AdamW, lr 1e-3, batch 64, one epoch,
linear schedule with 5% warm-up); ``DEFAULT_SFT_ITEMS`` sizes the SFT split (theirs has 200k problems).

    python -m calibrl_verl.tiny.build --family wall --out DIR [--n-train 128 --n-val 256 --warmstart-items N]

writes DIR/text_model (warm-started model + tokenizer), DIR/data/{train,val}.parquet (RL-train and test prompts,
the gold completion in ``solution``) and DIR/build_info.json.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATA_SOURCE = "calibrl_wall"
ABILITY = "navigation"
N_STATES = N_ACTIONS = N_PROBLEM_STATES = N_CONTEXT = 20
N_IRRELEVANT = 10
MIN_ACTIONS, MAX_ACTIONS = 5, 10
SFT_DIRICHLET = 0.3  # both the per-state action policy and the per-action context distribution of the SFT split
MARKERS = ("S", "P", "C", "A", "I")
PAD = "<pad>"  # also the EOS token, as in the paper's tokenizer
# the paper: 200k SFT problems, one epoch at batch 64 (3125 steps); 24k (375 steps) fits 2 cores in ~1-2 minutes
DEFAULT_SFT_ITEMS = 24_000
SFT_LR, SFT_BATCH, SFT_WARMUP_FRAC = 1e-3, 64, 0.05
# a completion has at most 4 * MAX_ACTIONS + 2 = 42 tokens, plus EOS
MAX_COMPLETION_TOKENS = 4 * MAX_ACTIONS + 3


@dataclass(frozen=True)
class World:
    """The fixed tables of one task instance (everything a seed decides before any problem is drawn)."""

    next_state: np.ndarray  # [state, action] -> state
    next_problem: np.ndarray  # [problem state, action] -> problem state; each row a permutation
    sft_policy: np.ndarray  # [state, action] -> probability, SFT split only
    sft_context: np.ndarray  # [action, context] -> probability, SFT split only


@dataclass(frozen=True)
class Problem:
    """One problem: the chains it is made of, and its prompt and gold completion as text."""

    states: tuple[int, ...]
    problem_states: tuple[int, ...]
    contexts: tuple[int, ...]
    actions: tuple[int, ...]
    irrelevant: tuple[int, ...]

    @property
    def prompt(self) -> str:
        """``S s0 P p0 C c0 P p1 ... C c(n-1) P pn I x1 ... I x10 :``"""
        parts = [f"S {self.states[0]}"]
        for i, p in enumerate(self.problem_states):
            parts.append(f"P {p}")
            if i < len(self.contexts):
                parts.append(f"C {self.contexts[i]}")
        parts += [f"I {x}" for x in self.irrelevant]
        return " ".join(parts) + " :"

    @property
    def completion(self) -> str:
        """``S s0 A a0 S s1 ... A a(n-1) S sn``: the expert trace and the exact-match ground truth."""
        parts = []
        for i, s in enumerate(self.states):
            parts.append(f"S {s}")
            if i < len(self.actions):
                parts.append(f"A {self.actions[i]}")
        return " ".join(parts)

    def chat_messages(self) -> list[dict[str, str]]:
        """The prompt as the parquet's chat messages (the text tasks' item interface, read by the tiny sampler)."""
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class TextProblem:
    """A problem as its parquet row stores it, prompt and gold completion text: all that ``encode`` reads."""

    prompt: str
    completion: str


def make_world(seed: int) -> World:
    """The tables of the task instance ``seed`` (drawn in a fixed order, so a seed always gives the same world)."""
    rng = np.random.default_rng([seed, 0])
    next_state = rng.integers(0, N_STATES, size=(N_STATES, N_ACTIONS))
    next_problem = np.stack([rng.permutation(N_PROBLEM_STATES)[:N_ACTIONS] for _ in range(N_PROBLEM_STATES)])
    sft_policy = rng.dirichlet(np.full(N_ACTIONS, SFT_DIRICHLET), size=N_STATES)
    sft_context = rng.dirichlet(np.full(N_CONTEXT, SFT_DIRICHLET), size=N_ACTIONS)
    return World(next_state, next_problem, sft_policy, sft_context)


SPLITS = {"sft": 1, "train": 2, "val": 3}  # stream ids: the splits are independent streams of one world


def make_problems(world: World, n: int, seed: int, split: str) -> list[Problem]:
    """``n`` problems of ``split``: ``sft`` draws actions and contexts from the biased tables, ``train`` (the RL
    prompts) and ``val`` (the held-out test prompts) draw both uniformly."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split]])
    biased = split == "sft"
    problems = []
    for _ in range(n):
        n_actions = int(rng.integers(MIN_ACTIONS, MAX_ACTIONS + 1))
        states, problem_states = [int(rng.integers(N_STATES))], [int(rng.integers(N_PROBLEM_STATES))]
        actions, contexts = [], []
        for _ in range(n_actions):
            a = int(rng.choice(N_ACTIONS, p=world.sft_policy[states[-1]])) if biased else int(rng.integers(N_ACTIONS))
            c = int(rng.choice(N_CONTEXT, p=world.sft_context[a])) if biased else int(rng.integers(N_CONTEXT))
            actions.append(a)
            contexts.append(c)
            states.append(int(world.next_state[states[-1], a]))
            problem_states.append(int(world.next_problem[problem_states[-1], a]))
        irrelevant = tuple(int(x) for x in rng.integers(0, N_STATES, size=N_IRRELEVANT))
        problems.append(Problem(tuple(states), tuple(problem_states), tuple(contexts), tuple(actions), irrelevant))
    return problems


# --------------------------------------------------------------------------------------------- tokenizer, model

# The chat template passes the prompt through unchanged: verl renders every prompt with the tokenizer's chat
# template, and the paper's model sees the bare prompt.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def vocabulary() -> dict[str, int]:
    """The paper's word-level vocabulary: <unk>, <bos>, <pad>, ':', the five markers and the numbers 0-19."""
    words = ["<unk>", "<bos>", PAD, ":", *MARKERS, *(str(i) for i in range(N_STATES))]
    return {w: i for i, w in enumerate(words)}


def build_tokenizer() -> Any:
    """A word-level fast tokenizer (whitespace split), ``<pad>`` as pad and EOS, with the pass-through template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<bos>", pad_token=PAD,
                                        eos_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: Any, seed: int = 0) -> Any:
    """The paper's model shape, randomly initialised: 4 layers, hidden 128, MLP 512, 2 heads (head_dim 64), biases
    on the attention projections, untied embeddings.

    Saved as a Llama with ``attention_bias`` (Qwen2 is that architecture without the output-projection bias),
    not as a Qwen2: transformers 5 loads any ``model_type: qwen2`` checkpoint with Qwen2's own byte-level
    tokenizer class whatever the saved tokenizer is (its ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``), which
    re-splits the word-level vocabulary and decodes ``S 1 A 9`` as ``S1A9``: verl, vLLM and the reward would all
    see other text than the model was trained on. A Llama checkpoint reloads with the saved tokenizer itself.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, attention_bias=True, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


# -------------------------------------------------------------------------------------------------- SFT, probe


def encode(tokenizer: Any, problem: Problem | TextProblem, whole_text: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: the prompt, then the gold completion and EOS. The labels cover the
    completion and EOS, or with ``whole_text`` every token (the paper's SFT: a plain language model on the text)."""
    prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
    completion = tokenizer(problem.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = prompt + completion if whole_text else [-100] * len(prompt) + completion
    return prompt + completion, labels


def sft(model: Any, tokenizer: Any, problems: list[Problem] | list[TextProblem], seed: int, batch_size: int = SFT_BATCH,
        lr: float = SFT_LR) -> list[float]:
    """One epoch of SFT in the paper's recipe: a language-model loss on the whole text, prompt included (their
    ``instruct_mode: false``; predicting the problem-state chain teaches the transition tables the completion has
    to invert), AdamW, linear decay after a 5% linear warm-up. Returns the loss curve."""
    import torch

    from calibrl_verl.tiny.warmstart import Example, collate

    torch.manual_seed(seed)
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    steps = len(order) // batch_size
    if steps == 0:
        return []
    warmup = max(1, int(SFT_WARMUP_FRAC * steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    model.train()
    losses = []
    for step in range(steps):
        chunk = [problems[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        examples = [Example(torch.tensor(ids), torch.tensor(labels)) for ids, labels in
                    (encode(tokenizer, p, whole_text=True) for p in chunk)]
        loss = model(**collate(examples, tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def is_correct(response: str, ground_truth: str) -> bool:
    """Exact match of the whole completion, graded by the reward the trainer uses."""
    from calibrl_verl.reward import compute_score

    return compute_score(DATA_SOURCE, response, ground_truth)["acc"] == 1.0


def gold_logprobs(model: Any, tokenizer: Any, problems: list[Problem] | list[TextProblem], temperature: float = 1.0,
                  batch_size: int = 256) -> np.ndarray:
    """log P_T(gold completion + EOS | prompt) per problem, with the logits divided by ``temperature``.

    With an exact-match reward this IS the probability that one sample at temperature T (top-p 1, no top-k) is
    correct, so pass@k has the closed form 1 - (1 - p)^k for k independent samples: the study's pass@k and
    coverage carry no sampling noise (``calibrl_verl.evaluate``'s sampled estimate is checked against it)."""
    import torch

    from calibrl_verl.tiny.warmstart import Example, collate

    out = []
    for start in range(0, len(problems), batch_size):
        examples = [Example(torch.tensor(ids), torch.tensor(labels)) for ids, labels in
                    (encode(tokenizer, p) for p in problems[start : start + batch_size])]
        batch = collate(examples, tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((picked * (labels != -100)).sum(-1).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def sample_correct(model: Any, tokenizer: Any, problems: list[Problem], n: int, temperature: float, seed: int,
                   batch_size: int = 1024) -> np.ndarray:
    """[problems, n] booleans: is each of ``n`` samples at ``temperature`` (0: greedy, n must be 1) correct?

    Sampled by the tiny tasks' one transformers sampler (``warmstart.generate_responses``: the chat template, which
    passes the prompt through, left padding, no top-k), seeded once here so that the chunks draw one stream."""
    import torch

    from calibrl_verl.tiny.warmstart import generate_responses

    torch.manual_seed(seed)
    out = np.zeros((len(problems), n), dtype=bool)
    per = max(1, batch_size // n)
    for start in range(0, len(problems), per):
        chunk = problems[start : start + per]
        texts = generate_responses(model, tokenizer, chunk, temperature, MAX_COMPLETION_TOKENS, seed=None, n=n)
        for j, text in enumerate(texts):
            out[start + j // n, j % n] = is_correct(text, chunk[j // n].completion)
    return out


def probe(model: Any, tokenizer: Any, problems: list[Problem], seed: int, n: int = 64,
          temperatures: tuple[float, ...] = (0.5, 1.0)) -> dict[str, Any]:
    """Greedy pass@1 and, per temperature, mean pass@1 and coverage (solved at least once in ``n`` samples), %."""
    result: dict[str, Any] = {"problems": len(problems), "greedy": 100 * sample_correct(
        model, tokenizer, problems, 1, 0.0, seed).mean()}
    for t in temperatures:
        correct = sample_correct(model, tokenizer, problems, n, t, seed)
        result[f"T={t}"] = {"pass@1": 100 * correct.mean(), f"coverage@{n}": 100 * correct.any(axis=1).mean()}
    return result


# ------------------------------------------------------------------------------------------------ parquet, build


def problem_row(problem: Problem, split: str, index: int) -> dict[str, Any]:
    """One RL parquet row (the text layout of ``calibrl_verl.data.prep``, no images): the gold completion is both
    the ground truth and the expert trace."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": problem.chat_messages(),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": problem.completion},
        "extra_info": {"split": split, "index": index, "n_actions": len(problem.actions),
                       "actions": list(problem.actions)},
        "solution": problem.completion,
    }


def write_parquet(problems: list[Problem], split: str, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([problem_row(p, split, i) for i, p in enumerate(problems)]), path)
    return path


def sft_coverage(world: World, problems: list[Problem]) -> dict[str, float]:
    """How much of the world the SFT split shows: the share of (state, action) transitions it contains at least
    once, and the SFT policy's probability mass that sits on its top 3 actions per state (its bias)."""
    seen = {(s, a) for p in problems for s, a in zip(p.states, p.actions, strict=False)}
    top3 = np.sort(world.sft_policy, axis=1)[:, -3:].sum(axis=1).mean()
    return {"transitions_seen_frac": len(seen) / (N_STATES * N_ACTIONS), "sft_policy_top3_mass": float(top3)}


def build_wall(out: Path, n_train: int = 128, n_val: int = 256, seed: int = 0, n_sft: int = DEFAULT_SFT_ITEMS,
               probe_samples: int = 64) -> dict[str, Any]:
    """The task's assets: tokenizer, SFT'd model (``out/text_model``), RL-train and test parquets, and a summary.

    ``probe_samples`` > 0 measures greedy pass@1 and, at T = 0.5 and 1.0, pass@1 and coverage over that many
    samples on both splits (``build_info.json``); 0 skips it."""
    t0 = time.perf_counter()
    out = Path(out)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    world = make_world(seed)
    train, val = make_problems(world, n_train, seed, "train"), make_problems(world, n_val, seed, "val")
    train_file = write_parquet(train, "train", out / "data" / "train.parquet")
    val_file = write_parquet(val, "val", out / "data" / "val.parquet")
    sft_items = make_problems(world, n_sft, seed, "sft")
    t1 = time.perf_counter()
    losses = sft(model, tokenizer, sft_items, seed)
    t2 = time.perf_counter()
    model.save_pretrained(out / "text_model")
    tokenizer.save_pretrained(out / "text_model")
    last = losses[-20:]
    info: dict[str, Any] = {
        "family": "wall", "seed": seed, "text_model_dir": str(out / "text_model"),
        "train_files": str(train_file), "val_files": str(val_file), "n_train": n_train, "n_val": n_val,
        "text_params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
        "warmstart": {"items": n_sft, "steps": len(losses), "loss_first": losses[0] if losses else None,
                      "loss_last": sum(last) / len(last) if last else None},
        "sft_split": sft_coverage(world, sft_items),
    }
    if probe_samples > 0:
        info["probe"] = {"train": probe(model, tokenizer, train, seed, probe_samples),
                         "val": probe(model, tokenizer, val, seed, probe_samples)}
    info["seconds"] = {"assets": t1 - t0, "warmstart": t2 - t1, "total": time.perf_counter() - t0}
    (out / "build_info.json").write_text(json.dumps(info, indent=2, default=float))
    return info

