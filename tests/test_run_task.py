"""run_task and workflows through the whole server, with the model endpoint a real server on 127.0.0.1."""

from __future__ import annotations

import json
from typing import Any

import pytest

import config
from client import Connection
from tests.conftest import StartServer
from tests.fakes import FakeSandbox
from tests.fakes_agent import Answer, ModelServer, completion, finish, tool_call


async def _until_result(conn: Connection, rid: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The session's events up to the result of *rid*, and that result."""
    events: list[dict[str, Any]] = []
    while (event := await conn.recv(timeout=20))["type"] != "result" or event["id"] != rid:
        events.append(event)
    return events, event


async def test_run_task_drives_the_desktop_and_answers(
    start_server: StartServer, endpoint: ModelServer, fakes: list[FakeSandbox]
) -> None:
    """run_task clicks and types as the model says; its result has the answer and the step count."""
    endpoint.answer(
        completion(tool_call("click", {"x": 10, "y": 12}), content="Clicking the field."),
        completion(tool_call("type", {"text": "hello"})),
        finish("typed hello"),
    )
    _, client = await start_server(model_url=endpoint.url, model="m1", model_key="k")
    login = await client.login("ava")
    async with client.connect(login) as conn:
        events, result = await _until_result(conn, await conn.send("run_task", query="type hello"))
    assert result["ok"] is True and result["data"] == {"answer": "typed hello", "steps": 3}
    assert ("left_click", (10, 12)) in fakes[0].calls and ("write", ("hello",)) in fakes[0].calls
    assert endpoint.bodies()[0]["model"] == "m1"
    assert "type hello" in json.dumps(endpoint.bodies()[0]["messages"])
    steps = [e for e in events if e["type"] == "log" and e["event"] == "agent.step"]
    assert [(s["step"], s["action"]) for s in steps] == [
        (1, "click(x=10, y=12)"),
        (2, 'type(text="hello")'),
        (3, 'finish(answer="typed hello")'),
    ]
    assert steps[0]["text"] == "Clicking the field." and steps[0]["outcome"] == "clicked at (10, 12)"
    assert all(s["thumbnail"].startswith("data:image/jpeg;base64,") for s in steps)


async def test_agent_settings_reach_the_agent(
    start_server: StartServer, endpoint: ModelServer, fakes: list[FakeSandbox]
) -> None:
    """--agent-image-width scales what the model sees and clicks map back; --agent-max-steps bounds a run."""
    endpoint.answer(completion(tool_call("click", {"x": 8, "y": 4})), completion(tool_call("screenshot", {})))
    _, client = await start_server(
        model_url=endpoint.url, agent_image_width=16, agent_image_format="png", agent_max_steps=2
    )
    login = await client.login("bo")
    async with client.connect(login) as conn:
        result = await conn.result(await conn.send("run_task", query="click"), timeout=20)
    assert result["ok"] is False and "within 2 steps" in result["error"]["message"]
    # The fake screen is 32x16: the model saw it as 16x8, so (8, 4) is (16, 8) on the screen.
    assert "16x8 pixels" in json.dumps(endpoint.bodies()[0]["messages"])
    assert '"url": "data:image/png;base64,' in json.dumps(endpoint.bodies()[0]["messages"])
    assert ("left_click", (16, 8)) in fakes[0].calls


async def test_a_refusal_fails_the_task_with_the_refusal(
    start_server: StartServer, endpoint: ModelServer
) -> None:
    """A model's refusal reaches the user as the failed result's message."""
    endpoint.answer(completion(refusal="I won't do that."))
    _, client = await start_server(model_url=endpoint.url)
    login = await client.login("cy")
    async with client.connect(login) as conn:
        result = await conn.result(await conn.send("run_task", query="q"), timeout=20)
    assert result["ok"] is False and "I won't do that." in result["error"]["message"]


async def test_a_rate_limited_endpoint_is_waited_for(
    start_server: StartServer, endpoint: ModelServer
) -> None:
    """A 429 with retry-after-ms is retried, so the task still succeeds."""
    endpoint.answer(Answer(status=429, headers={"retry-after-ms": "50"}, body=b"{}"), finish("ok"))
    _, client = await start_server(model_url=endpoint.url)
    login = await client.login("di")
    async with client.connect(login) as conn:
        result = await conn.result(await conn.send("run_task", query="q"), timeout=20)
    assert result["ok"] is True and result["data"] == {"answer": "ok", "steps": 1}
    assert len(endpoint.requests) == 2


async def test_default_workflow_runs_desktop_setup_and_task(
    start_server: StartServer, endpoint: ModelServer, fakes: list[FakeSandbox]
) -> None:
    """The default workflow starts the desktop, sets up and runs the task for the query."""
    endpoint.answer(finish("done"))
    _, client = await start_server(model_url=endpoint.url)
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


def test_agent_options_parse_from_the_command_line_and_environment() -> None:
    """The agent's options are command-line flags and DESKHIVE_* variables, checked as they are read."""
    args = config.parser().parse_args(
        ["serve", "--agent-max-steps", "7", "--model-timeout", "30", "--agent-image-format", "PNG"]
    )
    env = {
        "DESKHIVE_AGENT_TIMEOUT": "90",
        "DESKHIVE_AGENT_COORDINATE_GRID": "1000",
        "DESKHIVE_AGENT_IMAGES": "2",
    }
    settings = config.from_args(args, env)
    assert (settings.agent_max_steps, settings.model_timeout, settings.agent_image_format) == (7, 30.0, "png")
    assert (settings.agent_timeout, settings.agent_coordinate_grid, settings.agent_images) == (90.0, 1000, 2)
    with pytest.raises(SystemExit):
        config.parser().parse_args(["serve", "--agent-image-format", "gif"])
