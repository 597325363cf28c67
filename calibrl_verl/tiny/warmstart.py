"""SFT warm-start and accuracy measurement for the tiny Qwen2.5-VL, in plain PyTorch.

Why: a random model scores 0 on a verifiable reward, so GRPO's advantages (and CalibRL's guided term) are all
zero and a smoke test proves nothing. A few seconds of SFT on (prompt, expert solution) pairs from a separate
warm-start split teaches the think/answer format and some of the task, giving reward variance at step 1.
Prompts are built exactly like verl's agent loop builds them (processor chat template with the image,
add_generation_prompt=True, qwen-vl-utils image handling); responses are tokenised like CalibRL's expert rows
(no special tokens added, the EOS token appended), so training and rollout see the same token streams.
Text-only items (``calibrl_verl.tiny.text_task``: no ``image``, their own ``chat_messages()``) take a tokenizer
where VL items take a processor: the prompt is then the tokenizer's chat template, as verl renders it without a
processor, and the batches carry no image inputs.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

from calibrl_verl.tiny.models import vision_token_ids
from calibrl_verl.tiny.task import TinyItem, chat_messages, is_correct

IGNORE_INDEX = -100


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads, then restore.

    One thread is as fast as two for a 200k-parameter model, far faster when the cores are shared (spinning
    OpenMP workers), and makes float results independent of the machine's core count (deterministic builds).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Example:
    """One tokenised SFT example: prompt + response ids, loss only on the response."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    mm_token_type_ids: torch.Tensor | None = None  # None (and no image inputs) for a text-only item
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


def _is_text(items: list[Any]) -> bool:
    """Text-only items (``text_task.TextItem``) have no image; VL items (``task.TinyItem``) always have one."""
    return all(getattr(item, "image", None) is None for item in items)


def _tokenizer(processor: Any) -> Any:
    """The tokenizer of a processor, or the argument itself when the caller passed a tokenizer (text model)."""
    return getattr(processor, "tokenizer", processor)


def prompt_inputs(processor: ProcessorMixin, items: list[TinyItem]) -> BatchFeature:
    """Processor inputs for a batch of prompts, rendered as verl's agent loop renders them."""
    if _is_text(items):  # verl without a processor: the tokenizer's chat template, no image inputs
        texts = [processor.apply_chat_template(item.chat_messages(), add_generation_prompt=True, tokenize=False)
                 for item in items]
        return processor(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    from qwen_vl_utils import process_vision_info

    texts, images = [], []
    for item in items:
        messages = chat_messages(item)
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        item_images, _ = process_vision_info(messages, image_patch_size=processor.image_processor.patch_size)
        images.extend(item_images)
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def response_ids(processor: ProcessorMixin, text: str) -> list[int]:
    """A response tokenised like CalibRL's expert rows: no special tokens added, EOS appended."""
    tokenizer = _tokenizer(processor)
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_example(processor: ProcessorMixin, item: TinyItem) -> Example:
    """Prompt (with expanded image tokens) followed by the expert solution; labels mask the prompt.

    ``mm_token_type_ids`` marks the image tokens: without it transformers silently falls back to 1-D positions
    instead of the 3-D mrope positions verl computes, and the warm-start would train a different model.
    """
    inputs = prompt_inputs(processor, [item])
    prompt = inputs["input_ids"][0]
    response = torch.tensor(response_ids(processor, item.solution), dtype=torch.long)
    labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), response])
    if _is_text([item]):
        return Example(torch.cat([prompt, response]), labels)
    types = torch.cat([inputs["mm_token_type_ids"][0], torch.zeros_like(response)])
    return Example(torch.cat([prompt, response]), labels, types, inputs["pixel_values"], inputs["image_grid_thw"])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; the model derives mrope positions from the attention mask."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    types = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = ex.input_ids, ex.labels, 1
        if ex.mm_token_type_ids is not None:
            types[row, :n] = ex.mm_token_type_ids
    if any(ex.pixel_values is None for ex in examples):  # text-only: a causal LM takes no image inputs
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "mm_token_type_ids": types,
        "pixel_values": torch.cat([ex.pixel_values for ex in examples]),
        "image_grid_thw": torch.cat([ex.image_grid_thw for ex in examples]),
    }


def warm_start(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    items: list[TinyItem],
    steps: int,
    seed: int,
    batch_size: int = 16,
    lr: float = 5e-3,
) -> list[float]:
    """Full-parameter SFT with AdamW; returns the loss curve (the caller logs its first and last values)."""
    if steps <= 0:
        return []
    torch.manual_seed(seed)
    rng = random.Random(seed)
    examples = [encode_example(processor, item) for item in items]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Cosine decay to 0: a high early rate learns the format fast, the decay settles the image features.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    never = vision_token_ids(_tokenizer(processor))
    for _ in range(steps):
        batch = collate(rng.sample(examples, min(batch_size, len(examples))), _tokenizer(processor).pad_token_id)
        out = model(**batch)
        loss = out.loss + unlikelihood(out.logits, batch["labels"], never)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    return losses


def unlikelihood(logits: torch.Tensor, labels: torch.Tensor, token_ids: list[int], floor: float = -30.0,
                 weight: float = 0.05) -> torch.Tensor:
    """``weight * mean(max(log p(any of token_ids), floor))`` over the response positions: drives the probability of
    emitting these tokens to about exp(floor), then stops.

    The vision placeholders must never be sampled (verl's agent loop rebuilds M-RoPE positions from every image
    token in prompt + response and fails on one in a response; docs/cpu_backend.md). A pretrained Qwen-VL puts
    negligible mass on them; a freshly initialised tiny one does not (~1e-5 per response token after plain SFT, a
    failure every few CI runs), and vLLM's sampler, unlike transformers' ``suppress_tokens``, has no model-level
    switch for it. A log-probability (not ``-log(1 - p)``, whose gradient vanishes with p) keeps pushing.
    """
    positions = labels[:, 1:] != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1][positions].float(), dim=-1)
    return weight * torch.logsumexp(logp[:, token_ids], dim=-1).clamp(min=floor).mean()


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    items: list[TinyItem],
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int | None = 0,
    n: int = 1,
) -> torch.Tensor:
    """New token ids, ``n`` sampled responses per item, an item's next to each other (T=0: greedy, n must be 1),
    with the model's suppressed tokens. ``seed`` seeds torch first; None continues from its current state (a caller
    that seeds once and samples in chunks).

    The suppression list comes from the saved generation config (the vision placeholders), so any caller that
    samples through this function never emits them (vLLM rollouts rely on the warm-start's ``unlikelihood`` term).
    """
    tokenizer = _tokenizer(processor)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = prompt_inputs(processor, items)
    finally:
        tokenizer.padding_side = side
    if temperature == 0 and n != 1:
        raise ValueError(f"greedy decoding gives one response per item, not n={n}")
    if seed is not None:
        torch.manual_seed(seed)
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:  # n > 1: generate repeats each prompt n times, the same as n copies of the item
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "num_return_sequences": n}
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        suppress_tokens=model.generation_config.suppress_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    return out[:, inputs["input_ids"].shape[1] :]


def generate_responses(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    items: list[TinyItem],
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int | None = 0,
    n: int = 1,
) -> list[str]:
    """Sampled responses (``n`` per item, an item's next to each other) decoded as verl's reward loop decodes them
    (special tokens skipped)."""
    new_tokens = generate_ids(model, processor, items, temperature, max_new_tokens, seed, n)
    return _tokenizer(processor).batch_decode(new_tokens, skip_special_tokens=True)


def accuracy(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    items: list[Any],
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    grade: Callable[[str, str], bool] = is_correct,
) -> float:
    """Fraction of items answered correctly by one response each (T = 0: greedy), graded by ``grade(response,
    answer)`` (the image task's format-and-answer check by default)."""
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        responses = generate_responses(model, processor, chunk, temperature=temperature, seed=seed + start)
        correct += sum(grade(r, it.answer) for r, it in zip(responses, chunk, strict=True))
    return correct / max(1, len(items))


def warm_start_and_probe(model: PreTrainedModel, processor: Any, train_items: list[Any], probe_items: list[Any],
                         steps: int, seed: int, grade: Callable[[str, str], bool] = is_correct) -> dict[str, Any]:
    """The SFT warm-start, then the accuracy probe (sampled at T = 1 and greedy) on ``probe_items``: the
    ``warmstart``, ``accuracy`` and ``seconds`` parts of a tiny build's ``build_info.json``."""
    t0 = time.perf_counter()
    losses = warm_start(model, processor, train_items, steps, seed)
    t1 = time.perf_counter()
    acc = {
        "eval_items": len(probe_items),
        "sampled_t1": accuracy(model, processor, probe_items, 1.0, seed, grade=grade) if probe_items else None,
        "greedy": accuracy(model, processor, probe_items, 0.0, seed, grade=grade) if probe_items else None,
    }
    last = losses[-10:]  # the mean of the last 10 losses: less noisy than one step
    return {
        "warmstart": {"steps": steps, "items": len(train_items), "loss_first": losses[0] if losses else None,
                      "loss_last": sum(last) / len(last) if last else None},
        "accuracy": acc,
        "seconds": {"warmstart": t1 - t0, "eval": time.perf_counter() - t1},
    }
