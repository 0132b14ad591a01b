"""The server answers only to its own names, and pages of other sites cannot act through it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import StartServer
from tests.fakes import FakeSandbox

WS_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


async def send(
    test_server: TestServer, method: str, path: str, *, headers: dict[str, str], data: bytes | None = None
) -> tuple[int, Any]:
    """The status and JSON body of one request with exactly these headers."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, test_server.make_url(path), headers=headers, data=data) as response,
    ):
        return response.status, await response.json(content_type=None)


async def raw(test_server: TestServer, request: bytes) -> tuple[int, Any]:
    """Send *request* as it is (no HTTP client adds a Host); status and JSON body."""
    reader, writer = await asyncio.open_connection(test_server.host, test_server.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


LOGIN = json.dumps({"username": "ada"}).encode()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}", ""])
async def test_a_rebound_name_gets_nothing(
    start_server: StartServer, fakes: list[FakeSandbox], host: str
) -> None:
    """A request naming a host that is not this server's (DNS rebinding) answers 421 and logs nobody in."""
    test_server, _ = await start_server()
    host = host.format(port=test_server.port)
    for method, path, data in (
        ("POST", "/api/sessions", LOGIN),
        ("GET", "/", None),
        ("GET", "/status", None),
    ):
        headers = {"Host": host, "Content-Type": "application/json", "Authorization": "Bearer admin-secret"}
        status, body = await send(test_server, method, path, headers=headers, data=data)
        assert status == 421, (method, path)
        assert body["error"]["code"] == "forbidden" and "--allowed-origins" in body["error"]["message"]
        assert host == "" or host not in json.dumps(body)
    status, _ = await send(test_server, "GET", "/ws", headers={"Host": host, **WS_HEADERS})
    assert status == 421
    assert fakes == []


@pytest.mark.parametrize(
    ("host", "ws_url"),
    [
        ("127.0.0.1:{port}", "ws://127.0.0.1:{port}/ws"),
        ("LOCALHOST:{port}", "ws://localhost:{port}/ws"),
        ("[::1]:{port}", "ws://[::1]:{port}/ws"),
        ("10.1.2.3", "ws://10.1.2.3/ws"),
        ("desk.example", "wss://desk.example/ws"),
        ("desk.example:443", "wss://desk.example:443/ws"),
        ("lab.example:8443", "ws://lab.example:8443/ws"),
    ],
)
async def test_own_names_log_in_and_get_their_socket_url(
    start_server: StartServer, host: str, ws_url: str
) -> None:
    """Addresses, localhost and --allowed-origins' names log in; ws_url names that host (wss for https)."""
    test_server, _ = await start_server(allowed_origins=("https://desk.example", "http://lab.example:8443"))
    host, ws_url = host.format(port=test_server.port), ws_url.format(port=test_server.port)
    headers = {"Host": host, "Content-Type": "application/json"}
    status, body = await send(test_server, "POST", "/api/sessions", headers=headers, data=LOGIN)
    assert (status, body["ws_url"]) == (201, ws_url)


async def test_a_request_without_host_gets_the_servers_own_address(start_server: StartServer) -> None:
    """An HTTP/1.0 login with no Host header gets a ws_url on the address it connected to."""
    test_server, _ = await start_server()
    head = b"POST /api/sessions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    status, body = await raw(test_server, head % len(LOGIN) + LOGIN)
    assert (status, body["ws_url"]) == (201, f"ws://127.0.0.1:{test_server.port}/ws")


async def test_a_cross_site_form_cannot_log_in(start_server: StartServer, fakes: list[FakeSandbox]) -> None:
    """A text/plain POST from another site's page is refused (403); this site's page and programs log in."""
    test_server, _ = await start_server()
    here = f"http://127.0.0.1:{test_server.port}"
    form = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    status, body = await send(test_server, "POST", "/api/sessions", headers=form, data=LOGIN)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, _ = await send(
        test_server, "POST", "/api/sessions", headers={**form, "Origin": "null"}, data=LOGIN
    )
    assert status == 403
    assert fakes == []
    for headers in ({"Origin": here}, {}):
        status, _ = await send(test_server, "POST", "/api/sessions", headers=headers, data=LOGIN)
        assert status == 201, headers


async def test_cross_site_pages_change_nothing(start_server: StartServer, fakes: list[FakeSandbox]) -> None:
    """Even with the session's token, another site's POST, PUT and DELETE are refused; the session lives."""
    test_server, client = await start_server()
    login = await client.login("ada")
    evil = {
        "Origin": "https://evil.example",
        "Authorization": f"Bearer {login.token}",
        "Content-Type": "text/plain",
    }
    for method, path in (
        ("POST", "/start-desktop"),
        ("POST", "/setup-environment"),
        ("POST", "/kill-desktop"),
        ("DELETE", f"/api/sessions/{login.session_id}"),
        ("PUT", "/api/sessions"),
    ):
        status, body = await send(test_server, method, path, headers=evil, data=b"{}")
        assert (status, body["error"]["code"]) == (403, "forbidden"), (method, path)
    assert [name for fake in fakes for name, _ in fake.calls if name != "close"] == []
    # The session is still there: its own client reaches it.
    async with client.connect(login) as conn:
        await conn.send("ping", id="alive")
        assert await conn.recv() == {"type": "pong", "id": "alive"}
