"""A recording desktop and a recording log for the agent's tests."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from aiohttp import ClientResponse

from protocol.errors import CommandTimeout
from sandboxes.base import OutputSink, ScrollDirection, StepReporter, Stream

#: A 2x1 PNG header is all the agent reads of a screenshot.
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x02\x00\x00\x00\x01" + b"\x00" * 8


class RecordingDesktop:
    """Implements the Sandbox protocol by recording calls; commands follow a script."""

    kind = "fake"

    def __init__(self) -> None:
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
        return PNG

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
