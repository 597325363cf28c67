"""The local backend (``--backend vllm``): offline batched generation with ``vllm.LLM``, e.g. for a local teacher
such as Qwen2.5-VL-72B-Instruct with ``--tp 8``.

The model input is built by the evaluate CLI's own functions (``build_messages``, ``decode_image``, ``render``,
``vllm_input``; the engine by ``evaluate.VLLMBackend``, with its CPU-build settings), i.e. exactly as verl builds
a rollout prompt, with the sampling parameters replaced by ``--temperature`` / ``--max-tokens``. Problems go
in rounds: every pending problem gets one sample per round, in chunks of ``--concurrency`` problems per
``LLM.generate`` call (the cache is written after each chunk, so a kill loses at most one chunk), and the next
round only samples the ones not yet verified.
"""

from __future__ import annotations

import time
from typing import Any

from calibrl_verl import evaluate
from calibrl_verl.experts.data import Problem
from calibrl_verl.experts.session import Reply, Session


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

    def _start(self, max_images: int) -> Any:
        from vllm import SamplingParams

        s = self.session.settings  # type: ignore[union-attr]
        engine = evaluate.VLLMBackend(self.model, s.max_tokens, self.tp, max_images, max_model_len=None)
        # evaluate's engine answers greedily; a teacher samples, so a second try is a different answer
        engine.params = SamplingParams(temperature=s.temperature, max_tokens=s.max_tokens)
        return engine

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
            outputs = self.engine.llm.generate(inputs, self.engine.params, use_tqdm=False)
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
    """vLLM's prompt dict for a problem, built by the evaluate CLI's functions (verl's rollout input)."""
    images = [evaluate.decode_image(item) for item in problem.images()]
    row = evaluate.Row(
        benchmark="experts",
        index=problem.positions[0],
        data_source=problem.data_source,
        messages=evaluate.build_messages(problem.prompt, images),
        images=images,
        ground_truth=None,  # never part of a model input
        extra_info=None,
    )
    return evaluate.vllm_input(evaluate.render(processor, row))
