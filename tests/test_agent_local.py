"""The agent on a real local desktop (bubblewrap, Xvfb, openbox, xterm), the model a scripted server."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import shutil
from typing import Any

import aiohttp
import pytest
from PIL import Image

from agent import ModelConfig, run_agent
from tests.conftest import MakeLocal
from tests.fakes_agent import ModelServer, RecordingLog, completion, finish, tool_call

pytestmark = [
    pytest.mark.local,
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("bwrap", "Xvfb", "xdotool", "xterm")),
        reason="the local sandbox's system packages are not installed",
    ),
]


def _images(body: dict[str, Any]) -> list[Image.Image]:
    urls = [
        p["image_url"]["url"]
        for m in body["messages"]
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image_url"
    ]
    return [Image.open(io.BytesIO(base64.b64decode(u.partition(",")[2]))) for u in urls]


async def test_the_agents_click_and_typing_change_the_desktop(make: MakeLocal, endpoint: ModelServer) -> None:
    """Through a half-size screenshot the agent clicks into an xterm and types; the screen shows it."""
    sandbox = make("agt")
    async with asyncio.timeout(15):
        await sandbox.start_desktop()
        await sandbox.launch("xterm -geometry 60x12")
        found = await sandbox.xdotool(
            "search", "--sync", "--onlyvisible", "--class", "xterm", "getwindowgeometry"
        )
    x, y = map(int, re.search(r"Position: (\d+),(\d+)", found).groups())  # type: ignore[union-attr]
    width, height = map(int, re.search(r"Geometry: (\d+)x(\d+)", found).groups())  # type: ignore[union-attr]
    # The 1280x800 screen is sent at 640x400: the model names the xterm's middle at half its pixels.
    middle = ((x + width // 2) // 2, (y + height // 2) // 2)
    endpoint.answer(
        completion(tool_call("click", {"x": middle[0], "y": middle[1]}), content="Focusing the terminal."),
        completion(tool_call("type", {"text": "echo agent-was-here"}), tool_call("key", {"keys": ["enter"]})),
        finish("typed it"),
    )
    model = ModelConfig(url=endpoint.url, model="m", image_width=640, image_height=640, max_steps=5)

    async def sink(stream: str, data: str) -> None:
        pass

    async with aiohttp.ClientSession() as http, asyncio.timeout(30):
        result = await run_agent("type in the terminal", sandbox, model, http, RecordingLog(), sink)
        pointer = await sandbox.xdotool("getmouselocation")
    assert result.answer == "typed it" and result.steps == 3
    assert f"x:{middle[0] * 2} y:{middle[1] * 2} " in pointer
    start, after_click, after_typing = (_images(body)[0] for body in endpoint.bodies())
    assert start.size == after_click.size == after_typing.size == (640, 400)
    assert after_typing.tobytes() != after_click.tobytes()
