"""The ``null`` sandbox: runs nothing, echoes commands.

Only for load tests and benchmarks of the actor layer. Its desktop is a
flag, its screenshot a blank PNG, a command's output is the command, and
its home is held in memory (made at the first file call).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import AsyncIterable, Sequence

from sandboxes.base import OutputSink, SandboxSpec, ScrollDirection, StepReporter
from sandboxes.files import FileReader, Listing, MemoryFiles


def blank_png(width: int = 64, height: int = 40) -> bytes:
    """A valid, all-grey RGB PNG of the given size."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


class NullSandbox:
    """A sandbox that does nothing, at once."""

    kind = "null"
    __slots__ = ("_desktop", "_files", "_spec")

    def __init__(self, spec: SandboxSpec) -> None:
        self._spec = spec
        self._desktop = False
        self._files: MemoryFiles | None = None

    @property
    def files(self) -> MemoryFiles:
        if self._files is None:
            self._files = MemoryFiles()
        return self._files

    async def list_files(self, path: str) -> Listing:
        return await self.files.list_files(path)

    async def read_file(self, path: str) -> FileReader:
        return await self.files.read_file(path)

    async def write_file(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        return await self.files.write_file(path, chunks)

    @property
    def sandbox_id(self) -> str | None:
        return None

    @property
    def stream_url(self) -> str | None:
        return None

    @property
    def desktop_running(self) -> bool:
        return self._desktop

    async def start_desktop(self) -> None:
        self._desktop = True

    async def stop_desktop(self) -> None:
        self._desktop = False

    async def setup(self, packages: Sequence[str], report: StepReporter) -> None:
        report("skipped", sandbox="null", packages=list(packages))

    async def run(self, cmd: str, *, timeout: float, on_output: OutputSink) -> int:
        await on_output("stdout", cmd + "\n")
        return 0

    async def screenshot(self) -> bytes:
        return blank_png()

    async def left_click(self, x: int, y: int) -> None:
        pass

    async def double_click(self, x: int, y: int) -> None:
        pass

    async def right_click(self, x: int, y: int) -> None:
        pass

    async def move_mouse(self, x: int, y: int) -> None:
        pass

    async def scroll(self, direction: ScrollDirection = "down", amount: int = 1) -> None:
        pass

    async def write(self, text: str) -> None:
        pass

    async def press(self, keys: str | Sequence[str]) -> None:
        pass

    async def open(self, url_or_file: str) -> None:
        pass

    async def launch(self, app: str) -> None:
        pass

    async def close(self) -> None:
        self._desktop = False
        self._files = None
