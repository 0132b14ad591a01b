"""Fakes for the agent: a recording desktop and log, and a scripted model endpoint.

Model replies are built from OpenAI's own types, every request the agent
sends is checked against OpenAI's request type and the pairing rules real
servers enforce, and the endpoint is a real HTTP server on 127.0.0.1, so
statuses and headers are real.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestServer
from openai.types.chat import ChatCompletion, ChatCompletionMessage, ChatCompletionMessageFunctionToolCall
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_message_function_tool_call import Function
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from PIL import Image
from pydantic import TypeAdapter

from protocol.errors import CommandTimeout
from sandboxes.base import OutputSink, ScrollDirection, StepReporter, Stream


def png(width: int, height: int, shade: int = 0) -> bytes:
    """A real PNG of one colour (*shade* tells screenshots apart)."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (shade % 256, 80, 160)).save(out, format="PNG")
    return out.getvalue()


class RecordingDesktop:
    """Implements the Sandbox protocol by recording calls; commands follow a script."""

    kind = "fake"

    def __init__(self, size: tuple[int, int] = (40, 20)) -> None:
        #: Screen size; each screenshot is a real PNG of it, a shade apart from the last.
        self.size = size
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        #: cmd -> (output chunks, exit code); a missing cmd exits 0 silently.
        self.scripts: dict[str, tuple[list[tuple[Stream, str]], int]] = {}
        #: Commands that raise CommandTimeout after their output.
        self.slow: set[str] = set()

    @property
    def sandbox_id(self) -> str | None:
        return "recording"

    @property
    def stream_url(self) -> str | None:
        return None

    @property
    def desktop_running(self) -> bool:
        return True

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    async def start_desktop(self) -> None:
        self.calls.append(("start_desktop", ()))

    async def stop_desktop(self) -> None:
        self.calls.append(("stop_desktop", ()))

    async def setup(self, packages: Sequence[str], report: StepReporter) -> None:
        self.calls.append(("setup", (tuple(packages),)))

    async def run(self, cmd: str, *, timeout: float, on_output: OutputSink) -> int:
        self.calls.append(("run", (cmd, timeout)))
        chunks, code = self.scripts.get(cmd, ([], 0))
        for stream, data in chunks:
            await on_output(stream, data)
        if cmd in self.slow:
            raise CommandTimeout(f"command timed out after {timeout:g} s")
        return code

    async def screenshot(self) -> bytes:
        self.calls.append(("screenshot", ()))
        # A large screen's PNG takes a while to make: off the loop, as a real sandbox's is.
        return await asyncio.to_thread(png, *self.size, shade=len(self.calls) * 37)

    async def left_click(self, x: int, y: int) -> None:
        self.calls.append(("left_click", (x, y)))

    async def double_click(self, x: int, y: int) -> None:
        self.calls.append(("double_click", (x, y)))

    async def right_click(self, x: int, y: int) -> None:
        self.calls.append(("right_click", (x, y)))

    async def move_mouse(self, x: int, y: int) -> None:
        self.calls.append(("move_mouse", (x, y)))

    async def scroll(self, direction: ScrollDirection = "down", amount: int = 1) -> None:
        self.calls.append(("scroll", (direction, amount)))

    async def write(self, text: str) -> None:
        self.calls.append(("write", (text,)))

    async def press(self, keys: str | Sequence[str]) -> None:
        self.calls.append(("press", (keys,)))

    async def open(self, url_or_file: str) -> None:
        self.calls.append(("open", (url_or_file,)))

    async def launch(self, app: str) -> None:
        self.calls.append(("launch", (app,)))

    async def close(self) -> None:
        self.calls.append(("close", ()))


class RecordingLog:
    """A stand-in for a structlog bound logger that keeps (level, event, keys)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.entries.append(("info", event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.entries.append(("warning", event, kw))

    def events(self) -> list[str]:
        return [event for _, event, _ in self.entries]


class _NoStreamWriter:
    """The one attribute ClientResponse reads of a writer whose request was sent."""

    output_size = 0


class CompatResponse(ClientResponse):
    """A ClientResponse aioresponses 0.7.x can build under aiohttp 3.14.

    aiohttp 3.14 added a required ``stream_writer`` argument that aioresponses
    (0.7.9 and older) does not pass (pnuckowski/aioresponses#289); give every
    faked response one. Remove once aioresponses ships the fix.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _NEEDS_STREAM_WRITER:
            kwargs.setdefault("stream_writer", _NoStreamWriter())
        super().__init__(*args, **kwargs)


_NEEDS_STREAM_WRITER = "stream_writer" in inspect.signature(ClientResponse.__init__).parameters


# ----------------------------------------------------------------------------
# The model endpoint: replies from OpenAI's types, request checks, a real server

_PARAMS: TypeAdapter[CompletionCreateParamsNonStreaming] = TypeAdapter(CompletionCreateParamsNonStreaming)
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")


def tool_call(
    name: str, arguments: dict[str, Any], call_id: str = ""
) -> ChatCompletionMessageFunctionToolCall:
    """One function call, as OpenAI's client types it."""
    function = Function(name=name, arguments=json.dumps(arguments))
    return ChatCompletionMessageFunctionToolCall(
        id=call_id or f"call_{name}", type="function", function=function
    )


def completion(
    *calls: ChatCompletionMessageFunctionToolCall,
    content: str | None = None,
    refusal: str | None = None,
    finish_reason: str = "",
) -> dict[str, Any]:
    """A chat completion as OpenAI sends it (every field, nulls included)."""
    message = ChatCompletionMessage(
        role="assistant", content=content, refusal=refusal, tool_calls=list(calls) or None
    )
    reason = finish_reason or ("tool_calls" if calls else "stop")
    choice = Choice(index=0, message=message, finish_reason=reason)  # type: ignore[arg-type]
    reply = ChatCompletion(id="chatcmpl-1", object="chat.completion", created=0, model="m", choices=[choice])
    return reply.model_dump(mode="json")


def finish(answer: str) -> dict[str, Any]:
    return completion(tool_call("finish", {"answer": answer}))


def check_request(body: dict[str, Any], max_images: int = 1) -> None:
    """Fail unless *body* is a valid OpenAI request whose calls and results pair up."""
    _drain(_PARAMS.validate_python(body))
    messages = body["messages"]
    seen: set[str] = set()
    waiting: list[str] = []
    for message in messages:
        if message["role"] == "tool":
            assert message["tool_call_id"] in waiting, f"a result for no open call: {message}"
            waiting.remove(message["tool_call_id"])
            continue
        assert not waiting, f"calls left unanswered: {waiting}"
        for call in message.get("tool_calls", []):
            assert _MISTRAL_ID.fullmatch(call["id"]), f"id not 9 alphanumerics: {call['id']!r}"
            assert call["id"] not in seen, f"duplicate call id {call['id']}"
            assert isinstance(call["function"]["arguments"], str)
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
            seen.add(call["id"])
            waiting.append(call["id"])
    images = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if "image_url" in p]
    assert len(images) <= max_images, f"{len(images)} images in one request"


def _drain(value: object) -> None:
    """Walk what pydantic validated: Iterable fields are validated only as they are read."""
    if isinstance(value, dict):
        for item in value.values():
            _drain(item)
    elif isinstance(value, Iterator | list | tuple):
        for item in list(value):
            _drain(item)


@attrs.frozen(kw_only=True)
class Answer:
    """One scripted HTTP answer."""

    status: int = 200
    headers: dict[str, str] = attrs.Factory(dict)
    body: bytes = b""
    #: Never answer (until the server closes): a model that does not reply in time.
    hold: bool = False

    @classmethod
    def json(cls, payload: dict[str, Any], status: int = 200, **headers: str) -> Answer:
        return cls(status=status, headers=headers, body=json.dumps(payload).encode())


@attrs.define
class Seen:
    """One request the endpoint received."""

    at: float
    body: dict[str, Any]
    headers: dict[str, str]


class ModelServer:
    """A real HTTP server speaking chat completions from a script; every request is checked."""

    def __init__(self, max_images: int = 1) -> None:
        self.script: list[Answer] = []
        self.requests: list[Seen] = []
        self.max_images = max_images
        self.problems: list[str] = []
        self.arrived = asyncio.Event()
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    async def start(self) -> None:
        await self.server.start_server()

    async def close(self) -> None:
        self._closing.set()
        await self.server.close()

    @property
    def url(self) -> str:
        return str(self.server.make_url("/v1"))

    def answer(self, *answers: Answer | dict[str, Any]) -> None:
        self.script.extend(a if isinstance(a, Answer) else Answer.json(a) for a in answers)

    def bodies(self) -> list[dict[str, Any]]:
        return [seen.body for seen in self.requests]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Seen(at=time.monotonic(), body=body, headers=dict(request.headers)))
        self.arrived.set()
        try:
            check_request(body, self.max_images)
        except AssertionError as exc:  # reported by the fixture: the agent's bug, not the server's
            self.problems.append(str(exc))
        except ValueError as exc:  # pydantic's ValidationError
            self.problems.append(str(exc))
        if not self.script:
            return web.Response(status=400, text="the test's script ran out")
        answer = self.script.pop(0)
        if answer.hold:
            async with asyncio.timeout(30):
                await self._closing.wait()
        return web.Response(status=answer.status, headers=answer.headers, body=answer.body)
