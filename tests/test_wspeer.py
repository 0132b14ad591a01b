"""WsPeer writes RFC 6455 frames itself: the three header sizes, and never on a compressed socket."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from client import Client
from tests.test_outbound import RawSocket
from wspeer import WsPeer, close_reason, ws_header

#: Payload sizes at each side of the 7-bit, 16-bit and 64-bit length forms.
SIZES = [0, 125, 126, 65535, 65536, 200_000]
REFUSED = web.AppKey("refused", list[str])


async def _frames(request: web.Request) -> web.WebSocketResponse:
    """Deliver one frame of each size in ``?sizes=``, then close."""
    compress = request.query.get("compress") == "1"
    ws = web.WebSocketResponse(compress=compress)
    writer = await ws.prepare(request)
    try:
        peer = WsPeer(ws, request, writer)
    except ValueError as exc:
        request.app[REFUSED].append(str(exc))
        await ws.close()
        return ws
    for size in map(int, request.query["sizes"].split(",")):
        peer.deliver(b"a" * size)
    await peer.close(1000, "done")
    return ws


@pytest.fixture
async def frames_server() -> AsyncIterator[TestServer]:
    """A bare server whose only socket sends frames through a WsPeer."""
    app = web.Application()
    app[REFUSED] = []
    app.router.add_get("/frames", _frames)
    test_server = TestServer(app, host="127.0.0.1", port=0)
    await test_server.start_server()
    yield test_server
    await test_server.close()


@pytest.mark.parametrize("size", SIZES)
def test_header_uses_the_shortest_length_form(size: int) -> None:
    """Lengths under 126 fit the first byte, under 65,536 two more, larger ones eight more."""
    header = ws_header(size)
    assert header[0] == 0x81  # FIN, text, no RSV bits: never marked compressed
    if size < 126:
        assert header[1:] == bytes([size])
    elif size < 65536:
        assert header[1] == 126 and struct.unpack("!H", header[2:])[0] == size
    else:
        assert header[1] == 127 and struct.unpack("!Q", header[2:])[0] == size


async def test_frames_of_every_size_arrive_byte_exact(frames_server: TestServer) -> None:
    """A raw reader sees the RFC 6455 headers and payloads WsPeer wrote, for each length form."""
    raw = await RawSocket.open(frames_server, path=f"/frames?sizes={','.join(map(str, SIZES))}")
    for size in SIZES:
        header, opcode, payload = await raw.frame()
        assert (header, opcode, payload) == (ws_header(size), 0x1, b"a" * size)
    _, opcode, payload = await raw.frame()
    assert opcode == 0x8 and payload == struct.pack("!H", 1000) + b"done"
    raw.close()


async def test_an_aiohttp_client_reads_every_size(frames_server: TestServer) -> None:
    """aiohttp's own client parses the frames WsPeer wrote, whatever their length form."""
    async with Client(str(frames_server.make_url(""))) as client:
        url = str(frames_server.make_url(f"/frames?sizes={','.join(map(str, SIZES))}"))
        async with client.http.ws_connect(url, max_msg_size=0) as ws:
            got = [len(await ws.receive_str(timeout=5)) for _ in SIZES]
    assert got == SIZES


async def test_wspeer_refuses_a_socket_that_negotiated_compression(frames_server: TestServer) -> None:
    """Frames written past aiohttp's compressor need compress=False; a compressed socket is refused."""
    async with Client(str(frames_server.make_url(""))) as client:
        url = str(frames_server.make_url("/frames?compress=1&sizes=5"))
        async with client.http.ws_connect(url, compress=15) as ws:
            assert ws.compress == 15
            await ws.receive(timeout=5)
    assert frames_server.app[REFUSED] == ["WsPeer needs a WebSocketResponse made with compress=False"]


async def test_the_session_socket_never_negotiates_compression(served: tuple) -> None:
    """/ws declines permessage-deflate, so a client that offers it gets plain frames."""
    _, client = served
    login = await client.login("plain")
    async with client.http.ws_connect(login.ws_url, compress=15) as ws:
        assert ws.compress == 0
        await ws.send_json({"type": "hello", "token": login.token})
        assert (await ws.receive_json(timeout=5))["type"] == "welcome"


def test_close_reasons_are_cut_to_the_frame_limit_on_a_character_boundary() -> None:
    """A long close reason fits the 123 bytes a close frame allows and stays valid UTF-8."""
    reason = close_reason("é" * 100)
    assert len(reason) <= 123
    assert reason.decode() == "é" * 61
