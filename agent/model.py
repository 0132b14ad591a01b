"""The model endpoint: one OpenAI-compatible chat-completions round trip.

Failures of the endpoint are not failures of the sandbox, so they are never
``SandboxBroken``: a model that does not answer in time is a
``CommandTimeout`` (the run outlived a timeout), anything else a plain
``ModelFailed`` (code ``internal``) whose message says what went wrong.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import attrs

from protocol.errors import CommandTimeout, ModelFailed


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Where the agent's model lives and how long it may think."""

    #: Base URL of an OpenAI-compatible API, e.g. ``https://api.openai.com/v1``.
    url: str
    #: Model name sent with every request.
    model: str
    api_key: str | None = attrs.field(default=None, repr=False)
    #: Seconds one completion may take.
    timeout: float = 120.0
    #: Model round trips before the agent gives up.
    max_steps: int = 30

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"


async def complete(
    http: aiohttp.ClientSession,
    model: ModelConfig,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
) -> dict[str, Any]:
    """The assistant message the model answers *messages* with, tools offered."""
    body = {"model": model.model, "messages": messages, "tools": tools, "tool_choice": "auto"}
    headers = {"Authorization": f"Bearer {model.api_key}"} if model.api_key else {}
    try:
        async with asyncio.timeout(model.timeout):
            async with http.post(model.endpoint, json=body, headers=headers) as response:
                status, raw = response.status, await response.read()
    except TimeoutError as exc:
        raise CommandTimeout(f"model endpoint did not answer within {model.timeout:g} s") from exc
    except aiohttp.ClientError as exc:
        reason = _hide(f"{type(exc).__name__}: {exc}", model)
        raise ModelFailed(f"model endpoint unreachable: {reason}") from exc
    # Decoded here, never by aiohttp: invalid UTF-8 is the endpoint's fault,
    # not an exception whose traceback passes through the request's headers.
    text = raw.decode("utf-8", errors="replace")
    if status >= 400:
        raise ModelFailed(f"model endpoint answered HTTP {status}: {_snippet(_hide(text, model))}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ModelFailed(f"model endpoint answered invalid JSON: {_snippet(_hide(text, model))}") from exc
    return _first_message(data)


def _hide(text: str, model: ModelConfig) -> str:
    """*text* without the key: an endpoint may echo the request it refused."""
    return text.replace(model.api_key, "<model key>") if model.api_key else text


def _first_message(data: object) -> dict[str, Any]:
    choices = data.get("choices") if isinstance(data, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise ModelFailed(f"model endpoint answered without a message: {_snippet(json.dumps(data))}")
    return message


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"
