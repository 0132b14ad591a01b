"""run_task and workflows through the whole server, with the model endpoint faked at HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from aioresponses import CallbackResult, aioresponses

from tests.conftest import StartServer
from tests.fakes import FakeSandbox
from tests.fakes_agent import CompatResponse

MODEL_URL = "https://model.invalid/v1"


def _tool_reply(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    call = {
        "id": f"call-{name}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }
    return {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}


@pytest.fixture
def model() -> Iterator[aioresponses]:
    # Only the model endpoint is faked; requests to our own server pass through.
    with aioresponses(passthrough=["http://127.0.0.1", "ws://127.0.0.1"]) as mocked:
        yield mocked


def _answer(mocked: aioresponses, payload: dict[str, Any], seen: list[dict[str, Any]]) -> None:
    def callback(url: Any, **kwargs: Any) -> CallbackResult:
        seen.append(kwargs["json"])
        return CallbackResult(payload=payload, response_class=CompatResponse)

    mocked.post(f"{MODEL_URL}/chat/completions", callback=callback)


async def test_run_task_drives_the_desktop_and_answers(
    start_server: StartServer, model: aioresponses, fakes: list[FakeSandbox]
) -> None:
    """With a model endpoint, run_task clicks and types as the model says and returns its answer."""
    seen: list[dict[str, Any]] = []
    _answer(model, _tool_reply("click", {"x": 10, "y": 20}), seen)
    _answer(model, _tool_reply("type", {"text": "hello"}), seen)
    _answer(model, _tool_reply("finish", {"answer": "typed hello"}), seen)
    _, client = await start_server(model_url=MODEL_URL, model="m1", model_key="k")
    login = await client.login("ava")
    async with client.connect(login) as conn:
        result = await conn.result(await conn.send("run_task", query="type hello"), timeout=20)
    assert result["ok"] is True and result["data"]["answer"] == "typed hello"
    assert ("left_click", (10, 20)) in fakes[0].calls and ("write", ("hello",)) in fakes[0].calls
    assert seen[0]["model"] == "m1"
    assert "type hello" in json.dumps(seen[0]["messages"])


async def test_default_workflow_runs_desktop_setup_and_task(
    start_server: StartServer, model: aioresponses, fakes: list[FakeSandbox]
) -> None:
    """The default workflow starts the desktop, sets up and runs the task for the query."""
    _answer(model, _tool_reply("finish", {"answer": "done"}), [])
    _, client = await start_server(model_url=MODEL_URL)
    login = await client.login("ben")
    async with client.connect(login) as conn:
        result = await conn.result(await conn.send("run_workflow", query="look around"), timeout=20)
    assert result["ok"] is True and result["data"] == {"workflow": "default", "steps": 3}
    names = [name for name, _ in fakes[0].calls]
    assert names.index("start_desktop") < names.index("setup") < names.index("screenshot")


async def test_workflow_without_model_fails_at_the_task_step(start_server: StartServer) -> None:
    """Without a model endpoint the default workflow stops at its task step with a clear error."""
    _, client = await start_server()
    login = await client.login("cat")
    async with client.connect(login) as conn:
        result = await conn.result(await conn.send("run_workflow", query="q"))
    assert result["ok"] is False and "model endpoint" in result["error"]["message"]
