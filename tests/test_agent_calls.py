"""Replies the way real servers bend them: every call made regular, refusals and stops honoured."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from agent import AgentResult, ModelConfig, run_agent
from protocol.errors import ModelFailed
from tests.fakes_agent import ModelServer, RecordingDesktop, RecordingLog, completion, finish, tool_call


@pytest.fixture
def model(endpoint: ModelServer) -> ModelConfig:
    return ModelConfig(url=endpoint.url, model="m", max_steps=4, retry_delay=0.01)


async def _run(model: ModelConfig, http: aiohttp.ClientSession, desktop: RecordingDesktop) -> AgentResult:
    async def sink(stream: str, data: str) -> None:
        pass

    return await run_agent("task", desktop, model, http, RecordingLog(), sink)


def _two_clicks() -> dict[str, Any]:
    return completion(tool_call("click", {"x": 5, "y": 6}), tool_call("click", {"x": 7, "y": 8}))


def _calls(reply: dict[str, Any]) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = reply["choices"][0]["message"]["tool_calls"]
    return calls


def _no_ids(reply: dict[str, Any]) -> None:
    for call in _calls(reply):
        del call["id"]


def _object_arguments(reply: dict[str, Any]) -> None:
    for call in _calls(reply):
        call["function"]["arguments"] = json.loads(call["function"]["arguments"])


def _duplicate_ids(reply: dict[str, Any]) -> None:
    for call in _calls(reply):
        call["id"] = "call_0"


def _double_encoded(reply: dict[str, Any]) -> None:
    for call in _calls(reply):
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])


def _long_ids(reply: dict[str, Any]) -> None:
    for number, call in enumerate(_calls(reply)):
        call["id"] = f"chatcmpl-tool-{number}-5f1e0c9a"


def _no_type_and_null_content(reply: dict[str, Any]) -> None:
    for call in _calls(reply):
        del call["type"]
    reply["choices"][0]["message"]["content"] = None


@pytest.mark.parametrize(
    "bend",
    [_no_ids, _object_arguments, _duplicate_ids, _double_encoded, _long_ids, _no_type_and_null_content],
)
async def test_calls_are_made_regular_before_they_enter_the_history(
    endpoint: ModelServer,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    bend: Callable[[dict[str, Any]], None],
) -> None:
    """Both calls run, and the next request pairs unique 9-character ids with one result each."""
    reply = _two_clicks()
    bend(reply)
    endpoint.answer(reply, finish("ok"))
    desktop = RecordingDesktop()
    assert (await _run(model, http, desktop)).answer == "ok"
    assert [args for name, args in desktop.calls if name == "left_click"] == [(5, 6), (7, 8)]
    history = endpoint.bodies()[1]["messages"]
    ids = [c["id"] for m in history for c in m.get("tool_calls", [])]
    assert len(set(ids)) == 2 and all(len(i) == 9 and i.isalnum() for i in ids)
    assert [m["tool_call_id"] for m in history if m["role"] == "tool"] == ids


async def test_a_refusal_ends_the_task_with_the_refusal(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """A refusal is not nudged until the step limit: the task fails at once with the model's words."""
    endpoint.answer(completion(refusal="I can't help with logging into other people's accounts."))
    with pytest.raises(ModelFailed, match="declined the task: I can't help with logging into"):
        await _run(model, http, RecordingDesktop())
    assert len(endpoint.requests) == 1


async def test_text_with_stop_is_the_answer(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """A reply with no tool call and finish_reason stop ends the task with its text."""
    endpoint.answer(completion(content="The file holds 42 lines."))
    result = await _run(model, http, RecordingDesktop())
    assert result == AgentResult(answer="The file holds 42 lines.", steps=1)


async def test_a_reply_cut_off_at_length_is_asked_again_shorter(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """finish_reason length is not an answer: the model is told it was cut off, and the run goes on."""
    endpoint.answer(completion(content="First I will look at the", finish_reason="length"), finish("done"))
    assert await _run(model, http, RecordingDesktop()) == AgentResult(answer="done", steps=2)
    assert "cut off" in endpoint.bodies()[1]["messages"][-1]["content"]


async def test_the_older_function_call_form_is_understood(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """A server answering the legacy function_call field gets its call run."""
    reply = completion(content="")
    reply["choices"][0]["message"]["function_call"] = {"name": "finish", "arguments": '{"answer": "old"}'}
    endpoint.answer(reply)
    assert (await _run(model, http, RecordingDesktop())).answer == "old"


@pytest.mark.parametrize(
    "content",
    [
        'I will click.\n<tool_call>\n{"name": "click", "arguments": {"x": 5, "y": 6}}\n</tool_call>',
        '[TOOL_CALLS][{"name": "click", "arguments": {"x": 5, "y": 6}}]',
        '<|python_tag|>{"name": "click", "parameters": {"x": 5, "y": 6}}',
        '```json\n{"name": "click", "arguments": {"x": 5, "y": 6}}\n```',
        '{"name": "click", "arguments": "{\\"x\\": 5, \\"y\\": 6}"}',
        '<function=click>{"x": 5, "y": 6}</function>',
    ],
    ids=["hermes", "mistral", "llama", "fenced", "bare", "function-tag"],
)
async def test_tool_calls_written_as_text_are_run(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession, content: str
) -> None:
    """A server without a tool parser puts calls in content; the common forms still drive the desktop."""
    endpoint.answer(completion(content=content), finish("ok"))
    desktop = RecordingDesktop()
    assert (await _run(model, http, desktop)).answer == "ok"
    assert ("left_click", (5, 6)) in desktop.calls
    assistant = next(m for m in endpoint.bodies()[1]["messages"] if m["role"] == "assistant")
    assert assistant["tool_calls"][0]["function"]["name"] == "click"
    assert "{" not in assistant["content"]


@pytest.mark.parametrize(
    "content",
    ['<tool_call>{"name": "click", "arguments": {"x": 5,</tool_call>', '[TOOL_CALLS]["click" 5 6]'],
)
async def test_unreadable_text_calls_end_with_what_the_server_sent(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession, content: str
) -> None:
    """A tool call in text that cannot be read ends the task naming what came, not after 30 nudges."""
    endpoint.answer(completion(content=content))
    with pytest.raises(ModelFailed, match="tool call") as caught:
        await _run(model, http, RecordingDesktop())
    assert content[:20] in caught.value.message
    assert len(endpoint.requests) == 1


async def test_reasoning_is_the_steps_text_when_there_is_no_content(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """A reasoning model's reasoning_content shows as the step's text, and is not sent back."""
    reply = completion(tool_call("screenshot", {}))
    reply["choices"][0]["message"]["reasoning_content"] = "The dialog is still loading; look again."
    endpoint.answer(reply, finish("ok"))
    log = RecordingLog()

    async def sink(stream: str, data: str) -> None:
        pass

    await run_agent("task", RecordingDesktop(), model, http, log, sink)
    first = next(kw for _, event, kw in log.entries if event == "agent.step")
    assert first["text"] == "The dialog is still loading; look again."
    assert "loading" not in json.dumps(endpoint.bodies()[1]["messages"])
