"""The data-source hook: expert rows join each rollout group through a verl agent loop.

verl 0.9.1 runs one agent-loop session per sample of a group (``session_id`` 0..n-1, all sharing the
prompt's uid and dataset columns). ``CalibRLAgentLoop`` subclasses verl's ``SingleTurnAgentLoop``: sessions
0..n_onpolicy-1 sample from the policy as usual; the last ``experts_per_group`` sessions of a training group
return the expert chain-of-thought instead. They run the *same* parent ``run()``: only the rollout server is
swapped for ``ExpertServer``, which answers with the expert's tokens. So an expert row gets exactly the
prompt tokens, images, position ids, reward call and TransferQueue schema of a sampled row, and verl's
pipeline (reward, old log-prob recomputation, balancing) treats it like any other row.

Why an agent loop: it is verl's extension point for "where a group's responses come from"; a dataset-side
hook cannot add rows to a group, and a trainer-side injection would have to rebuild prompt tokens,
multimodal inputs and rewards that the agent loop already builds. The trainer decides per prompt whether
the expert joins (warm-up, ``mix_policy: random``, a missing expert) and says so with two columns:
``__rollout_n__`` (verl's per-sample session count) and ``calibrl_expert``.

With ``calibrl.seeded_rollouts`` every sampled session also gets its own vLLM sampling seed (``SeededServer``),
derived from what the request is, not from when it arrives: a resumed run then samples what the uninterrupted run
sampled.

Registered by ``config/agent_loops.yaml`` (verl's ``agent_loop_config_path``), which every agent-loop worker
loads itself, so nothing heavy runs at ``import verl`` time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
from verl.workers.rollout.replica import TokenOutput

from calibrl_verl.config import CalibRLConfig
from calibrl_verl.data.expert_column import expert_traces

AGENT_NAME = "calibrl_agent"
# The trainer's per-prompt columns: the text of the group's j-th expert session ("" when the group has fewer)
EXPERT_TEXT = "calibrl_expert_{}"


def expert_token_ids(tokenizer: Any, text: str, max_len: int, overlong: str) -> tuple[list[int] | None, bool]:
    """Tokenise an expert CoT as a model response: no special tokens added, the end-of-turn token appended.

    Returns (token ids or None when ``overlong="drop"`` rejects it, truncated?). ``truncate`` keeps the first
    ``max_len`` tokens (the end token is then lost, as for a sampled response cut at the same length).
    """
    ids = list(tokenizer.encode(text, add_special_tokens=False)) + [tokenizer.eos_token_id]
    if len(ids) <= max_len:
        return ids, False
    if overlong == "drop":
        return None, True
    return ids[:max_len], True


class ExpertServer:
    """Stands in for verl's rollout server in an expert session: answers with the expert's tokens.

    It mirrors what a real server returns: placeholder log-probs when the sampling params ask for them (the
    trainer replaces them with the recomputed old log-probs before anything reads them) and the weight
    version fields verl's metrics read as ints.
    """

    def __init__(self, token_ids: list[int], global_steps: int) -> None:
        self.token_ids = token_ids
        self.global_steps = global_steps

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **_: Any) -> TokenOutput:
        steps = self.global_steps
        return TokenOutput(
            token_ids=list(self.token_ids),
            log_probs=[0.0] * len(self.token_ids) if sampling_params.get("logprobs") else None,
            stop_reason="completed",
            num_preempted=0,
            extra_fields={"global_steps": steps, "min_global_steps": steps, "max_global_steps": steps},
        )


def _image_fingerprint(image: Any) -> bytes:
    """Bytes that identify an image's content (PIL image, array or tensor)."""
    if hasattr(image, "tobytes") and hasattr(image, "size") and hasattr(image, "mode"):  # PIL
        return f"{image.mode}{image.size}".encode() + image.tobytes()
    if hasattr(image, "detach"):  # torch tensor
        return image.detach().cpu().contiguous().numpy().tobytes()
    if hasattr(image, "tobytes"):
        return image.tobytes()
    return repr(image).encode()


def request_seed(base_seed: int, weight_version: int, session_id: int, prompt_ids: Sequence[int],
                 images: Sequence[Any] | None) -> int:
    """The sampling seed of one request: a hash of the run's rollout seed, the weight version, the session
    (the k-th sample of a group) and the request's content (prompt tokens and image pixels; two images may share
    prompt tokens). The same request under the same weights always gets the same seed, whatever the arrival order.
    """
    h = hashlib.sha256(f"{base_seed}:{weight_version}:{session_id}:".encode())
    h.update(",".join(str(int(t)) for t in prompt_ids).encode())
    for image in images or ():
        h.update(_image_fingerprint(image))
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


class SeededServer:
    """Wraps verl's server manager for one session: each request carries its ``request_seed`` as vLLM's
    per-request ``seed`` (verl's vLLM server passes sampling params to ``vllm.SamplingParams``)."""

    def __init__(self, inner: Any, base_seed: int, weight_version: int, session_id: int) -> None:
        self.inner = inner
        self.base_seed, self.weight_version, self.session_id = base_seed, weight_version, session_id

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       image_data: list[Any] | None = None, **kwargs: Any) -> TokenOutput:
        seed = request_seed(self.base_seed, self.weight_version, self.session_id, prompt_ids, image_data)
        return await self.inner.generate(request_id, prompt_ids=prompt_ids, image_data=image_data,
                                         sampling_params={**sampling_params, "seed": seed}, **kwargs)


class CalibRLAgentLoop(SingleTurnAgentLoop):
    """Single-turn agent loop whose last sessions (up to ``experts_per_group``) return expert responses: session j
    past the on-policy ones answers with the j-th of the distinct traces the trainer drew for the prompt."""

    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs: Any) -> AgentLoopOutput:
        cfg = CalibRLConfig.from_config(self.config.get("calibrl"))
        if not self._is_expert_session(cfg, kwargs):
            if cfg.seeded_rollouts:
                self.server_manager = SeededServer(self.server_manager, int(self.rollout_config.seed),
                                                   _weight_version(kwargs), int(kwargs.get("session_id", 0)))
            output = await super().run(sampling_params, priority=priority, **kwargs)
            output.extra_fields.update({"is_expert": False, "expert_truncated": False})
            return output
        text = self._expert_text(cfg, kwargs)
        ids, truncated = expert_token_ids(self.tokenizer, text, self.response_length, cfg.expert_overlong)
        if ids is None:
            return []  # dropped (overlong): verl stores no row; the trainer counts the group as without expert
        # A fresh loop instance is built per session (verl 0.9.1 agent_loop.py ~683), so swapping the server
        # here touches only this expert session.
        self.server_manager = ExpertServer(ids, _weight_version(kwargs))
        output = await super().run(sampling_params, priority=priority, **kwargs)
        output.extra_fields.update({"is_expert": True, "expert_truncated": truncated})
        return output

    def _expert_text(self, cfg: CalibRLConfig, kwargs: dict[str, Any]) -> str:
        """Expert session j (the j-th session past the on-policy ones) answers with the trace the trainer drew
        for it (``EXPERT_TEXT``); without those columns, with the dataset's own single trace."""
        j = int(kwargs["session_id"]) - (int(self.rollout_config.n) - cfg.n_expert)
        drawn = kwargs.get(EXPERT_TEXT.format(j))
        if drawn is not None:
            return str(drawn)
        traces = expert_traces(kwargs.get(cfg.expert_key))
        return traces[j] if j < len(traces) else ""

    def _is_expert_session(self, cfg: CalibRLConfig, kwargs: dict[str, Any]) -> bool:
        """Training groups the trainer marked get experts in their last sessions; validation never does."""
        if not bool(kwargs.get("calibrl_expert", False)) or cfg.n_expert == 0:
            return False
        n_onpolicy = int(self.rollout_config.n) - cfg.n_expert
        return int(kwargs["session_id"]) >= n_onpolicy


def _weight_version(kwargs: dict[str, Any]) -> int:
    """The policy version sampled rows of this step report (sync mode: weights of the previous step)."""
    return max(int(kwargs.get("global_steps", 1)) - 1, 0)
