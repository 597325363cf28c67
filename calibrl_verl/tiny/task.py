"""A synthetic, verifiable multimodal task: PIL-drawn shapes and short questions about them.

Why it exists: tests, the CPU demo and the CI smoke test need a multimodal RL task that a 200k-parameter
Qwen2.5-VL can partly solve after a few seconds of SFT, so GRPO/CalibRL see reward variance from step 1.
Two question kinds: counting circles (answer "1".."4") and the colour of a square (multiple choice, answer a
letter A-D). Every item carries an expert chain of thought in ``<think>..</think><answer>..</answer>`` form.
Rows follow verl's RL parquet layout (docs/algorithm.md §6) and load with verl's own ``RLHFDataset``.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

DATA_SOURCE = "calibrl_tiny"
ABILITY = "visual_reasoning"
# Multiples of 28 (patch 14 x merge 2), so no resizing: 4 or 16 image tokens. Mostly 56 px (each quadrant is
# exactly one merged image token: cheap and quick to learn), some 112 px so batches mix image sizes.
IMAGE_SIZES = (56, 56, 56, 112)
# Short on purpose: every token of prompt costs warm-start time, and a long prompt dilutes the few image tokens.
INSTRUCTION = "Reason in <think></think>, then answer in <answer></answer>."
# Not in the prompts (the chat template has no default system turn) but in the tokenizer corpus, so a user who
# adds Qwen's usual system turn still gets short prompts.
SYSTEM_PROMPT = "You are a helpful assistant."
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
LETTERS = ("A", "B", "C", "D")
ANSWER_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)


@dataclass(frozen=True)
class TinyItem:
    """One question about one image, with its verifiable answer and the expert's short CoT."""

    kind: str
    question: str
    answer: str
    solution: str
    image: Image.Image


def _blank(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white RGB canvas, so shapes are the only signal the vision tower has to find."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    return img, ImageDraw.Draw(img)


def _cell_boxes(size: int, cells: list[int], rng: random.Random, scale: float) -> list[tuple[int, int, int, int]]:
    """Boxes inside distinct quadrants of the image: shapes never overlap, so counting is well defined."""
    half = size // 2
    radius = max(4, int(half * scale))
    boxes = []
    for cell in cells:
        cx = (cell % 2) * half + half // 2 + rng.randint(-half // 8, half // 8)
        cy = (cell // 2) * half + half // 2 + rng.randint(-half // 8, half // 8)
        boxes.append((cx - radius, cy - radius, cx + radius, cy + radius))
    return boxes


def make_count_item(rng: random.Random) -> TinyItem:
    """'How many circles?' with 1-4 circles of one random colour."""
    size = rng.choice(IMAGE_SIZES)
    count = rng.randint(1, 4)
    colour = rng.choice(list(COLOURS))
    img, draw = _blank(size)
    for box in _cell_boxes(size, rng.sample(range(4), count), rng, scale=0.32):
        draw.ellipse(box, fill=COLOURS[colour])
    answer = str(count)
    noun = "circle" if count == 1 else "circles"
    solution = f"<think>I count {count} {noun}.</think><answer>{answer}</answer>"
    return TinyItem("count", "How many circles are in the image?", answer, solution, img)


def make_colour_item(rng: random.Random) -> TinyItem:
    """'What colour is the square?' as multiple choice over the four colours, always in the same order.

    A fixed option order makes the letter a function of the colour alone, so a tiny model can learn the task
    from pixels within seconds; shuffled options would add a reading task it cannot learn that fast.
    """
    size = rng.choice(IMAGE_SIZES)
    colour = rng.choice(list(COLOURS))
    options = list(COLOURS)
    img, draw = _blank(size)
    draw.rectangle(_cell_boxes(size, [rng.randrange(4)], rng, scale=0.4)[0], fill=COLOURS[colour])
    letter = LETTERS[options.index(colour)]
    choices = " ".join(f"{ltr}. {name}" for ltr, name in zip(LETTERS, options, strict=True))
    question = f"What colour is the square? Answer with the letter. {choices}"
    solution = f"<think>The square is {colour}, option {letter}.</think><answer>{letter}</answer>"
    return TinyItem("colour", question, letter, solution, img)


def make_items(n: int, seed: int, split: str) -> list[TinyItem]:
    """n items for one split; a split-specific RNG keeps splits disjoint streams and the build deterministic."""
    rng = random.Random(f"{DATA_SOURCE}:{seed}:{split}")
    makers = (make_count_item, make_colour_item)
    return [makers[i % 2](rng) for i in range(n)]


def user_text(item: TinyItem) -> str:
    """The user turn as stored in the parquet: image placeholder, question, think/answer instruction."""
    return f"<image>{item.question} {INSTRUCTION}"


def chat_messages(item: TinyItem) -> list[dict[str, Any]]:
    """The user turn with the image in place, as verl's RLHFDataset hands it to the agent loop."""
    content = [{"type": "image", "image": item.image}, {"type": "text", "text": f"{item.question} {INSTRUCTION}"}]
    return [{"role": "user", "content": content}]


def png_bytes(img: Image.Image) -> bytes:
    """Encode an image as PNG (lossless, deterministic), the form verl's geo3k-style data uses."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def item_to_row(item: TinyItem, split: str, index: int) -> dict[str, Any]:
    """One verl RL parquet row (docs/algorithm.md §6)."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": user_text(item)}],
        "images": [{"bytes": png_bytes(item.image)}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": item.answer},
        "extra_info": {"split": split, "index": index, "kind": item.kind, "question": item.question},
        "solution": item.solution,
    }


def write_parquet(items: list[TinyItem], split: str, path: Path) -> Path:
    """Write one split as parquet; pyarrow infers the nested list/struct columns verl reads back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([item_to_row(item, split, i) for i, item in enumerate(items)])
    pq.write_table(table, path)
    return path


def extract_answer(response: str) -> str | None:
    """The text inside <answer> when the whole response has the think/answer format, else None."""
    match = ANSWER_RE.match(response)
    return match.group(1).strip() if match else None


def is_correct(response: str, ground_truth: str) -> bool:
    """Minimal grader for the build-time accuracy report (the real reward lives in calibrl_verl.reward)."""
    answer = extract_answer(response)
    return answer is not None and answer.strip().upper() == ground_truth.strip().upper()


def tokenizer_corpus(seed: int, n: int = 200) -> list[str]:
    """Every kind of text the tokenizer will meet: chat scaffolding, questions, instruction, solutions."""
    items = make_items(n, seed, "corpus")
    scaffold = ["system", "user", "assistant", SYSTEM_PROMPT, INSTRUCTION, "\n", " ".join(LETTERS), "0123456789"]
    return scaffold + [f"{it.question} {INSTRUCTION}\n{it.solution}" for it in items]
