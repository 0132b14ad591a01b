"""The agent loop against a scripted model endpoint on 127.0.0.1 and a recording desktop."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import attrs
import pytest

from agent import AgentResult, ModelConfig, run_agent
from agent.tools import Captured
from protocol.errors import CommandTimeout, ModelFailed
from sandboxes.base import Stream
from tests.fakes_agent import (
    Answer,
    ModelServer,
    RecordingDesktop,
    RecordingLog,
    completion,
    finish,
    tool_call,
)


@pytest.fixture
def model(endpoint: ModelServer) -> ModelConfig:
    return ModelConfig(url=endpoint.url + "/", model="tiny-vision", api_key="sk-test", max_steps=5)


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


def steps(log: RecordingLog) -> list[dict[str, Any]]:
    return [kw for _, event, kw in log.entries if event == "agent.step"]


async def test_task_clicks_types_and_finishes(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
) -> None:
    """The model's tool calls drive the desktop, a screenshot follows each action, finish answers."""
    endpoint.answer(
        completion(tool_call("click", {"x": 10, "y": 12})),
        completion(tool_call("type", {"text": "hello"}), tool_call("key", {"keys": ["ctrl", "l"]})),
        finish("done"),
    )
    result = await run_agent("say hello", desktop, model, http, log, Output())
    assert result == AgentResult(answer="done", steps=3)
    assert desktop.names() == ["screenshot", "left_click", "screenshot", "write", "press", "screenshot"]
    assert ("left_click", (10, 12)) in desktop.calls and ("write", ("hello",)) in desktop.calls
    first = endpoint.bodies()[0]
    assert first["model"] == "tiny-vision"
    assert {t["function"]["name"] for t in first["tools"]} >= {"click", "type", "key", "finish"}
    assert first["messages"][1] == {"role": "user", "content": "Task: say hello"}
    assert images(first["messages"])[0].startswith("data:image/jpeg;base64,")
    assert endpoint.requests[0].headers["Authorization"] == "Bearer sk-test"
    second = endpoint.bodies()[1]["messages"]
    assert second[-2]["role"] == "tool" and second[-2]["content"] == "clicked at (10, 12)"
    assert "40x20 pixels" in second[-1]["content"][0]["text"]
    assert [s["action"] for s in steps(log)] == [
        "click(x=10, y=12)",
        'type(text="hello"); key(keys=["ctrl", "l"])',
        'finish(answer="done")',
    ]


async def test_command_output_streams_and_returns_to_the_model(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
) -> None:
    """A command's output goes to the session's sink as it comes and back to the model."""
    desktop.scripts["ls /tmp"] = ([("stdout", "a.txt\n"), ("stderr", "warn\n")], 0)
    endpoint.answer(completion(tool_call("command", {"cmd": "ls /tmp", "timeout": 30})), finish("a.txt"))
    output = Output()
    assert (await run_agent("list", desktop, model, http, log, output)).answer == "a.txt"
    assert output.chunks == [("stdout", "a.txt\n"), ("stderr", "warn\n")]
    assert ("run", ("ls /tmp", 30)) in desktop.calls
    tool = endpoint.bodies()[1]["messages"][-2]
    assert tool["role"] == "tool" and tool["content"] == "exit code 0\na.txt\nwarn\n"
    assert steps(log)[0]["outcome"] == "exit code 0"


async def test_slow_command_is_reported_to_the_model(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
) -> None:
    """A command timing out is a tool result the model can react to, not the end of the run."""
    desktop.slow.add("sleep 999")
    endpoint.answer(completion(tool_call("command", {"cmd": "sleep 999"})), finish("gave up"))
    assert (await run_agent("wait", desktop, model, http, log, Output())).answer == "gave up"
    assert endpoint.bodies()[1]["messages"][-2]["content"].startswith("timed out after 60 s")


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ("{not json", "error: arguments are not valid JSON"),
        ({"x": "left", "y": 3}, "error: 'x' must be a number"),
        ({"x": 1, "y": 2, "colour": "red"}, "error: unexpected argument 'colour'"),
        ({"x": 1, "y": 2, "button": "right", "double": True}, "error: a double click uses the left button"),
    ],
)
async def test_malformed_tool_arguments_get_an_error_back(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
    arguments: Any,
    error: str,
) -> None:
    """Wrong arguments are answered with an error tool message; the run goes on."""
    reply = completion(tool_call("click", {}))
    function = reply["choices"][0]["message"]["tool_calls"][0]["function"]
    function["arguments"] = arguments if isinstance(arguments, str) else json.dumps(arguments)
    endpoint.answer(reply, finish("ok"))
    assert (await run_agent("click", desktop, model, http, log, Output())).answer == "ok"
    last = endpoint.bodies()[1]["messages"][-1]
    assert last["role"] == "tool" and last["content"].startswith(error)
    assert "left_click" not in desktop.names()
    assert steps(log)[0]["outcome"].startswith(error)


async def test_unknown_tool_and_nameless_call_get_errors_back(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
) -> None:
    """Each bad call of a reply gets its own error result, paired with its own call."""
    reply = completion(tool_call("fly", {}), tool_call("x", {}, call_id="id_x"))
    del reply["choices"][0]["message"]["tool_calls"][1]["function"]["name"]
    endpoint.answer(reply, finish("ok"))
    assert (await run_agent("fly", desktop, model, http, log, Output())).answer == "ok"
    messages = endpoint.bodies()[1]["messages"]
    calls = next(m for m in messages if m.get("tool_calls"))["tool_calls"]
    tools = [m for m in messages if m["role"] == "tool"]
    assert [t["tool_call_id"] for t in tools] == [c["id"] for c in calls]
    assert tools[0]["content"].startswith("error: unknown tool 'fly'")
    assert tools[1]["content"] == "error: a tool call needs a function with a name"


async def test_reply_without_tool_calls_or_text_is_nudged(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
) -> None:
    """An empty reply does not end the run: the model is asked to use a tool."""
    endpoint.answer(completion(content=""), finish("42"))
    assert await run_agent("think", desktop, model, http, log, Output()) == AgentResult(answer="42", steps=2)
    assert "call finish" in endpoint.bodies()[1]["messages"][-1]["content"]


async def test_max_steps_exceeded(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
) -> None:
    """A model that never finishes is stopped after max_steps with a clear error."""
    endpoint.answer(*[completion(tool_call("screenshot", {})) for _ in range(5)])
    with pytest.raises(ModelFailed, match="did not finish the task within 5 steps") as caught:
        await run_agent("loop", desktop, model, http, log, Output())
    assert caught.value.code == "internal"
    assert len(endpoint.requests) == 5
    assert "agent.gave_up" in log.events()


@pytest.mark.parametrize("keep", [1, 2])
async def test_history_keeps_only_the_configured_screenshots(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
    keep: int,
) -> None:
    """Old screenshots leave the history: each request carries at most the configured images."""
    endpoint.max_images = keep
    endpoint.answer(
        *[completion(tool_call("scroll", {"direction": "down"})) for _ in range(4)], finish("end")
    )
    await run_agent("scroll", desktop, attrs.evolve(model, keep_images=keep), http, log, Output())
    last = endpoint.bodies()[4]["messages"]
    assert len(images(last)) == keep
    assert "screenshot no longer shown" in last[2]["content"]


def test_captured_output_keeps_head_and_tail() -> None:
    """Long command output reaches the model as its start and end with a marker between."""
    captured = Captured(10)
    for chunk in ["abc", "defgh", "ijklmnop", "qrst"]:
        captured.add(chunk)
    assert captured.text() == "abcde\n[… 10 characters left out …]\npqrst"


def test_model_key_is_not_in_the_repr() -> None:
    """The model's API key never shows in logs of the config."""
    assert "sk-test" not in repr(ModelConfig(url="http://x", model="m", api_key="sk-test"))


async def test_the_whole_task_has_a_time_limit(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    desktop: RecordingDesktop,
    log: RecordingLog,
) -> None:
    """A task still running at its time limit fails as a timeout, whatever step it is in."""
    endpoint.answer(completion(tool_call("screenshot", {})), Answer(hold=True))
    limited = attrs.evolve(model, task_timeout=0.5, timeout=30)
    with pytest.raises(CommandTimeout, match=r"did not finish the task within 0\.5 s"):
        await run_agent("wait", desktop, limited, http, log, Output())
    assert len(endpoint.requests) == 2
    assert ("warning", "agent.gave_up", {"steps": 2, "reason": "timeout"}) in log.entries
