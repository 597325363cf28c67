"""The endpoint backend: any OpenAI-compatible chat-completions server (OpenAI, ``vllm serve``, SGLang, a gateway).

Each problem's own prompt is sent as its chat messages; every ``<image>`` placeholder becomes an ``image_url``
part holding the image as a base64 data URL, in placeholder order (``generation.build_messages`` places them, as
verl's dataset does). Nothing else of the row is sent: never the ground truth, ``extra_info`` or ``solution``.

Faults: the ``openai`` client's own retries are off (``max_retries=0``) and ours apply, so that they are
testable and the same for every server: up to ``--max-retries`` repeats, with exponential back-off and jitter,
on 408 / 409 / 429 / 5xx (a ``Retry-After`` / ``retry-after-ms`` header is honoured), timeouts (``--timeout``
per request), dropped connections and malformed bodies. Any other refusal of one request (400, 413, 422: a
problem the endpoint cannot take) ends that problem with the error. 401 / 403 / 404 (bad key, no access,
unknown model or URL) would fail every problem alike, so they stop the run instead, before the problem is cached.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from calibrl_verl.experts.data import Problem
from calibrl_verl.experts.session import Reply, Session
from calibrl_verl.generation import build_messages, decode_image

BACKOFF_ENV = "CALIBRL_EXPERTS_BACKOFF_S"  # tests shrink the back-off through it; real runs keep the default
DEFAULT_BACKOFF_BASE_S = 1.0
MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 600.0
RETRY_STATUSES = frozenset({408, 409, 429})
FATAL_STATUSES = frozenset({401, 403, 404})
MAX_ERROR_CHARS = 300
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"))  # fmt: skip


class FatalEndpointError(Exception):
    """The endpoint refuses every request alike (key, permission, model name, URL): the run stops."""


class MalformedResponse(Exception):
    """A 2xx reply that is not a chat completion with a message."""


# ------------------------------------------------------------------------------------------------------ requests


def request_messages(problem: Problem) -> list[dict[str, Any]]:
    """The problem's chat messages with each ``<image>`` placeholder turned into an ``image_url`` data URL."""
    urls = [data_url(item) for item in problem.images()]
    messages = build_messages(problem.prompt, urls)
    return [{"role": m["role"], "content": _openai_content(m["content"])} for m in messages]


def _openai_content(content: Any) -> Any:
    if isinstance(content, str):
        return content
    return [
        {"type": "image_url", "image_url": {"url": part["image"]}} if part["type"] == "image" else part
        for part in content
    ]


def data_url(item: Any) -> str:
    """``data:<mime>;base64,...``: stored PNG / JPEG / GIF / WebP bytes go as they are, anything else as PNG."""
    raw = item.get("bytes") if isinstance(item, dict) else item
    mime = _mime(raw) if isinstance(raw, bytes | bytearray) else None
    if mime is not None:
        payload = bytes(raw)
    else:  # a path, a PIL image or bytes of a format chat APIs do not take: decode, send as PNG
        buffer = io.BytesIO()
        decode_image(item).save(buffer, format="PNG")
        payload, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _mime(data: bytes | bytearray) -> str | None:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


# -------------------------------------------------------------------------------------------------------- retries


@dataclass
class RetryPolicy:
    """Exponential back-off with jitter; a server's Retry-After wins when it asks for longer."""

    max_retries: int
    base_s: float = field(default_factory=lambda: float(os.environ.get(BACKOFF_ENV, DEFAULT_BACKOFF_BASE_S)))
    max_s: float = MAX_BACKOFF_S

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds before repeat number ``retry`` (0-based): half of the exponential step fixed, half random
        (spreads the workers that failed together), at least what Retry-After asked, plus up to 10% on top of it
        (so they do not all return in the same instant either)."""
        step = min(self.max_s, self.base_s * 2**retry)
        backoff = step / 2 + random.uniform(0, step / 2)
        if retry_after is None:
            return backoff
        wait = min(retry_after, MAX_RETRY_AFTER_S)
        return max(backoff, wait * random.uniform(1.0, 1.1))


def retry_after_seconds(headers: Any) -> float | None:
    """``retry-after-ms`` (OpenAI's), else ``Retry-After`` in seconds or as an HTTP date; None when absent."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    try:
        if millis is not None:
            return max(0.0, float(millis) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


@dataclass
class Failure:
    """One failed request, classified."""

    message: str
    retryable: bool
    retry_after: float | None = None


def classify(exc: BaseException, timeout: float) -> Failure:
    """What a request's exception means for the retry policy; FatalEndpointError for run-wide refusals."""
    import openai

    if isinstance(exc, openai.APITimeoutError | asyncio.TimeoutError):
        return Failure(f"timeout: no reply within {timeout:g} s", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause else str(exc)
        return Failure(f"connection error: {detail}", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        # the client's message is "Error code: N - <the body's error message>"; keep the body's part
        message = f"HTTP {status}: {_short(exc.message.removeprefix(f'Error code: {status} - '))}"
        if status in FATAL_STATUSES:
            raise FatalEndpointError(message) from exc
        retryable = status in RETRY_STATUSES or status >= 500
        return Failure(message, retryable=retryable, retry_after=retry_after_seconds(exc.response.headers))
    if isinstance(exc, MalformedResponse | json.JSONDecodeError | openai.APIResponseValidationError):
        return Failure(f"malformed response: {_short(str(exc))}", retryable=True)
    return Failure(f"{type(exc).__name__}: {_short(str(exc))}", retryable=False)


T = TypeVar("T")


async def with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy, timeout: float,
                       redact: Callable[[str], str] = str, count: Callable[[bool, bool], None] | None = None,
                       ) -> tuple[T | None, str | None, int]:
    """``(result, None, tries)`` of ``call()``, repeated up to ``policy.max_retries`` times on retryable failures
    (``classify``) after the policy's back-off; ``(None, last error, tries)`` when it gives up. A run-wide refusal
    raises FatalEndpointError. ``count(error, retry)`` sees every attempt; ``redact`` cleans error texts. The expert
    backend and the evaluation judge (``calibrl_verl.protocols.judge``) both send through it."""
    failure = None
    for tries in range(1, policy.max_retries + 2):
        if failure is not None:
            await asyncio.sleep(policy.delay(tries - 2, failure.retry_after))
        try:
            result = await call()
        except Exception as exc:  # (cancellation is a BaseException: it still stops the caller)
            if count is not None:
                count(True, tries > 1)
            try:
                failure = classify(exc, timeout)
            except FatalEndpointError as fatal:
                raise FatalEndpointError(redact(str(fatal))) from None
            failure.message = redact(failure.message)
            if not failure.retryable:
                break
            continue
        if count is not None:
            count(False, tries > 1)
        return result, None, tries
    assert failure is not None
    return None, failure.message, tries


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def parse_completion(completion: Any) -> tuple[str | None, str | None, int, int]:
    """``(text, served model, prompt tokens, completion tokens)``; MalformedResponse for anything else.

    The ``openai`` client does not validate bodies: a non-json body arrives as a ``str`` and a json object
    without ``choices`` as a model missing the attribute, so the checks are here.
    """
    if isinstance(completion, str):
        raise MalformedResponse(f"body is not json: {completion[:80]!r}")
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse("no choices in the reply")
    message = getattr(choices[0], "message", None)
    text = getattr(message, "content", None)
    if message is None or not (text is None or isinstance(text, str)):
        raise MalformedResponse("the first choice has no message text")
    usage = getattr(completion, "usage", None)
    served = getattr(completion, "model", None)
    return (
        text,
        served if isinstance(served, str) and served else None,
        int(getattr(usage, "prompt_tokens", 0) or 0),
        int(getattr(usage, "completion_tokens", 0) or 0),
    )


# -------------------------------------------------------------------------------------------------------- backend


class EndpointBackend:
    """Async chat completions, ``concurrency`` problems in flight, each sampled until verified or out of samples."""

    def __init__(self, base_url: str, api_key: str, timeout: float, policy: RetryPolicy, concurrency: int) -> None:
        self.base_url = base_url
        self._api_key = api_key
        self.timeout = timeout
        self.policy = policy
        self.concurrency = concurrency
        self.client: Any = None
        self.session: Session | None = None

    def run(self, pending: list[tuple[Problem, int]], session: Session) -> None:
        """Sample every pending ``(problem, samples already done)``; each ends solved or failed in the cache."""
        asyncio.run(self._run(pending, session))

    async def _run(self, pending: list[tuple[Problem, int]], session: Session) -> None:
        from openai import AsyncOpenAI

        self.session = session
        queue = deque(pending)
        async with AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout,
                               max_retries=0) as self.client:  # fmt: skip
            workers = [asyncio.create_task(self._worker(queue)) for _ in range(min(self.concurrency, len(queue)))]
            try:
                await asyncio.gather(*workers)
            except BaseException:  # a fatal refusal (or Ctrl-C): stop the other workers before leaving
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                raise

    async def _worker(self, queue: deque) -> None:
        while queue:
            problem, done = queue.popleft()
            await self.solve(problem, done)

    async def solve(self, problem: Problem, done: int) -> None:
        """Samples ``done..samples-1`` of one problem, stopping at an error or (unless ``--keep all``) at the first
        verified one."""
        session = self.session
        assert session is not None
        try:
            messages = request_messages(problem)
        except Exception as exc:  # an undecodable image: this problem fails, the run goes on
            session.record(problem, done, Reply(error=f"bad input: {type(exc).__name__}: {exc}", tries=0))
            session.settle(problem)
            return
        for sample in range(done, session.settings.samples):
            reply = await self.complete(messages)
            if session.settings.settles(session.record(problem, sample, reply)):
                break
        session.settle(problem)

    async def complete(self, messages: list[dict[str, Any]]) -> Reply:
        """One sample: the request and up to ``max_retries`` repeats; a Reply with the text or the last error."""
        session = self.session
        assert session is not None
        start = time.monotonic()
        result, error, tries = await with_retries(
            lambda: self._request(messages), self.policy, self.timeout, self._redact,
            lambda error, retry: session.count_request(error=error, retry=retry))
        if result is None:
            return Reply(error=error, tries=tries, latency_s=time.monotonic() - start)
        text, served, prompt_tokens, completion_tokens = result
        return Reply(text, None, served, prompt_tokens, completion_tokens, tries, time.monotonic() - start)

    async def _request(self, messages: list[dict[str, Any]]) -> tuple[str | None, str | None, int, int]:
        s = self.session.settings  # type: ignore[union-attr]
        call = self.client.chat.completions.create(
            model=s.model, messages=messages, temperature=s.temperature, max_tokens=s.max_tokens
        )
        # The client's timeout bounds each network read; this bounds the whole request.
        completion = await asyncio.wait_for(call, timeout=self.timeout)
        return parse_completion(completion)

    def _redact(self, text: str) -> str:
        """Error bodies go to the cache and the failures file: a gateway that echoes the key must not leak it."""
        return text.replace(self._api_key, "***") if self._api_key else text
