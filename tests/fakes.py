"""A sandbox for tests of the actor layer: records calls, can fail or block."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, Callable, Sequence
from typing import Any, ClassVar

from actors.journal import Journal
from protocol import codec
from protocol import messages as m
from protocol.errors import SandboxBroken
from sandboxes.base import OutputSink, SandboxSpec, ScrollDirection, StepReporter
from sandboxes.files import FileReader, Listing, MemoryFiles
from sandboxes.null import blank_png


class FakeSandbox:
    """Implements ``sandboxes.base.Sandbox``; every call is recorded in ``calls``.

    - ``fail[name] = exc`` makes the next call of *name* raise *exc*.
    - ``hold_commands = True`` makes ``run`` stream one line, then wait until
      cancelled (``released`` is set when it was).
    - ``break_stream_url = True`` makes the next read of ``stream_url`` raise
      a ``RuntimeError``: a backend bug outside any job.
    - ``broken = {"stream_url", "desktop_running"}`` makes every read of those
      properties raise a ``RuntimeError``.
    - ``close_error = exc`` makes every ``close`` raise *exc* (after counting);
      ``close_seconds = s`` makes it take *s* seconds first.
    - ``stubborn = True`` makes a held command outlive its first cancellation
      (it ends at the second), as a backend busy killing a process tree does.
    - ``hold = {"screenshot", "launch"}`` makes those calls wait until
      cancelled (``call_started`` is set when one waits).
    - ``lose_desktop(reason)`` makes the running desktop die by itself, as
      an Xvfb that exited: ``lost_reason`` says *reason*, ``desktop_ended`` returns it.
    """

    kind = "fake"
    instances: ClassVar[list[FakeSandbox]] = []

    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec
        self.calls: list[tuple[str, Any]] = []
        self.fail: dict[str, BaseException] = {}
        self.hold_commands = False
        self.break_stream_url = False
        self.broken: set[str] = set()
        self.close_error: BaseException | None = None
        self.close_seconds = 0.0
        self.stubborn = False
        self.running = False
        self.hold: set[str] = set()
        self.call_started = asyncio.Event()
        self.lost: str | None = None
        self._desktop_over = asyncio.Event()
        self.closed = 0
        self.released = asyncio.Event()
        self.command_started = asyncio.Event()
        self.files = MemoryFiles()
        FakeSandbox.instances.append(self)

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        exc = self.fail.pop(name, None)
        if exc is not None:
            raise exc

    @property
    def sandbox_id(self) -> str | None:
        return f"fake-{self.spec.session_id}"

    @property
    def stream_url(self) -> str | None:
        if self.break_stream_url or "stream_url" in self.broken:
            self.break_stream_url = False
            raise RuntimeError("stream_url broke")
        return f"https://stream.invalid/{self.spec.session_id}" if self.running else None

    @property
    def desktop_running(self) -> bool:
        if "desktop_running" in self.broken:
            raise RuntimeError("desktop_running broke")
        return self.running

    @property
    def lost_reason(self) -> str | None:
        return self.lost

    async def desktop_ended(self) -> str | None:
        if not self.running:
            return None
        await self._desktop_over.wait()
        return self.lost

    def lose_desktop(self, reason: str) -> None:
        """The desktop dies by itself (not through ``stop_desktop``)."""
        self.running, self.lost = False, reason
        self._desktop_over.set()

    async def _held(self, name: str) -> None:
        if name in self.hold:
            self.call_started.set()
            await asyncio.Event().wait()  # until cancelled

    async def start_desktop(self) -> None:
        self._call("start_desktop")
        self.running, self.lost = True, None
        self._desktop_over = asyncio.Event()

    async def stop_desktop(self) -> None:
        self._call("stop_desktop")
        self.running = False
        self._desktop_over.set()

    async def setup(self, packages: Sequence[str], report: StepReporter) -> None:
        self._call("setup", tuple(packages))
        for name in packages:
            report("package", name=name)

    async def run(self, cmd: str, *, timeout: float, on_output: OutputSink) -> int:
        self._call("run", cmd, timeout)
        await on_output("stdout", f"ran {cmd}\n")
        if self.hold_commands:
            self.command_started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                try:
                    if self.stubborn:
                        await asyncio.sleep(3600)  # until the second cancellation
                finally:
                    self.released.set()
                raise
        if cmd.startswith("exit "):
            return int(cmd.split()[1])
        if cmd == "fail":
            raise SandboxBroken("the fake sandbox broke")
        return 0

    async def screenshot(self) -> bytes:
        self._call("screenshot")
        await self._held("screenshot")
        return blank_png(32, 16)

    async def left_click(self, x: int, y: int) -> None:
        self._call("left_click", x, y)

    async def double_click(self, x: int, y: int) -> None:
        self._call("double_click", x, y)

    async def right_click(self, x: int, y: int) -> None:
        self._call("right_click", x, y)

    async def move_mouse(self, x: int, y: int) -> None:
        self._call("move_mouse", x, y)

    async def scroll(self, direction: ScrollDirection = "down", amount: int = 1) -> None:
        self._call("scroll", direction, amount)

    async def write(self, text: str) -> None:
        self._call("write", text)

    async def press(self, keys: str | Sequence[str]) -> None:
        self._call("press", keys)

    async def open(self, url_or_file: str) -> None:
        self._call("open", url_or_file)

    async def launch(self, app: str) -> None:
        self._call("launch", app)
        await self._held("launch")

    async def list_files(self, path: str) -> Listing:
        self._call("list_files", path)
        return await self.files.list_files(path)

    async def read_file(self, path: str) -> FileReader:
        self._call("read_file", path)
        return await self.files.read_file(path)

    async def write_file(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        self._call("write_file", path)
        return await self.files.write_file(path, chunks)

    async def close(self) -> None:
        self.calls.append(("close", ()))
        self.closed += 1
        self.running = False
        self._desktop_over.set()
        if self.close_seconds:
            await asyncio.sleep(self.close_seconds)  # a slow backend, not a test's wait
        if self.close_error is not None:
            raise self.close_error


class RecordingPeer:
    """A socket as the actor sees it: keeps every frame it is given, records its close.

    ``hang = True`` makes ``close`` never finish (a client that stopped
    answering); ``on_frame`` is called with each frame as it is delivered.
    """

    def __init__(self, *, hang: bool = False) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed_with: tuple[int, str] | None = None
        self.hang = hang
        self.on_frame: Callable[[dict[str, Any]], None] | None = None
        self._changed = asyncio.Event()

    def deliver(self, frame: bytes) -> bool:
        event = json.loads(frame)
        self.frames.append(event)
        self._changed.set()
        if self.on_frame is not None:
            self.on_frame(event)
        return True

    def follow(self, journal: Journal, last_seq: int) -> None:
        """Replay at once, as a socket whose transport always drains."""
        batch = journal.read(min(last_seq, journal.last_seq) + 1, budget=1 << 62)
        if batch.gap is not None:
            self.deliver(codec.encode(m.Gap(from_seq=batch.gap[0], to_seq=batch.gap[1])))
        for frame in batch.frames:
            self.deliver(frame)

    def notify(self, seq: int, frame: bytes) -> bool:
        return self.deliver(frame)

    async def close(self, code: int, reason: str) -> None:
        if self.hang:
            await asyncio.Event().wait()
        self.closed_with = (code, reason)

    async def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """The first frame *match* accepts, delivered before or within *timeout* seconds."""
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for event in self.frames[seen:]:
                    if match(event):
                        return event
                seen = len(self.frames)
                self._changed.clear()
                await self._changed.wait()
