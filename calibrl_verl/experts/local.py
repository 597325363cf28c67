"""The local backend (``--backend vllm``): offline batched generation with ``vllm.LLM``, e.g. for a local teacher
such as Qwen2.5-VL-72B-Instruct with ``--tp 8``.

The model input and the engine come from the generation layer, which the ``evaluate`` CLI also uses
(``calibrl_verl.generation``: ``build_messages``, ``decode_image``, ``render``, ``vllm_input``, and
``VLLMBackend`` with its CPU-build settings), i.e. the input is exactly what verl builds for a rollout, sampled at
``--temperature`` (unseeded: a second try is another draw) for up to ``--max-tokens``. Problems go
in rounds: every pending problem gets one sample per round, in chunks of ``--concurrency`` problems per
``LLM.generate`` call (the cache is written after each chunk, so a kill loses at most one chunk), and the next
round only samples the ones not yet verified.
"""

from __future__ import annotations

import time
from typing import Any

from calibrl_verl.experts.data import Problem
from calibrl_verl.experts.session import Reply, Session
from calibrl_verl.generation import Sampling, VLLMBackend, build_messages, decode_image, render, vllm_input


class LocalBackend:
    """``vllm.LLM``, started only when there is something to send."""

    def __init__(self, model: str, tp: int, batch: int) -> None:
        self.model = model
        self.tp = tp
        self.batch = batch
        self.engine: Any = None
        self.session: Session | None = None

    def run(self, pending: list[tuple[Problem, int]], session: Session) -> None:
        """Sample every pending ``(problem, samples already done)`` until verified, errored or out of samples."""
        self.session = session
        self.engine = self.engine or self._start(max(len(p.images()) for p, _ in pending))
        todo = pending
        while todo:
            next_round = []
            for start in range(0, len(todo), self.batch):
                chunk = todo[start : start + self.batch]
                replies = self._generate([problem for problem, _ in chunk])
                for (problem, sample), reply in zip(chunk, replies, strict=True):
                    verdict = session.record(problem, sample, reply)
                    if session.settings.settles(verdict) or sample + 1 >= session.settings.samples:
                        session.settle(problem)
                    else:
                        next_round.append((problem, sample + 1))
            todo = next_round

    def _start(self, max_images: int) -> VLLMBackend:
        s = self.session.settings  # type: ignore[union-attr]
        # one sample per request, at the teacher's temperature and unseeded: a second try is a different answer
        sampling = Sampling(n=1, temperature=s.temperature, seed=None)
        return VLLMBackend(self.model, s.max_tokens, self.tp, max_images, max_model_len=None, sampling=sampling)

    def _generate(self, problems: list[Problem]) -> list[Reply]:
        """One reply per problem; a problem whose input cannot be built or served fails alone."""
        replies: list[Reply | None] = [None] * len(problems)
        inputs: dict[int, dict[str, Any]] = {}
        for i, problem in enumerate(problems):
            try:
                inputs[i] = model_input(self.engine.processor, problem)
            except Exception as exc:
                replies[i] = Reply(error=f"bad input: {type(exc).__name__}: {exc}", tries=0)
        for i, reply in zip(inputs, self._generate_inputs(list(inputs.values())), strict=True):
            replies[i] = reply
        return [r if r is not None else Reply(error="no reply") for r in replies]

    def _generate_inputs(self, inputs: list[dict[str, Any]]) -> list[Reply]:
        """vLLM validates a whole batch at once (one overlong prompt fails the call): on an error, halve the batch
        until the failing input is alone, so only its problem fails."""
        if not inputs:
            return []
        session = self.session
        assert session is not None
        start = time.monotonic()
        try:
            outputs = self.engine.generate_raw(inputs)
        except Exception as exc:
            if len(inputs) == 1:
                session.count_request(error=True, retry=False)
                return [Reply(error=f"vllm: {type(exc).__name__}: {exc}", latency_s=time.monotonic() - start)]
            half = len(inputs) // 2
            return self._generate_inputs(inputs[:half]) + self._generate_inputs(inputs[half:])
        elapsed = time.monotonic() - start  # the batch's time: its requests run together
        for _ in outputs:
            session.count_request(error=False, retry=False)
        return [
            Reply(
                text=o.outputs[0].text,
                served_model=self.model,
                prompt_tokens=len(o.prompt_token_ids or []),
                completion_tokens=len(o.outputs[0].token_ids),
                latency_s=elapsed,
            )
            for o in outputs
        ]


def model_input(processor: Any, problem: Problem) -> dict[str, Any]:
    """vLLM's prompt dict for a problem (verl's rollout input): its prompt and images only, never its ground truth."""
    images = [decode_image(item) for item in problem.images()]
    messages = build_messages(problem.prompt, images)
    return vllm_input(render(processor, messages, images, where=f"problem {problem.row_id}"))
