"""What the model sees of the screen, how its coordinates come back, and what each step logs."""

from __future__ import annotations

import base64
import io
from typing import Any

import aiohttp
import attrs
import pytest
from PIL import Image

from agent import ModelConfig, run_agent
from agent.screen import make_frame
from tests.fakes_agent import ModelServer, RecordingDesktop, RecordingLog, completion, finish, tool_call


@pytest.fixture
def model(endpoint: ModelServer) -> ModelConfig:
    return ModelConfig(url=endpoint.url, model="m", max_steps=5, retry_delay=0.01)


async def _run(
    model: ModelConfig, http: aiohttp.ClientSession, desktop: RecordingDesktop, log: RecordingLog
) -> str:
    async def sink(stream: str, data: str) -> None:
        pass

    return (await run_agent("task", desktop, model, http, log, sink)).answer


def _image(url: str) -> Image.Image:
    kind, _, data = url.partition(";base64,")
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert kind == f"data:image/{image.format.lower()}"  # type: ignore[union-attr]
    return image


def _first_image(body: dict[str, Any]) -> Image.Image:
    parts = [p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"]]
    return _image(next(p["image_url"]["url"] for p in parts if p["type"] == "image_url"))


def _clicks(desktop: RecordingDesktop) -> list[tuple[Any, ...]]:
    return [args for name, args in desktop.calls if name == "left_click"]


async def test_a_large_screen_is_scaled_down_and_clicks_mapped_back(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """A 2560x1600 screen goes out as a 1280x800 JPEG; clicks land at twice the pixels, clamped."""
    endpoint.answer(
        completion(tool_call("click", {"x": 640, "y": 400}), tool_call("click", {"x": 1500, "y": -5})),
        finish("ok"),
    )
    desktop = RecordingDesktop(size=(2560, 1600))
    assert await _run(model, http, desktop, RecordingLog()) == "ok"
    image = _first_image(endpoint.bodies()[0])
    assert (image.format, image.size) == ("JPEG", (1280, 800))
    assert "1280x800 pixels" in str(endpoint.bodies()[0]["messages"])
    assert _clicks(desktop) == [(1280, 800), (2559, 0)]


async def test_screenshots_go_as_png_and_to_the_size_asked(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """With image_format png and a 400x400 box, a 1000x500 screen is sent as a 400x200 PNG."""
    endpoint.answer(finish("ok"))
    wanted = attrs.evolve(model, image_format="png", image_width=400, image_height=400)
    await _run(wanted, http, RecordingDesktop(size=(1000, 500)), RecordingLog())
    image = _first_image(endpoint.bodies()[0])
    assert (image.format, image.size) == ("PNG", (400, 200))


async def test_a_grid_model_answers_in_thousandths_of_the_screen(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """With a 0-1000 grid, (500, 500) is the screen's centre and (1000, 1000) its last pixel."""
    endpoint.answer(
        completion(tool_call("click", {"x": 500, "y": 500}), tool_call("click", {"x": 1000, "y": 1000})),
        finish("ok"),
    )
    desktop = RecordingDesktop(size=(1280, 800))
    await _run(attrs.evolve(model, coordinate_grid=1000), http, desktop, RecordingLog())
    assert _clicks(desktop) == [(640, 400), (1279, 799)]
    first = endpoint.bodies()[0]
    click = next(t for t in first["tools"] if t["function"]["name"] == "click")
    assert click["function"]["parameters"]["properties"]["x"]["maximum"] == 1000
    assert "0-1000 grid" in str(first["messages"])


async def test_each_step_logs_text_action_outcome_and_a_thumbnail(
    endpoint: ModelServer, model: ModelConfig, http: aiohttp.ClientSession
) -> None:
    """One agent.step per step: the model's words, the action, its outcome, a thumbnail of the screen."""
    endpoint.answer(
        completion(
            tool_call("click", {"x": 10, "y": 10}), content="The menu is at the top left; opening it."
        ),
        completion(tool_call("type", {"text": "ls"}), content="Typing the command."),
        finish("listed"),
    )
    desktop, log = RecordingDesktop(size=(1280, 800)), RecordingLog()
    await _run(model, http, desktop, log)
    steps = [kw for _, event, kw in log.entries if event == "agent.step"]
    assert [(s["step"], s["text"], s["action"], s["outcome"]) for s in steps] == [
        (1, "The menu is at the top left; opening it.", "click(x=10, y=10)", "clicked at (10, 10)"),
        (2, "Typing the command.", 'type(text="ls")', "typed"),
        (3, "", 'finish(answer="listed")', "finished"),
    ]
    shades = []
    for step in steps:
        assert len(step["thumbnail"]) < 6000  # a few KiB: the journal holds 1000 events
        thumbnail = _image(step["thumbnail"])
        assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 160
        shades.append(thumbnail.convert("RGB").getpixel((5, 5))[0])  # type: ignore[index]
    # Each thumbnail shows the screen that step acted on: the shades of screenshots 1, 3 and 5.
    assert [round(s / 37) for s in shades] == [1, 3, 5]


def test_a_screenshot_pillow_cannot_read_is_sent_as_it_came() -> None:
    """A PNG the image library cannot decode still reaches the model, with coordinates one to one."""
    header_only = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x02\x00\x00\x00\x01" + b"\x00" * 8
    frame = make_frame(header_only, ModelConfig(url="http://x", model="m"))
    assert frame.url.startswith("data:image/png;base64,") and frame.thumbnail is None
    assert (frame.width, frame.height) == (2, 1)
    assert frame.to_screen(1, 0) == (1, 0) and frame.to_screen(9, 9) == (1, 0)
