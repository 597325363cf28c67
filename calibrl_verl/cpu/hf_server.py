"""Token-in/token-out generation server on transformers ``generate`` (the ``hf`` rollout's engine).

verl 0.9.1 ships async rollout servers for vLLM, SGLang and TensorRT-LLM only, and none of them runs on a
CPU with verl 0.9.1's transformers range. This server speaks the same protocol verl's agent loop uses with
vLLM (``generate(prompt_ids, sampling_params, request_id, image_data, ...) -> TokenOutput``), so verl's own
agent loop, reward loop and trainer run unchanged on top of it.

* :class:`HFGenerator` is the engine: plain torch/transformers, no Ray, directly testable.
* :class:`HFRolloutServer` is the Ray actor class: reads verl's rollout/model config, serialises requests
  (one model, one lock) in a worker thread so lifecycle calls stay responsive, and implements verl's
  server lifecycle (sleep / wake_up / abort / kv-cache calls) as no-ops: weights live in host RAM.

Log-probs are ``log_softmax(raw_logits / T)`` of the sampled token, the quantity verl's actor computes
for ``old_log_probs`` (it also divides by the rollout temperature), so rollout-vs-actor log-prob metrics
compare like with like. Greedy requests (T = 0) report T = 1 log-probs.

Sampling is reproducible request by request: each request is sampled with its own seed derived from
``rollout.seed``, the served weight version (verl's ``global_steps``), the prompt tokens and image pixels, and
how many identical requests this version has already served (``request_seed``). Arrival order, which verl's
async agent loop does not fix, does not matter, and a run resumed from a checkpoint samples what the
uninterrupted run sampled.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# A random or young VL policy sometimes samples these; verl 0.9.1's agent loop then rebuilds multimodal
# position ids from every image token in prompt+response and transformers' get_rope_index raises
# StopIteration (VERL_ON_CPU.md, "One real failure"). The policy must never emit them, so they are
# suppressed at sampling time.
VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")


@dataclass(frozen=True)
class GenerationLimits:
    """Length limits from verl's rollout config, applied the way verl's vLLM server applies them."""

    prompt_length: int
    response_length: int
    max_model_len: int | None = None
    ignore_eos: bool = False

    @property
    def context_length(self) -> int:
        """Model context: ``rollout.max_model_len`` or prompt + response budget."""
        return self.max_model_len or self.prompt_length + self.response_length

    def max_new_tokens(self, n_prompt: int, sampling_params: Mapping[str, Any]) -> int:
        """``max_tokens``/``max_new_tokens`` from the request, else the remaining response budget; >= 1."""
        room = self.context_length - n_prompt
        if room < 1:
            raise ValueError(f"prompt of {n_prompt} tokens leaves no room in a {self.context_length}-token context")
        requested = sampling_params.get("max_tokens", sampling_params.get("max_new_tokens"))
        if requested is None:
            requested = min(self.response_length, self.prompt_length + self.response_length - n_prompt)
        return max(1, min(int(requested), room))


@dataclass
class Generation:
    """One completion: response token ids, their log-probs and why generation stopped."""

    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str  # "stop" (an EOS token was emitted) or "length"


def auto_model_class(hf_config: Any) -> type:
    """The transformers Auto class verl's FSDP engine uses for this config, so parameter names match."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if hasattr(hf_config, "vision_config") else AutoModelForCausalLM


def load_processing(model_path: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(tokenizer, processor-or-None): a processor only when the checkpoint ships an image processor."""
    from transformers import AutoProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        processor = None
    if processor is None or not hasattr(processor, "image_processor"):
        processor = None
    return tokenizer, processor


def special_token_ids(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Ids of the given special tokens that exist in this vocabulary (unknown ones are skipped)."""
    ids = []
    for token in tokens:
        idx = tokenizer.convert_tokens_to_ids(token)
        if isinstance(idx, int) and idx >= 0 and idx != tokenizer.unk_token_id:
            ids.append(idx)
    return ids


def _as_list(value: Any) -> list[int]:
    """Normalise an ``eos_token_id`` that may be None, an int or a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _image_fingerprint(image: Any) -> bytes:
    """Bytes that identify an image's content (PIL image, array or tensor) for ``request_seed``."""
    if hasattr(image, "tobytes") and hasattr(image, "size") and hasattr(image, "mode"):  # PIL
        return f"{image.mode}{image.size}".encode() + image.tobytes()
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().contiguous().numpy().tobytes()
    if hasattr(image, "tobytes"):
        return image.tobytes()
    return repr(image).encode()


def request_digest(prompt_ids: Sequence[int], images: Sequence[Any] | None) -> bytes:
    """What a request asks for: its prompt tokens and image contents (two images may share prompt tokens)."""
    h = hashlib.sha256(",".join(str(int(t)) for t in prompt_ids).encode())
    for image in images or ():
        h.update(_image_fingerprint(image))
    return h.digest()


def request_seed(base_seed: int, weight_version: int | None, digest: bytes, occurrence: int) -> int:
    """The sampling seed of one request: the same request under the same weights gets the same seed.

    ``occurrence`` separates the n samples of one prompt (identical requests): the k-th copy served under a
    weight version gets seed k, whichever copy arrives first, so the group's samples are the same set.
    """
    h = hashlib.sha256(f"{base_seed}:{weight_version}:{occurrence}:".encode() + digest)
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


class HFGenerator:
    """A transformers causal-LM / VL model that samples one sequence per call and reports log-probs."""

    def __init__(
        self,
        model_path: str,
        limits: GenerationLimits,
        attn_implementation: str = "sdpa",
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        seed: int | None = None,
    ) -> None:
        from transformers import AutoConfig

        if seed is not None:
            torch.manual_seed(seed)
        hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = auto_model_class(hf_config).from_pretrained(
            model_path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        self.model.eval()
        self.tokenizer, self.processor = load_processing(model_path, trust_remote_code)
        self.limits = limits
        self.suppress_ids = special_token_ids(self.tokenizer, VISION_SPECIAL_TOKENS)
        self.eos_ids = sorted(
            set(_as_list(self.model.generation_config.eos_token_id) + _as_list(self.tokenizer.eos_token_id))
        )
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        sampling_params: Mapping[str, Any],
        images: Sequence[Any] | None = None,
        mm_processor_kwargs: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> Generation:
        """Sample one response to ``prompt_ids`` (image placeholders already expanded, as verl sends them).

        ``seed`` reseeds torch's RNG first (the caller serialises calls, so nothing else draws in between).
        """
        if seed is not None:
            torch.manual_seed(seed)
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if images:
            inputs.update(self._image_inputs(input_ids, images, mm_processor_kwargs))
        max_new = self.limits.max_new_tokens(input_ids.shape[1], sampling_params)
        out = self.model.generate(**inputs, **self._sampling_kwargs(sampling_params, max_new))
        new_ids = out.sequences[0, input_ids.shape[1] :]
        logits = torch.stack(out.logits, dim=0)[: len(new_ids), 0, :].float()
        log_probs = torch.log_softmax(logits / self._logprob_temperature(sampling_params), dim=-1)
        chosen = log_probs.gather(-1, new_ids.unsqueeze(-1)).squeeze(-1)
        token_ids = new_ids.tolist()
        stopped = bool(token_ids) and token_ids[-1] in self.eos_ids
        return Generation(token_ids, chosen.tolist(), "stop" if stopped else "length")

    def _sampling_kwargs(self, sampling_params: Mapping[str, Any], max_new: int) -> dict[str, Any]:
        """transformers ``generate`` kwargs; every sampling knob is explicit so model defaults never leak in."""
        temperature = float(sampling_params.get("temperature", 1.0) or 0.0)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": temperature > 0,
            "suppress_tokens": self.suppress_ids or None,
            "eos_token_id": self.eos_ids or None,
            "pad_token_id": self.pad_id,
            "output_logits": True,
            "return_dict_in_generate": True,
            "repetition_penalty": float(sampling_params.get("repetition_penalty", 1.0) or 1.0),
        }
        if temperature > 0:
            top_k = int(sampling_params.get("top_k", -1) or -1)
            kwargs.update(temperature=temperature, top_p=float(sampling_params.get("top_p", 1.0) or 1.0))
            kwargs["top_k"] = top_k if top_k > 0 else 0  # 0 disables top-k (transformers' default is 50)
        if self.limits.ignore_eos or sampling_params.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_new
        return kwargs

    @staticmethod
    def _logprob_temperature(sampling_params: Mapping[str, Any]) -> float:
        """The temperature log-probs are reported at (verl's actor divides logits by it; greedy -> 1)."""
        temperature = float(sampling_params.get("temperature", 1.0) or 0.0)
        return temperature if temperature > 0 else 1.0

    def _image_inputs(
        self, input_ids: torch.Tensor, images: Sequence[Any], mm_processor_kwargs: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """Vision inputs for images verl already resized and counted into ``prompt_ids``.

        ``mm_token_type_ids`` matters: transformers 5 computes Qwen-VL's 3-D (M-RoPE) positions only when it is
        given; without it image tokens get text positions and the rollout silently disagrees with verl's actor,
        which always builds M-RoPE positions (measured: max token-prob diff 0.13 vs 1e-6 with it).
        """
        if self.processor is None:
            raise ValueError("image_data was sent to an hf rollout whose model has no image processor")
        features = dict(
            self.processor.image_processor(images=list(images), return_tensors="pt", **(mm_processor_kwargs or {}))
        )
        if "pixel_values" in features:
            features["pixel_values"] = features["pixel_values"].to(self.model.dtype)
        if hasattr(self.processor, "create_mm_token_type_ids"):
            type_ids = self.processor.create_mm_token_type_ids(input_ids.tolist())
            features["mm_token_type_ids"] = torch.tensor(type_ids, dtype=torch.long)
        return features

    @torch.no_grad()
    def load_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> int:
        """Copy pushed tensors into the model in place; unknown names are an error (a silent skip is a stale
        policy). Returns the number of tensors loaded."""
        state = self.model.state_dict(keep_vars=True)
        unknown = sorted(set(named_tensors) - set(state))
        if unknown:
            raise KeyError(f"hf rollout: {len(unknown)} pushed weights are not in the model, e.g. {unknown[:5]}")
        for name, tensor in named_tensors.items():
            state[name].copy_(tensor.to(dtype=state[name].dtype))
        return len(named_tensors)


def _cfg(obj: Any, key: str, default: Any = None) -> Any:
    """Read a field from a verl dataclass or an OmegaConf node alike."""
    value = getattr(obj, key, default)
    return default if value is None else value


class HFRolloutServer:
    """verl-compatible rollout server (used as a Ray actor by :class:`calibrl_verl.cpu.rollout.HFReplica`)."""

    def __init__(self, config: Any, model_config: Any, replica_rank: int = 0) -> None:
        """``config``: verl ``RolloutConfig`` (or its DictConfig); ``model_config``: ``actor_rollout_ref.model``."""
        limits = GenerationLimits(
            prompt_length=int(_cfg(config, "prompt_length", 512)),
            response_length=int(_cfg(config, "response_length", 512)),
            max_model_len=_cfg(config, "max_model_len"),
            ignore_eos=bool(_cfg(config, "ignore_eos", False)),
        )
        override = _cfg(model_config, "override_config", {}) or {}
        self.generator = HFGenerator(
            str(_cfg(model_config, "local_path") or _cfg(model_config, "path")),
            limits=limits,
            attn_implementation=override.get("attn_implementation", "sdpa"),
            trust_remote_code=bool(_cfg(model_config, "trust_remote_code", False)),
            seed=int(_cfg(config, "seed", 0)) + replica_rank,
        )
        self.replica_rank = replica_rank
        self.base_seed = int(_cfg(config, "seed", 0)) + replica_rank
        self.global_steps: int | None = None
        self._lock = asyncio.Lock()
        self._served: dict[bytes, int] = {}  # request digest -> copies served under the current weights

    async def generate(
        self,
        prompt_ids: Sequence[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        audio_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> Any:
        """verl's token-in/token-out call (same signature as its vLLM server); returns a ``TokenOutput``."""
        from verl.workers.rollout.replica import TokenOutput

        if video_data or audio_data:
            raise NotImplementedError("the hf rollout supports text and images only")
        async with self._lock:
            digest = request_digest(prompt_ids, image_data)
            occurrence = self._served.get(digest, 0)
            self._served[digest] = occurrence + 1
            seed = request_seed(self.base_seed, self.global_steps, digest, occurrence)
            gen = await asyncio.to_thread(
                self.generator.generate, list(prompt_ids), sampling_params, image_data, mm_processor_kwargs, seed
            )
        return TokenOutput(
            token_ids=gen.token_ids,
            log_probs=gen.log_probs if sampling_params.get("logprobs", True) else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps, "finish_reason": gen.finish_reason},
        )

    async def update_weights(self, named_tensors: Mapping[str, torch.Tensor], global_steps: int | None = None) -> int:
        """Load the actor's weights (pushed by ``HFServerAdapter``); waits for in-flight generation."""
        async with self._lock:
            loaded = self.generator.load_weights(named_tensors)
            if global_steps is not None:
                self._set_version(global_steps)
        return loaded

    async def named_parameters(self) -> dict[str, torch.Tensor]:
        """Copies of the served weights (for tests and debugging weight sync)."""
        return {k: v.detach().clone() for k, v in self.generator.model.state_dict().items()}

    async def set_global_steps(self, global_steps: int) -> None:
        """Version tag reported in every TokenOutput (verl's staleness metrics read it)."""
        async with self._lock:
            self._set_version(global_steps)

    def _set_version(self, global_steps: int) -> None:
        """New weights: the occurrence counts of ``request_seed`` start again."""
        if global_steps != self.global_steps:
            self._served.clear()
        self.global_steps = global_steps

    # ---- lifecycle calls verl makes on every server; nothing to free or resume on CPU -----------------
    async def wake_up(self, tags: list[str] | None = None) -> None:
        """No-op: weights and caches stay in host RAM."""

    async def sleep(self) -> None:
        """No-op: weights and caches stay in host RAM."""

    async def clear_kv_cache(self) -> None:
        """No-op: transformers' cache lives only for one generate call."""

    async def release_kv_cache(self) -> None:
        """No-op (see clear_kv_cache)."""

    async def resume_kv_cache(self) -> None:
        """No-op (see clear_kv_cache)."""

    async def wait_for_requests_to_drain(self) -> None:
        """Requests are serialised by the lock; waiting for it drains them."""
        async with self._lock:
            return None

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Nothing is abortable mid-generate; report no aborted requests (verl's expected shape)."""
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        """See abort_all_requests."""
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        """No-op: generation is never paused."""

    async def resume_engine_generation(self) -> None:
        """No-op: generation is never paused."""

    async def open_submission_gate(self) -> None:
        """No-op: requests are always admitted."""

    async def start_profile(self, **kwargs: Any) -> None:
        """No-op: no rollout profiler."""

    async def stop_profile(self) -> None:
        """No-op: no rollout profiler."""
