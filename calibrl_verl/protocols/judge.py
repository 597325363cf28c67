"""A model judge that extracts answers, as the public harness does for MathVista and MathVerse.

lmms-eval asks a GPT model to pull the final answer out of a free-form response (its prompts: the rule sets in
``calibrl_verl.protocols.community``); the extracted answer is then scored by the same rules as the rule-based path,
so ``summary.json`` can show judge and rule-based scores side by side. Any OpenAI-compatible chat endpoint serves
(OpenAI, ``vllm serve`` of a local model, a gateway):

    --judge-base-url URL --judge-model NAME [--judge-api-key-env OPENAI_API_KEY] [--judge-cache FILE]

The key is read from the environment variable named by ``--judge-api-key-env`` and never written anywhere. Requests
go through the expert backend's client and retry rules (``calibrl_verl.experts.endpoint.with_retries``: back-off with
jitter on 408 / 409 / 429 / 5xx, timeouts, dropped connections; 401 / 403 / 404 stop the run) at temperature 0.
Every reply is appended to a JSONL cache (``<out>/judge_cache.jsonl`` by default) keyed by the SHA-256 of the judge
model and the full prompt, so a re-run sends no request for an answer already judged; a request that fails after its
retries gets no judge answer (counted in ``judge_errors``) and is not cached, so the next run asks again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrl_verl.experts.endpoint import RetryPolicy, parse_completion, with_retries

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
MAX_TOKENS = 256  # an extracted answer is short


class JudgeError(Exception):
    """The judge cannot run (no key in the named variable, an unreadable cache line)."""


@dataclass
class JudgeSettings:
    base_url: str
    model: str
    cache: Path
    api_key_env: str = DEFAULT_KEY_ENV
    max_retries: int = 5
    timeout: float = 60.0
    concurrency: int = 8


@dataclass
class JudgeStats:
    requests: int = 0  # HTTP requests sent (retries included)
    cached: int = 0  # prompts answered from the cache
    errors: int = 0  # prompts left without an answer after the retries

    def as_dict(self) -> dict[str, int]:
        return {"judge_requests": self.requests, "judge_cached": self.cached, "judge_errors": self.errors}


def cache_key(model: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()


class JudgeCache:
    """``{"key", "model", "reply"}`` lines; loaded once, appended (and flushed) per reply."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replies: dict[str, str] = {}
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self.replies[entry["key"]] = entry["reply"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise JudgeError(f"{path}: line {number} is not a judge cache entry ({err}); delete the line "
                                     "or the file to judge those answers again") from None

    def add(self, key: str, model: str, reply: str) -> None:
        self.replies[key] = reply
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"key": key, "model": model, "reply": reply}, ensure_ascii=False) + "\n")


class Judge:
    """Ask an OpenAI-compatible endpoint for each prompt's reply, cached."""

    def __init__(self, settings: JudgeSettings) -> None:
        key = os.environ.get(settings.api_key_env)
        if not key:
            raise JudgeError(f"--judge-api-key-env: the environment variable {settings.api_key_env} is not set "
                             "(export it; a local server without auth takes any value, e.g. EMPTY)")
        self.settings = settings
        self._key = key
        self.cache = JudgeCache(settings.cache)
        self.stats = JudgeStats()

    def ask(self, prompts: Sequence[str]) -> list[str | None]:
        """The judge's reply to each prompt (None where it failed after its retries)."""
        keys = [cache_key(self.settings.model, p) for p in prompts]
        missing = {k: p for k, p in zip(keys, prompts, strict=True) if k not in self.cache.replies}
        self.stats.cached += len(prompts) - sum(1 for k in keys if k in missing)
        if missing:
            asyncio.run(self._ask_all(missing))
        return [self.cache.replies.get(k) for k in keys]

    async def _ask_all(self, prompts: dict[str, str]) -> None:
        from openai import AsyncOpenAI

        queue = list(prompts.items())
        async with AsyncOpenAI(base_url=self.settings.base_url, api_key=self._key, timeout=self.settings.timeout,
                               max_retries=0) as client:  # fmt: skip
            async def worker() -> None:
                while queue:
                    key, prompt = queue.pop()
                    await self._ask_one(client, key, prompt)

            await asyncio.gather(*(worker() for _ in range(min(self.settings.concurrency, len(queue)))))

    async def _ask_one(self, client: Any, key: str, prompt: str) -> None:
        s = self.settings

        async def call() -> str:
            request = client.chat.completions.create(model=s.model, temperature=0.0, max_tokens=MAX_TOKENS,
                                                     messages=[{"role": "user", "content": prompt}])
            text, _, _, _ = parse_completion(await asyncio.wait_for(request, timeout=s.timeout))
            return text or ""

        def count(error: bool, retry: bool) -> None:
            self.stats.requests += 1

        reply, _, _ = await with_retries(call, RetryPolicy(s.max_retries), s.timeout, self._redact, count)
        if reply is None:
            self.stats.errors += 1
        else:
            self.cache.add(key, s.model, reply)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***")
