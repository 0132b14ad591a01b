"""The VNC WebSocket proxy against a real local desktop's x11vnc."""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sandboxes.base import SandboxSpec
from sandboxes.local import LocalConfig, LocalSandbox
from sandboxes.local.vncproxy import pipe

pytestmark = pytest.mark.skipif(shutil.which("x11vnc") is None, reason="x11vnc is not installed")

Connect = Callable[[str], Awaitable[aiohttp.ClientWebSocketResponse]]


@pytest.fixture
async def desktop(root: Path) -> AsyncIterator[LocalSandbox]:
    spec = SandboxSpec(session_id="vnc_1700000000_00000000000000ff", username="vnc", data_dir=root)
    sandbox = LocalSandbox(spec, LocalConfig(root=root))
    try:
        async with asyncio.timeout(10):
            await sandbox.start_desktop()
        yield sandbox
    finally:
        async with asyncio.timeout(10):
            await sandbox.close()


@pytest.fixture
async def connect(
    desktop: LocalSandbox, aiohttp_server: Callable[[web.Application], Awaitable[TestServer]]
) -> AsyncIterator[Connect]:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("binary",))
        await ws.prepare(request)
        assert desktop.vnc_endpoint is not None
        await pipe(ws, desktop.vnc_endpoint, view_only=request.query["mode"] == "view", password=None)
        return ws

    app = web.Application()
    app.router.add_get("/websockify", handler)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http:

        async def open_viewer(mode: str) -> aiohttp.ClientWebSocketResponse:
            return await http.ws_connect(server.make_url(f"/websockify?mode={mode}"), protocols=("binary",))

        yield open_viewer


class Viewer:
    """A hand-written RFB client over the proxy's WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.buffer = ws, b""

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += await self.ws.receive_bytes()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def handshake(self) -> tuple[int, int]:
        assert await self.read(12) == b"RFB 003.008\n"
        await self.ws.send_bytes(b"RFB 003.008\n")
        assert await self.read(2) == b"\x01\x01"
        await self.ws.send_bytes(b"\x01")
        assert await self.read(4) == b"\0\0\0\0"
        await self.ws.send_bytes(b"\x01")
        width, height = struct.unpack(">HH", await self.read(4))
        await self.read(16)  # pixel format
        (name_length,) = struct.unpack(">I", await self.read(4))
        await self.read(name_length)
        return width, height

    async def pointer(self, x: int, y: int) -> None:
        await self.ws.send_bytes(struct.pack(">BBHH", 5, 0, x, y))

    async def key(self, keysym: int) -> None:
        await self.ws.send_bytes(struct.pack(">BBxxI", 4, 1, keysym) + struct.pack(">BBxxI", 4, 0, keysym))

    async def sync(self) -> None:
        """Ask for a full update and wait for bytes back: earlier messages were handled."""
        self.buffer = b""
        await self.ws.send_bytes(struct.pack(">BBHHHH", 3, 0, 0, 0, 8, 8))
        await self.read(1)


async def pointer_at(sandbox: LocalSandbox) -> tuple[int, int]:
    found = re.search(r"x:(\d+) y:(\d+)", await sandbox.xdotool("getmouselocation"))
    assert found is not None
    return int(found[1]), int(found[2])


async def test_greeting_arrives_through_the_websocket(connect: Connect) -> None:
    """A viewer gets the RFB 3.8 greeting as a binary WebSocket frame."""
    ws = await connect("control")
    async with asyncio.timeout(5):
        assert re.fullmatch(rb"RFB 003\.00\d\n", await ws.receive_bytes())
    await ws.close()


async def test_view_only_viewer_cannot_move_the_pointer_but_control_can(
    connect: Connect, desktop: LocalSandbox
) -> None:
    """Pointer events of a view-only viewer are dropped; a control viewer's move the pointer."""
    await desktop.move_mouse(10, 10)
    async with asyncio.timeout(15):
        watcher = Viewer(await connect("view"))
        assert await watcher.handshake() == desktop.config.screen
        await watcher.pointer(300, 250)
        await watcher.key(0x61)
        await watcher.sync()
        assert await pointer_at(desktop) == (10, 10)

        driver = Viewer(await connect("control"))
        await driver.handshake()
        await driver.pointer(300, 250)
        await driver.sync()
        while await pointer_at(desktop) != (300, 250):
            await driver.sync()
    await watcher.ws.close()
    await driver.ws.close()


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """The close code the proxy ends *ws* with (skipping any frames before it)."""
    while (msg := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
        pass
    assert msg.type is aiohttp.WSMsgType.CLOSE
    return ws.close_code


@pytest.mark.parametrize("mode", ["view", "control"])
async def test_a_clipboard_length_past_the_cap_closes_that_viewer_alone(
    connect: Connect, desktop: LocalSandbox, mode: str
) -> None:
    """A ClientCutText announcing 2 GiB closes the sender at once (1008), unread; another viewer works on."""
    async with asyncio.timeout(15):
        other = Viewer(await connect("control"))
        await other.handshake()
        sender = Viewer(await connect(mode))
        await sender.handshake()
        await sender.ws.send_bytes(struct.pack(">BxxxI", 6, 0x7FFFFFFF))
        assert await closed_with(sender.ws) == aiohttp.WSCloseCode.POLICY_VIOLATION
        await other.pointer(123, 45)
        await other.sync()
        while await pointer_at(desktop) != (123, 45):
            await other.sync()
    await other.ws.close()


async def test_a_view_only_clipboard_is_dropped_as_it_streams(connect: Connect) -> None:
    """A view-only viewer's 1 MiB clipboard text, sent in pieces, is skipped and the viewer goes on."""
    async with asyncio.timeout(15):
        watcher = Viewer(await connect("view"))
        await watcher.handshake()
        await watcher.ws.send_bytes(struct.pack(">BxxxI", 6, 1024 * 1024))
        for _ in range(16):
            await watcher.ws.send_bytes(b"x" * 65536)
        await watcher.sync()
    await watcher.ws.close()


async def test_an_unknown_message_closes_that_viewer_alone(connect: Connect) -> None:
    """A message type the proxy cannot parse closes its viewer with 1008; another viewer keeps its stream."""
    async with asyncio.timeout(15):
        other = Viewer(await connect("view"))
        await other.handshake()
        sender = Viewer(await connect("control"))
        await sender.handshake()
        await sender.ws.send_bytes(b"\x63rest")
        assert await closed_with(sender.ws) == aiohttp.WSCloseCode.POLICY_VIOLATION
        await other.sync()
    await other.ws.close()
