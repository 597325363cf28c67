"""A tiny Qwen3-VL (``Qwen3VLForConditionalGeneration`` + a real ``Qwen3VLProcessor``), built locally in a second.

Why: the Qwen3-VL recipes must run through the same verl code paths as Qwen3-VL-8B (verl's qwen3_vl monkey patch,
the processor's ``get_rope_index`` bound by verl's ``hf_processor``, vLLM's ``Qwen3VLForConditionalGeneration``
with weight sync), on CPU, in seconds. What differs from the tiny Qwen2.5-VL (``calibrl_verl.tiny.models``), as in
the real models:

- 16-pixel patches (Qwen2.5-VL: 14), so images are resized to multiples of 32 (patch x merge 2); the task's
  56 px images become 64 px (4 merged image tokens, one per quadrant), its 112 px ones 128 px (16 tokens);
- interleaved M-RoPE (``mrope_interleaved``: t, h, w frequencies interleaved rather than in three blocks);
- a learned, bilinearly interpolated vision position embedding (``num_position_embeddings``) on top of 2-D RoPE,
  no window attention;
- DeepStack: the output of vision layer 0 is merged into the text model's hidden states after text layer 0;
- a Qwen3 text tower (q/k RMSNorm, explicit ``head_dim``).

It shares the tiny byte-level BPE tokenizer of ``calibrl_verl.tiny.models`` (same special-token names and ids as
Qwen's), whose chat template renders images as Qwen3-VL's does: ``<|vision_start|><|image_pad|><|vision_end|>``
in place, and no default system turn (Qwen3-VL's template has none either; Qwen2.5-VL's adds one).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from calibrl_verl.tiny.models import CHAT_TEMPLATE, TEXT_HIDDEN, _generation_defaults, _text_config_kwargs, _token_ids

# 2 query heads of 32 (vLLM's CPU attention serves head_dim 32, not 16) and 1 KV head, as the Qwen2.5-VL tiny
TEXT_HEAD_DIM = 32
# sums to head_dim / 2 = 16, split t/h/w like Qwen3-VL-8B's [24, 20, 20] (of 64)
MROPE_SECTION = [6, 5, 5]
VISION_HIDDEN, VISION_DEPTH, VISION_HEADS = 32, 2, 2
# vision layer 0 feeds DeepStack (Qwen3-VL-8B: layers 8, 16, 24 of 27); a text layer receives each
DEEPSTACK_VISUAL_INDEXES = [0]
PATCH, MERGE, TEMPORAL_PATCH = 16, 2, 2
# an 8 x 8 grid of learned positions (Qwen3-VL-8B: 48 x 48), interpolated to each image's patch grid
NUM_POSITION_EMBEDDINGS = 64
# 64 x 64 to 128 x 128 pixels: 4 to 16 image tokens per image, as for the tiny Qwen2.5-VL
MIN_PIXELS, MAX_PIXELS = 64 * 64, 128 * 128
# Qwen3-VL normalises pixels to [-1, 1] (Qwen2.5-VL uses CLIP's mean and std)
IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLProcessor:
    """A full Qwen3-VL processor (Qwen2-VL image processor at 16 px patches, Qwen3-VL video processor)."""
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    common: dict[str, Any] = {"patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL_PATCH,
                              "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}  # fmt: skip
    image_processor = Qwen2VLImageProcessor(size=size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **common)
    video_processor = Qwen3VLVideoProcessor(size=size, **common)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=CHAT_TEMPLATE)  # fmt: skip


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    """Qwen3-VL config: Qwen3 text 64/2 layers, head_dim 32, interleaved mrope; vision depth 2 with DeepStack."""
    text = _text_config_kwargs(tokenizer)
    text["head_dim"] = TEXT_HEAD_DIM
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": MROPE_SECTION,
                               "mrope_interleaved": True}  # fmt: skip
    vision = {
        "depth": VISION_DEPTH,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_heads": VISION_HEADS,
        "out_hidden_size": TEXT_HIDDEN,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL_PATCH,
        "num_position_embeddings": NUM_POSITION_EMBEDDINGS,
        "deepstack_visual_indexes": DEEPSTACK_VISUAL_INDEXES,
    }
    ids = _token_ids(tokenizer)
    model_ids = {key: ids[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                           "vision_end_token_id")}  # fmt: skip
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **model_ids)


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen3VLForConditionalGeneration:
    """Randomly initialised tiny Qwen3-VL (float32, sdpa attention), deterministic given the seed."""
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(build_config(tokenizer))
    _generation_defaults(model, tokenizer)
    return model.eval()
