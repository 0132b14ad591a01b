"""The agent loop against a faked model endpoint (aioresponses) and a recording desktop."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses

from agent import ModelConfig, run_agent
from agent.tools import Captured
from protocol.errors import CommandTimeout, ModelFailed, SandboxBroken
from sandboxes.base import Stream
from tests.fakes_agent import CompatResponse, RecordingDesktop, RecordingLog

MODEL = ModelConfig(url="https://model.test/v1/", model="tiny-vision", api_key="sk-test", max_steps=5)
ENDPOINT = "https://model.test/v1/chat/completions"


def call(name: str, arguments: Any, call_id: str = "") -> dict[str, Any]:
    """One entry of an assistant's tool_calls (arguments JSON-encoded unless a str)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id or f"id_{name}", "type": "function", "function": {"name": name, "arguments": text}}


def reply(*calls: dict[str, Any], content: str | None = None) -> dict[str, Any]:
    """A chat-completions answer whose message makes *calls*."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = list(calls)
    return {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}


class Model:
    """The fake endpoint: answers in order and keeps a copy of every request."""

    def __init__(self, mocked: aioresponses) -> None:
        self.mocked = mocked
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    def answers(self, *payloads: dict[str, Any]) -> None:
        for payload in payloads:
            self.mocked.post(ENDPOINT, callback=self._answer(payload))

    def _answer(self, payload: dict[str, Any]) -> Any:
        def callback(url: Any, **kwargs: Any) -> CallbackResult:
            # The loop reuses its message list: copy it as it was sent.
            self.requests.append(copy.deepcopy(kwargs["json"]))
            self.headers.append(dict(kwargs.get("headers") or {}))
            return CallbackResult(payload=payload, response_class=CompatResponse)

        return callback

    def messages(self, index: int) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.requests[index]["messages"]
        return messages


@pytest.fixture
def mocked() -> Iterator[aioresponses]:
    with aioresponses() as m:
        yield m


@pytest.fixture
def model(mocked: aioresponses) -> Model:
    return Model(mocked)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def desktop() -> RecordingDesktop:
    return RecordingDesktop()


@pytest.fixture
def log() -> RecordingLog:
    return RecordingLog()


class Output:
    """An output sink that keeps what it is given."""

    def __init__(self) -> None:
        self.chunks: list[tuple[Stream, str]] = []

    async def __call__(self, stream: Stream, data: str) -> None:
        self.chunks.append((stream, data))


def images(messages: list[dict[str, Any]]) -> list[str]:
    """The image URLs in *messages*, in order."""
    return [
        part["image_url"]["url"]
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]


async def test_task_clicks_types_and_finishes(
    model: Model, http: aiohttp.ClientSession, desktop: RecordingDesktop, log: RecordingLog
) -> None:
    """The model's tool calls drive the desktop, a screenshot follows each action, finish answers."""
    model.answers(
        reply(call("click", {"x": 10, "y": 20})),
        reply(call("type", {"text": "hello"}), call("key", {"keys": ["ctrl", "l"]})),
        reply(call("finish", {"answer": "done"})),
    )
    answer = await run_agent("say hello", desktop, MODEL, http, log, Output())
    assert answer == "done"
    assert desktop.calls == [
        ("screenshot", ()),
        ("left_click", (10, 20)),
        ("screenshot", ()),
        ("write", ("hello",)),
        ("press", (["ctrl", "l"],)),
        ("screenshot", ()),
    ]
    first = model.requests[0]
    assert first["model"] == "tiny-vision"
    assert {t["function"]["name"] for t in first["tools"]} >= {"click", "type", "key", "finish"}
    assert first["messages"][1] == {"role": "user", "content": "Task: say hello"}
    assert images(first["messages"])[0].startswith("data:image/png;base64,")
    assert model.headers[0]["Authorization"] == "Bearer sk-test"
    second = model.messages(1)
    assert second[-2] == {"role": "tool", "tool_call_id": "id_click", "content": "clicked at (10, 20)"}
    assert "2x1 pixels" in second[-1]["content"][0]["text"]
    assert log.events().count("agent.step") == 3
    assert [kw["tool"] for _, event, kw in log.entries if event == "agent.tool"] == [
        "click",
        "type",
        "key",
        "finish",
    ]


async def test_command_output_streams_and_returns_to_the_model(
    model: Model, http: aiohttp.ClientSession, desktop: RecordingDesktop, log: RecordingLog
) -> None:
    """A command's output goes to the session's sink as it comes and back to the model."""
    desktop.scripts["ls /tmp"] = ([("stdout", "a.txt\n"), ("stderr", "warn\n")], 0)
    model.answers(
        reply(call("command", {"cmd": "ls /tmp", "timeout": 30})),
        reply(call("finish", {"answer": "a.txt"})),
    )
    output = Output()
    assert await run_agent("list", desktop, MODEL, http, log, output) == "a.txt"
    assert output.chunks == [("stdout", "a.txt\n"), ("stderr", "warn\n")]
    assert ("run", ("ls /tmp", 30)) in desktop.calls
    tool = model.messages(1)[-2]
    assert tool["role"] == "tool"
    assert tool["content"] == "exit code 0\na.txt\nwarn\n"


async def test_slow_command_is_reported_to_the_model(
    model: Model, http: aiohttp.ClientSession, desktop: RecordingDesktop, log: RecordingLog
) -> None:
    """A command timing out is a tool result the model can react to, not the end of the run."""
    desktop.slow.add("sleep 999")
    model.answers(reply(call("command", {"cmd": "sleep 999"})), reply(call("finish", {"answer": "gave up"})))
    assert await run_agent("wait", desktop, MODEL, http, log, Output()) == "gave up"
    assert model.messages(1)[-2]["content"].startswith("timed out after 60 s")


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ("{not json", "error: arguments are not valid JSON"),
        ({"x": "left", "y": 3}, "error: 'x' must be an integer"),
        ({"x": 1, "y": 2, "colour": "red"}, "error: unexpected argument 'colour'"),
        ({"x": 1, "y": 2, "button": "right", "double": True}, "error: a double click uses the left button"),
    ],
)
async def test_malformed_tool_arguments_get_an_error_back(
    model: Model,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
    arguments: Any,
    error: str,
) -> None:
    """Wrong arguments are answered with an error tool message; the run goes on."""
    model.answers(reply(call("click", arguments)), reply(call("finish", {"answer": "ok"})))
    assert await run_agent("click", desktop, MODEL, http, log, Output()) == "ok"
    assert model.messages(1)[-1]["role"] == "tool"
    assert model.messages(1)[-1]["content"].startswith(error)
    assert "left_click" not in desktop.names()
    assert "agent.tool_error" in log.events()


async def test_unknown_tool_and_nameless_call_get_errors_back(
    model: Model, http: aiohttp.ClientSession, desktop: RecordingDesktop, log: RecordingLog
) -> None:
    """Each bad call of a reply gets its own error result, with its own id."""
    nameless = {"id": "id_x", "type": "function", "function": {"arguments": "{}"}}
    model.answers(reply(call("fly", {}), nameless), reply(call("finish", {"answer": "ok"})))
    assert await run_agent("fly", desktop, MODEL, http, log, Output()) == "ok"
    tools = [m for m in model.messages(1) if m["role"] == "tool"]
    assert [t["tool_call_id"] for t in tools] == ["id_fly", "id_x"]
    assert tools[0]["content"].startswith("error: unknown tool 'fly'")
    assert tools[1]["content"] == "error: a tool call needs a function with a name"


async def test_reply_without_tool_calls_is_nudged(
    model: Model, http: aiohttp.ClientSession, desktop: RecordingDesktop, log: RecordingLog
) -> None:
    """A text-only reply does not end the run: the model is asked to use a tool."""
    model.answers(reply(content="Let me think."), reply(call("finish", {"answer": "42"})))
    assert await run_agent("think", desktop, MODEL, http, log, Output()) == "42"
    assert model.messages(1)[-2] == {"role": "assistant", "content": "Let me think."}
    assert "call finish" in model.messages(1)[-1]["content"]


async def test_max_steps_exceeded(
    model: Model, http: aiohttp.ClientSession, desktop: RecordingDesktop, log: RecordingLog
) -> None:
    """A model that never finishes is stopped after max_steps with a clear error."""
    model.answers(*[reply(call("screenshot", {})) for _ in range(MODEL.max_steps)])
    with pytest.raises(ModelFailed, match="did not finish the task within 5 steps") as caught:
        await run_agent("loop", desktop, MODEL, http, log, Output())
    assert caught.value.code == "internal"
    assert len(model.requests) == 5
    assert "agent.gave_up" in log.events()


async def test_history_keeps_only_recent_screenshots(
    model: Model, http: aiohttp.ClientSession, desktop: RecordingDesktop, log: RecordingLog
) -> None:
    """Old screenshots leave the history, so each request stays small."""
    model.answers(*[reply(call("scroll", {"direction": "down"})) for _ in range(4)])
    model.answers(reply(call("finish", {"answer": "end"})))
    await run_agent("scroll", desktop, MODEL, http, log, Output())
    last = model.messages(4)
    assert len(images(last)) == 2
    assert "screenshot no longer shown" in last[2]["content"]


async def test_model_http_error(
    mocked: aioresponses, http: aiohttp.ClientSession, desktop: RecordingDesktop, log: RecordingLog
) -> None:
    """An HTTP error from the model is a ModelFailed quoting the status, not SandboxBroken."""
    mocked.post(ENDPOINT, status=401, body='{"error": {"message": "bad key"}}', response_class=CompatResponse)
    with pytest.raises(ModelFailed, match=r"HTTP 401.*bad key") as caught:
        await run_agent("x", desktop, MODEL, http, log, Output())
    assert not isinstance(caught.value, SandboxBroken)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("<html>oops</html>", "invalid JSON"),
        ('{"error": "overloaded"}', "without a message"),
        ('{"choices": []}', "without a message"),
    ],
)
async def test_model_bad_answer(
    mocked: aioresponses,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
    body: str,
    message: str,
) -> None:
    """An answer that is not a chat completion is a clear ModelFailed."""
    mocked.post(ENDPOINT, status=200, body=body, response_class=CompatResponse)
    with pytest.raises(ModelFailed, match=message):
        await run_agent("x", desktop, MODEL, http, log, Output())


async def test_model_timeout_and_connection_errors(
    mocked: aioresponses, http: aiohttp.ClientSession, desktop: RecordingDesktop, log: RecordingLog
) -> None:
    """A model that does not answer in time is CommandTimeout; an unreachable one ModelFailed."""
    mocked.post(ENDPOINT, timeout=True)
    with pytest.raises(CommandTimeout, match="model endpoint did not answer"):
        await run_agent("x", desktop, MODEL, http, log, Output())
    mocked.post(ENDPOINT, exception=aiohttp.ClientConnectionError("refused"))
    with pytest.raises(ModelFailed, match="model endpoint unreachable"):
        await run_agent("x", desktop, MODEL, http, log, Output())


def test_captured_output_keeps_head_and_tail() -> None:
    """Long command output reaches the model as its start and end with a marker between."""
    captured = Captured(10)
    for chunk in ["abc", "defgh", "ijklmnop", "qrst"]:
        captured.add(chunk)
    assert captured.text() == "abcde\n[… 10 characters left out …]\npqrst"


def test_model_key_is_not_in_the_repr() -> None:
    """The model's API key never shows in logs of the config."""
    assert "sk-test" not in repr(MODEL)
