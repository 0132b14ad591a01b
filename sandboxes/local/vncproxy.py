"""The VNC-over-WebSocket proxy between a noVNC page and a session's x11vnc.

The proxy speaks the RFB security handshake on both sides itself: towards
x11vnc it asks for security type None (x11vnc listens on a unix socket that
only the server can reach, so that socket is the access control); towards
the browser it offers None as well, because the browser was already
authenticated by the server's per-session stream token. Owning the
handshake means the proxy always knows where the client's message stream
begins, so it can parse it and, for a view-only viewer, drop every message
that would act on the desktop (keys, pointer, clipboard, resizing).

Every length a viewer sends is capped (``MAX_LENGTH``): a viewer that passes
it, or sends a message the proxy cannot parse, is closed (1008) alone. A
view-only viewer's clipboard text is skipped as it arrives, never held.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable, Coroutine
from typing import Any, Final

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from protocol.errors import SandboxBroken
from sandboxes.local.sockets import connectable

logger = structlog.get_logger()

Endpoint = str | tuple[str, int]

VERSION: Final = b"RFB 003.008\n"
SECURITY_NONE: Final = 1
HANDSHAKE_TIMEOUT: Final = 10.0
CHUNK: Final = 64 * 1024
#: Client messages a view-only viewer may not send: KeyEvent, PointerEvent,
#: ClientCutText, SetDesktopSize and QEMU's (extended key) messages.
ACTING: Final = frozenset({4, 5, 6, 251, 255})
#: Longest variable part of a viewer's message (clipboard text) the proxy takes.
MAX_LENGTH: Final = 1024 * 1024
CUT_TEXT: Final = 6


class ClientGone(Exception):
    """The browser closed its WebSocket."""


class BadViewer(Exception):
    """The viewer sent RFB the proxy does not take (malformed, or a length past the cap)."""


class WsBytes:
    """The bytes of a WebSocket's binary frames, read as one stream."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._buffer = bytearray()

    async def read_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            msg = await self._ws.receive()
            if msg.type is WSMsgType.BINARY:
                self._buffer += msg.data
            elif msg.type is not WSMsgType.TEXT:  # close, closing, error
                raise ClientGone
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def skip(self, n: int) -> None:
        """Drop the next *n* bytes, one frame at a time, never holding more than one."""
        while n > len(self._buffer):
            n -= len(self._buffer)
            self._buffer.clear()
            await self.read_exact(1)
            n -= 1
        del self._buffer[:n]

    async def refuse(self, reason: str) -> None:
        """Close this viewer's socket alone, saying why."""
        logger.warning("vncproxy.bad_viewer", error=reason)
        await self._ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"malformed RFB")


async def pipe(
    ws: web.WebSocketResponse,
    endpoint: Endpoint,
    *,
    view_only: bool,
    password: str | None,
    on_input: Callable[[], None] | None = None,
) -> None:
    """Pipe *ws* to the VNC server at *endpoint* until either side closes.

    *password* must be ``None``: the proxy asks the VNC server for security
    type None and refuses a server that wants VNC authentication. *on_input*
    is called for each key, pointer or clipboard message passed on: a person
    working on the desktop is activity of the session.
    """
    try:
        reader, writer = await _connect(endpoint)
    except OSError as exc:
        logger.warning("vncproxy.connect_failed", error=str(exc))
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"desktop unavailable")
        return
    client = WsBytes(ws)
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            await _server_handshake(reader, writer, password)
            await _client_handshake(ws, client)
        logger.info("vncproxy.connected", view_only=view_only)
        await _first_done(
            _client_to_server(client, writer, view_only, on_input), _server_to_client(reader, ws)
        )
    except (ClientGone, ConnectionError, asyncio.IncompleteReadError):
        pass
    except (SandboxBroken, TimeoutError) as exc:
        logger.warning("vncproxy.handshake_failed", error=str(exc) or "timeout")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        await ws.close()
        logger.info("vncproxy.closed", view_only=view_only)


async def _connect(endpoint: Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(endpoint, str):
        with connectable(endpoint) as address:
            return await asyncio.open_unix_connection(address)
    return await asyncio.open_connection(*endpoint)


async def _server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: str | None
) -> None:
    version = await reader.readexactly(12)
    if not version.startswith(b"RFB 003.") or version[8:11] not in (b"007", b"008", b"889"):
        raise SandboxBroken(f"VNC server speaks {version!r}, not RFB 3.7 or 3.8")
    minor8 = version[8:11] != b"007"
    writer.write(VERSION if minor8 else b"RFB 003.007\n")
    count = (await reader.readexactly(1))[0]
    if count == 0:
        raise SandboxBroken(f"VNC server refused: {await _reason(reader)}")
    offered = set(await reader.readexactly(count))
    if SECURITY_NONE not in offered or password is not None:
        raise SandboxBroken(f"VNC server offers security types {sorted(offered)}; the proxy only speaks None")
    writer.write(bytes([SECURITY_NONE]))
    await writer.drain()
    if minor8 and struct.unpack(">I", await reader.readexactly(4))[0] != 0:
        raise SandboxBroken(f"VNC server refused: {await _reason(reader)}")


async def _reason(reader: asyncio.StreamReader) -> str:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    return (await reader.readexactly(min(length, 1024))).decode(errors="replace")


async def _client_handshake(ws: web.WebSocketResponse, client: WsBytes) -> None:
    await ws.send_bytes(VERSION)
    version = await client.read_exact(12)
    if version in (b"RFB 003.003\n",):
        await ws.send_bytes(struct.pack(">I", SECURITY_NONE))
        return
    if not version.startswith(b"RFB 003."):
        raise SandboxBroken(f"viewer speaks {version!r}")
    await ws.send_bytes(bytes([1, SECURITY_NONE]))
    if (await client.read_exact(1))[0] != SECURITY_NONE:
        raise SandboxBroken("viewer chose a security type that was not offered")
    if version != b"RFB 003.007\n":
        await ws.send_bytes(struct.pack(">I", 0))


async def _first_done(*coros: Coroutine[Any, Any, None]) -> None:
    """Run both directions; when one ends, cancel the other (and wait for it)."""
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(_quietly(c)) for c in coros]
        for task in tasks:
            task.add_done_callback(lambda _t: [t.cancel() for t in tasks])


async def _quietly(coro: Coroutine[Any, Any, None]) -> None:
    """One direction; its end, however it comes, just ends the pipe."""
    try:
        await coro
    except (ClientGone, ConnectionError, asyncio.IncompleteReadError):
        pass
    except SandboxBroken as exc:
        logger.warning("vncproxy.bad_stream", error=str(exc))


async def _server_to_client(reader: asyncio.StreamReader, ws: web.WebSocketResponse) -> None:
    while data := await reader.read(CHUNK):
        await ws.send_bytes(data)


async def _client_to_server(
    client: WsBytes, writer: asyncio.StreamWriter, view_only: bool, on_input: Callable[[], None] | None
) -> None:
    # ClientInit: one byte, "shared"; always shared so no viewer drops the others.
    await client.read_exact(1)
    writer.write(b"\x01")
    try:
        while True:
            message = await _client_message(client, view_only)
            if message is None or (message[0] in ACTING and view_only):
                continue
            if message[0] in ACTING and on_input is not None:
                on_input()
            writer.write(message)
            await writer.drain()
    except BadViewer as exc:
        await client.refuse(str(exc))


async def _cut_text(client: WsBytes, head: bytes, view_only: bool) -> bytes | None:
    """ClientCutText: a view-only viewer's is skipped unread (``None``); any is capped."""
    rest = await client.read_exact(7)
    # A negative length is the extended clipboard's; its size is the same.
    length = abs(struct.unpack(">i", rest[3:])[0])
    if length > MAX_LENGTH:
        raise BadViewer(f"viewer sent clipboard text of {length} bytes, over the {MAX_LENGTH} cap")
    if view_only:
        await client.skip(length)
        return None
    return head + rest + await client.read_exact(length)


async def _client_message(client: WsBytes, view_only: bool) -> bytes | None:
    """One whole client-to-server RFB message; ``None`` for one dropped unread."""
    head = await client.read_exact(1)
    if head[0] == CUT_TEXT:
        return await _cut_text(client, head, view_only)
    match head[0]:
        case 0:  # SetPixelFormat
            return head + await client.read_exact(19)
        case 2:  # SetEncodings
            rest = await client.read_exact(3)
            return head + rest + await client.read_exact(4 * struct.unpack(">H", rest[1:])[0])
        case 3:  # FramebufferUpdateRequest
            return head + await client.read_exact(9)
        case 4:  # KeyEvent
            return head + await client.read_exact(7)
        case 5:  # PointerEvent
            return head + await client.read_exact(5)
        case 150:  # EnableContinuousUpdates
            return head + await client.read_exact(9)
        case 248:  # ClientFence
            rest = await client.read_exact(8)
            return head + rest + await client.read_exact(rest[7])
        case 251:  # SetDesktopSize
            rest = await client.read_exact(7)
            return head + rest + await client.read_exact(16 * rest[5])
        case 255:  # QEMU client message (extended key event)
            return head + await client.read_exact(11)
        case other:
            raise BadViewer(f"viewer sent RFB message type {other}, which the proxy cannot parse")
