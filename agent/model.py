"""The model endpoint: one OpenAI-compatible chat-completions round trip, retried.

Failures of the endpoint are not failures of the sandbox, so they are never
``SandboxBroken``: a model that does not answer in time is a
``CommandTimeout`` (the run outlived a timeout), anything else a plain
``ModelFailed`` (code ``internal``) whose message says what went wrong.

Real endpoints rate-limit and fail transiently, so a request answered 408,
409, 429 or 5xx, or lost to a connection error or a timeout, is sent again a
bounded number of times, after the delay the server asked for
(``retry-after-ms``, ``Retry-After``) or a jittered exponential backoff, as
OpenAI's own client does. The key never appears in an error or a log line:
servers and proxies do echo it back in their error bodies.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Mapping
from typing import Any, Literal

import aiohttp
import attrs

from agent.tools import AgentLog
from protocol.errors import CommandTimeout, GatewayError, ModelFailed

#: Statuses worth another try (OpenAI's client retries the same set).
RETRY_STATUSES = frozenset({408, 409, 429})
#: A server-asked delay above this is not waited for; our own backoff is used.
MAX_SERVER_DELAY = 60.0
#: The longest backoff of our own between two tries.
MAX_BACKOFF = 8.0


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Where the agent's model lives, how it sees the screen and how long it may work."""

    #: Base URL of an OpenAI-compatible API, e.g. ``https://api.openai.com/v1``.
    url: str
    #: Model name sent with every request.
    model: str
    api_key: str | None = attrs.field(default=None, repr=False)
    #: Seconds one completion may take (``--model-timeout``).
    timeout: float = 120.0
    #: Model round trips before the agent gives up (``--agent-max-steps``).
    max_steps: int = 30
    #: Seconds a whole task may take, tools included (``--agent-timeout``).
    task_timeout: float = 1800.0
    #: Tries after the first for a retryable failure (``--model-retries``).
    retries: int = 2
    #: First backoff in seconds when the server names no delay; doubles per try.
    retry_delay: float = 0.5
    #: Screenshots sent per request (``--agent-images``); vLLM often takes one.
    keep_images: int = 1
    #: Screenshots are scaled down to fit this box (``--agent-image-width/-height``).
    image_width: int = 1280
    image_height: int = 1280
    #: How screenshots are sent (``--agent-image-format``).
    image_format: Literal["jpeg", "png"] = "jpeg"
    #: 0: the model answers pixels of the screenshot; N: a 0..N grid (1000 for Qwen-VL, UI-TARS).
    coordinate_grid: int = 0

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"


class _Retryable(Exception):
    """A failed try worth repeating; *error* is raised if no try is left."""

    def __init__(self, error: GatewayError, delay: float | None = None, status: int | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.delay = delay
        self.status = status


async def complete(
    http: aiohttp.ClientSession,
    model: ModelConfig,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    log: AgentLog | None = None,
) -> dict[str, Any]:
    """The first choice (``message``, ``finish_reason``) the model answers *messages* with."""
    body = {"model": model.model, "messages": messages, "tools": tools, "tool_choice": "auto"}
    for attempt in range(model.retries + 1):
        try:
            return await _attempt(http, model, body)
        except _Retryable as failed:
            if attempt == model.retries:
                raise failed.error from None
            delay = failed.delay if failed.delay is not None else _backoff(model.retry_delay, attempt)
            if log is not None:
                log.warning("model.retry", attempt=attempt + 1, status=failed.status, delay=round(delay, 3))
            await asyncio.sleep(delay)  # a backoff, not a wait for an event
    raise AssertionError("unreachable: the last try raises")


async def _attempt(http: aiohttp.ClientSession, model: ModelConfig, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {model.api_key}"} if model.api_key else {}
    try:
        async with asyncio.timeout(model.timeout):
            async with http.post(model.endpoint, json=body, headers=headers) as response:
                status, reply, raw = response.status, response.headers, await response.read()
    except TimeoutError as exc:
        error = CommandTimeout(f"model endpoint did not answer within {model.timeout:g} s")
        raise _Retryable(error) from exc
    except aiohttp.ClientError as exc:
        text = _redact(f"model endpoint unreachable: {type(exc).__name__}: {exc}", model.api_key)
        raise _Retryable(ModelFailed(text)) from exc
    if status >= 400:
        failed = ModelFailed(f"model endpoint answered HTTP {status}: {_snippet(raw, model.api_key)}")
        if _should_retry(status, reply):
            raise _Retryable(failed, _server_delay(reply), status)
        raise failed
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        text = _snippet(raw, model.api_key)
        raise ModelFailed(f"model endpoint answered text that is not UTF-8: {text}") from None
    except ValueError:
        raise ModelFailed(f"model endpoint answered invalid JSON: {_snippet(raw, model.api_key)}") from None
    return _first_choice(data, model.api_key)


def _should_retry(status: int, headers: Mapping[str, str]) -> bool:
    # OpenAI's servers say so themselves when they know better than the status.
    should = headers.get("x-should-retry", "").lower()
    if should in {"true", "false"}:
        return should == "true"
    return status in RETRY_STATUSES or status >= 500


def _server_delay(headers: Mapping[str, str]) -> float | None:
    """The delay the server asked for, in seconds, if any and not too long."""
    delay: float | None = None
    try:
        if "retry-after-ms" in headers:
            delay = float(headers["retry-after-ms"]) / 1000
        elif "retry-after" in headers:
            delay = float(headers["retry-after"])
    except ValueError:
        delay = _http_date_delay(headers.get("retry-after", ""))
    if delay is None or not 0 <= delay <= MAX_SERVER_DELAY:
        return None
    return delay


def _http_date_delay(text: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def _backoff(first: float, attempt: int) -> float:
    """Exponential from *first*, capped, with up to a quarter taken off at random."""
    return float(min(first * 2**attempt, MAX_BACKOFF) * (1 - 0.25 * random.random()))


def _first_choice(data: object, key: str | None) -> dict[str, Any]:
    choices = data.get("choices") if isinstance(data, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(first, dict) or not isinstance(message, dict):
        text = json.dumps(data, ensure_ascii=False)
        raise ModelFailed(f"model endpoint answered without a message: {_snippet(text, key)}")
    return first


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "[redacted]") if key else text


def _snippet(raw: bytes | str, key: str | None, limit: int = 300) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = " ".join(_redact(text, key).split())
    return text if len(text) <= limit else text[:limit] + "…"
