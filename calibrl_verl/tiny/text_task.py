"""A synthetic, verifiable text-only math task for the tiny text model (``--family text``), and its build.

Why it exists: the text-only CalibRL recipes (``recipes/*_qwen2_5_math_7b.yaml``) must run end to end on CPU
through verl's real trainer with no processor and no images, on a task a 200k-parameter Qwen2 can partly solve
after a few seconds of SFT, so GRPO/CalibRL see reward variance from step 1. Two question kinds over the same
small addition table (a, b in 1..9, answers "2".."18"): a bare sum ("What is 3 + 4?") and a one-line word problem
("Ann has 3 apples and gets 4 more. How many apples does Ann have?"). Every item carries an expert chain of
thought in ``<think>..</think><answer>..</answer>`` form; grading uses our real reward (``calibrl_verl.reward``).
Rows follow our RL parquet layout (``calibrl_verl/data/prep.py``) without the ``images`` column.

    python -m calibrl_verl.tiny.build --family text --out DIR

writes DIR/text_model (warm-started Qwen2 + tokenizer), DIR/data/{train,val}.parquet and DIR/build_info.json.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrl_verl.reward import compute_score
from calibrl_verl.tiny.task import INSTRUCTION, SYSTEM_PROMPT

DATA_SOURCE = "calibrl_tiny_text"
ABILITY = "math"
# 81 (a, b) pairs: a 2-layer model learns part of the table in seconds (with a, b in 1..4 it learnt all of it:
# greedy and sampled accuracy 1.0 after 400 steps, so no reward variance)
OPERANDS = range(1, 10)
NAMES = ("Ann", "Ben", "Cat", "Dan")
OBJECTS = ("apples", "pens", "cards")
# 200 SFT steps (~6 s on one core): on the 64-item val probe greedy / sampled (T=1) accuracy 0.64 / 0.36 on seed 0,
# 0.63 / 0.19 on seed 1; 250 steps gave 0.69-0.91 greedy, 300 steps 0.84-0.91 (measured 2026-11-30)
DEFAULT_WARMSTART_STEPS = 200
DEFAULT_WARMSTART_ITEMS = 256


@dataclass(frozen=True)
class TextItem:
    """One arithmetic question with its verifiable answer and the expert's short CoT (no image)."""

    kind: str
    question: str
    answer: str
    solution: str

    def user_text(self) -> str:
        """The user turn as stored in the parquet and rendered by the chat template: question, instruction."""
        return f"{self.question} {INSTRUCTION}"

    def chat_messages(self) -> list[dict[str, Any]]:
        """The chat verl's RLHFDataset hands the agent loop for this row (a plain string content)."""
        return [{"role": "user", "content": self.user_text()}]


def make_sum_item(rng: random.Random) -> TextItem:
    """'What is a + b?'"""
    a, b = rng.choice(OPERANDS), rng.choice(OPERANDS)
    answer = str(a + b)
    solution = f"<think>{a} + {b} = {answer}.</think><answer>{answer}</answer>"
    return TextItem("sum", f"What is {a} + {b}?", answer, solution)


def make_word_item(rng: random.Random) -> TextItem:
    """'Ann has a apples and gets b more. How many apples does Ann have?'"""
    a, b = rng.choice(OPERANDS), rng.choice(OPERANDS)
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    answer = str(a + b)
    question = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have?"
    solution = f"<think>{name} has {a} + {b} = {answer} {thing}.</think><answer>{answer}</answer>"
    return TextItem("word", question, answer, solution)


def make_items(n: int, seed: int, split: str) -> list[TextItem]:
    """n items for one split; a split-specific RNG keeps splits disjoint streams and the build deterministic."""
    rng = random.Random(f"{DATA_SOURCE}:{seed}:{split}")
    makers = (make_sum_item, make_word_item)
    return [makers[i % 2](rng) for i in range(n)]


def item_to_row(item: TextItem, split: str, index: int) -> dict[str, Any]:
    """One RL parquet row: the columns of ``calibrl_verl.data.prep`` minus ``images`` (a text-only row)."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": item.user_text()}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": item.answer},
        "extra_info": {"split": split, "index": index, "kind": item.kind, "question": item.question,
                       "answer": item.answer},
        "solution": item.solution,
    }


def write_parquet(items: list[TextItem], split: str, path: Path) -> Path:
    """Write one split as parquet (no ``images`` column: verl's dataset then builds text-only prompts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([item_to_row(item, split, i) for i, item in enumerate(items)]), path)
    return path


def is_correct(response: str, ground_truth: str) -> bool:
    """Graded by the reward the trainer uses (format and answer), not by a task-specific check."""
    return compute_score(DATA_SOURCE, response, ground_truth)["acc"] == 1.0


def tokenizer_corpus(seed: int, n: int = 200) -> list[str]:
    """Every kind of text the text tokenizer will meet: chat scaffolding, questions, instruction, solutions."""
    items = make_items(n, seed, "corpus")
    scaffold = ["system", "user", "assistant", SYSTEM_PROMPT, INSTRUCTION, "\n", "0123456789", " + = ."]
    return scaffold + [f"{it.user_text()}\n{it.solution}" for it in items]


def accuracy(model: Any, tokenizer: Any, items: list[TextItem], temperature: float, seed: int,
             batch_size: int = 32) -> float:
    """Fraction of items answered correctly by one response each (T=0: greedy), graded by our reward."""
    from calibrl_verl.tiny import warmstart

    return warmstart.accuracy(model, tokenizer, items, temperature, seed, batch_size, grade=is_correct)


def reload_tokenizer(model: Any, tokenizer: Any, path: Path) -> Any:
    """Save model config + tokenizer to ``path`` and reload the tokenizer as verl does (``AutoTokenizer``).

    Why: transformers maps the saved ``model_type: qwen2`` to ``Qwen2Tokenizer``, which swaps in Qwen's own
    pre-tokenizer (digits split one by one) for the trained one: " 7" is one token in memory, two after a reload.
    The warm-start and the accuracy probe must see the token streams verl will produce, or the RL run starts from a
    model that has never seen its prompts (measured: greedy accuracy 0.59 in memory, 0.06 through the reload).
    """
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def build_text(out: Path, n_train: int = 64, n_val: int = 32, seed: int = 0,
               warmstart_steps: int = DEFAULT_WARMSTART_STEPS, n_warmstart: int = DEFAULT_WARMSTART_ITEMS,
               eval_samples: int = 64) -> dict[str, Any]:
    """Text-only assets: tokenizer trained on this task, warm-started tiny Qwen2, parquet splits, summary.

    Writes ``out/text_model``, ``out/data/{train,val}.parquet`` and ``out/build_info.json``; returns the summary
    (call it inside ``warmstart.torch_threads`` for deterministic floats, as ``build.build`` does).
    """
    from calibrl_verl.tiny.models import build_text_model, build_tokenizer
    from calibrl_verl.tiny.warmstart import warm_start_and_probe

    t0 = time.perf_counter()
    out = Path(out)
    built = build_tokenizer(tokenizer_corpus(seed))
    model = build_text_model(built, seed)
    tokenizer = reload_tokenizer(model, built, out / "text_model")
    train = write_parquet(make_items(n_train, seed, "train"), "train", out / "data" / "train.parquet")
    val = write_parquet(make_items(n_val, seed, "val"), "val", out / "data" / "val.parquet")
    t1 = time.perf_counter()
    probe = make_items(max(n_val, eval_samples), seed, "val")[:eval_samples]  # the val split's first items
    trained = warm_start_and_probe(model, tokenizer, make_items(n_warmstart, seed, "warmstart"), probe,
                                   warmstart_steps, seed, grade=is_correct)
    model.save_pretrained(out / "text_model")
    tokenizer.save_pretrained(out / "text_model")
    info = {
        "family": "text",
        "seed": seed,
        "text_model_dir": str(out / "text_model"),
        "train_files": str(train),
        "val_files": str(val),
        "n_train": n_train,
        "n_val": n_val,
        "text_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        **trained,
    }
    info["seconds"].update(assets=t1 - t0, total=time.perf_counter() - t0)
    (out / "build_info.json").write_text(json.dumps(info, indent=2))
    return info
