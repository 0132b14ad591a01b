"""Connections, tried with raw TCP: silent ones are closed, and the server never runs out of descriptors."""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from aiohttp import web

import httpguard
import server
from client import Client
from config import Settings
from tests.conftest import StartServer
from tests.fakes import FakeSandbox
from tests.test_cli import start, stop

HEADER_TIMEOUT = 0.5
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _until_closed(reader: asyncio.StreamReader, within: float = 5.0) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent before."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        async with asyncio.timeout(within):
            data = await reader.read()
    except ConnectionResetError:
        data = b""  # closed while bytes of ours were still arriving: the peer resets
    return loop.time() - began, data


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP response's head and body (by Content-Length)."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
        )
        return head, await reader.readexactly(length)


async def _first_served(port: int) -> bytes:
    """The head of the first answer that is not a refusal (the server sees a close on its next read)."""
    async with asyncio.timeout(5):
        while True:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQUEST)
            try:
                head, _ = await _response(reader)
            finally:
                writer.close()
            if not head.startswith(b"HTTP/1.1 503"):
                return head


def _close(pairs: list[Pair]) -> None:
    for _, writer in pairs:
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    start_server: StartServer,
) -> None:
    """Silent, a connection is closed once the header timeout has passed since accept, not before."""
    test_server, _ = await start_server(header_timeout=HEADER_TIMEOUT)
    reader, writer = await asyncio.open_connection("127.0.0.1", test_server.port)
    try:
        elapsed, data = await _until_closed(reader)
    finally:
        writer.close()
    assert data == b"" and HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 2


async def test_a_request_head_sent_byte_by_byte_does_not_keep_the_connection(
    start_server: StartServer,
) -> None:
    """A head that never completes is cut off at the timeout however often bytes of it arrive."""
    test_server, _ = await start_server(header_timeout=HEADER_TIMEOUT)
    reader, writer = await asyncio.open_connection("127.0.0.1", test_server.port)
    closed = asyncio.ensure_future(_until_closed(reader))
    try:
        for byte in REQUEST[:-2]:  # never the final CRLF
            if closed.done():
                break
            writer.write(bytes([byte]))
            # One byte per tenth of the timeout, paced by the connection's own close.
            await asyncio.wait([closed], timeout=HEADER_TIMEOUT / 10)
        elapsed, _ = await closed
    finally:
        writer.close()
    assert elapsed < HEADER_TIMEOUT + 2


async def test_a_kept_alive_connection_is_closed_a_header_timeout_after_its_last_response(
    start_server: StartServer,
) -> None:
    """After a response a kept-alive connection has the header timeout again for its next request head."""
    test_server, _ = await start_server(header_timeout=HEADER_TIMEOUT)
    reader, writer = await asyncio.open_connection("127.0.0.1", test_server.port)
    try:
        for _ in range(2):
            writer.write(REQUEST)
            head, body = await _response(reader)
            assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["ok"]
        elapsed, _ = await _until_closed(reader)
    finally:
        writer.close()
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 2


async def test_an_open_websocket_outlives_the_header_timeout(start_server: StartServer) -> None:
    """The timeout is for request heads only: a session's socket stays open while silent connections close."""
    test_server, client = await start_server(header_timeout=HEADER_TIMEOUT)
    async with client.connect(await client.login("ada")) as conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", test_server.port)
        try:
            await _until_closed(reader)  # a header timeout has passed for both connections
        finally:
            writer.close()
        rid = await conn.send("ping")
        assert (await conn.wait_for(lambda e: e.get("id") == rid))["type"] == "pong"


# ----------------------------------------------------------------------------
# The connection limit


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[tuple[int, httpguard.ConnectionGuard]]:
    """The app served the way ``deskhive serve`` serves it, with a limit of 4 connections."""
    settings = Settings(sandbox="null", data_dir=tmp_path / "var", admin_token="admin-secret")
    runner = web.AppRunner(server.create_app(settings, sandbox_factory=FakeSandbox), access_log=None)
    await runner.setup()
    guard = httpguard.ConnectionGuard(4)
    listener = await guard.listen(runner, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], guard
    finally:
        listener.close()
        await runner.cleanup()


async def test_past_the_connection_limit_new_connections_get_a_clean_503(
    guarded: tuple[int, httpguard.ConnectionGuard],
) -> None:
    """At the limit a new connection gets 503 ``busy`` and is closed, logged once; a freed place serves."""
    port, guard = guarded
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(guard.limit)]
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                _, answer = await _until_closed(reader)
                writer.close()
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503")
                assert json.loads(body)["error"]["code"] == "busy"
        assert [e["refused"] for e in logs if e["event"] == "http.connections_refused"] == [1]
        held.pop()[1].close()
        assert (await _first_served(port)).startswith(b"HTTP/1.1 200")
    finally:
        _close(held)


def test_the_default_limit_keeps_a_reserve_of_descriptors() -> None:
    """With no limit configured, connections may use the descriptor limit less at least a quarter or 256."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = httpguard.connection_limit()
    assert limit <= max(16, soft - 256) and limit <= soft * 3 // 4 + 1
    assert httpguard.connection_limit(7) == 7


async def test_accept_failures_are_logged_once_and_the_server_recovers(tmp_path: Path) -> None:
    """Out of descriptors, a failed accept is logged once a minute, not per retry, and serving resumes."""
    served = await start(
        "--sandbox", "null", "--data-dir", str(tmp_path), "--log-format", "json",
        "--max-connections", "1000", limit_files=64,
    )  # fmt: skip
    flood: list[Pair] = []
    try:
        for _ in range(90):
            flood.append(await asyncio.open_connection("127.0.0.1", served.port))
        await served.wait_log("http.accept_failed")
        # asyncio retries the accept every second: three more tries, and the server lives on.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(served.proc.wait(), 3.2)
        _close(flood)
        flood.clear()
        async with Client(served.url) as client:
            assert (await client.call("GET", "/healthz"))["ok"]
    finally:
        _close(flood)
        assert await stop(served) == 0
    assert sum("http.accept_failed" in line for line in served.log) == 1
    assert not any("Traceback" in line for line in served.log)
