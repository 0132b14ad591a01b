"""The desktop stream of a shared session: tokens per desktop run and per share, input by mode."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

import server
from client import Client, ClientError, Login
from protocol.closecodes import CloseCode
from sandboxes.local import LocalSandbox
from tests.conftest import StartServer
from tests.test_sharing import share
from tests.test_vnc_proxy import Viewer, pointer_at


async def stream_protocol(client: Client, session_id: str, token: str) -> str:
    """The subprotocol that opens the running desktop's stream for *token*'s holder."""
    answer: dict[str, Any] = await client.call("POST", f"/api/sessions/{session_id}/stream", token=token)
    assert answer["stream_url"] == f"/desktop/{session_id}#token={answer['token']}"
    return str(answer["protocol"])


def socket_url(test_server: TestServer, login: Login) -> str:
    return str(test_server.make_url(f"/desktop/{login.session_id}/websockify"))


async def handshake_status(client: Client, url: str, *protocols: str) -> int:
    try:
        async with client.http.ws_connect(url, protocols=("binary", *protocols)):
            return 101
    except aiohttp.WSServerHandshakeError as refused:
        return refused.status


async def close_code(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> int:
    """The code the server closed *ws* with, dropping the frames before it."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return int(ws.close_code or 0)


async def desktop_session(
    start_server: StartServer, root: Path
) -> tuple[TestServer, Client, Login, LocalSandbox]:
    """A server on the local sandbox with one session whose desktop runs."""
    test_server, client = await start_server(sandbox_factory=None, sandbox="local", data_dir=root)
    login = await client.login("pair")
    async with client.connect(login) as conn:
        await conn.result(await conn.send("start_desktop"), timeout=30)
    sandbox = test_server.app[server.SUPERVISOR].get(login.session_id).sandbox
    assert isinstance(sandbox, LocalSandbox)
    return test_server, client, login, sandbox


@pytest.mark.local
@pytest.mark.skipif(shutil.which("x11vnc") is None or os.geteuid() != 0, reason="needs root and x11vnc")
async def test_a_view_shares_stream_drops_input_and_a_control_shares_takes_it(
    start_server: StartServer, root: Path
) -> None:
    """Via the server, a view guest's pointer leaves the desktop's alone; a control guest's moves it."""
    test_server, client, login, sandbox = await desktop_session(start_server, root)
    view, control = await share(client, login, "view"), await share(client, login, "control")
    url = socket_url(test_server, login)
    await sandbox.move_mouse(10, 10)
    async with asyncio.timeout(20):
        watching = await client.http.ws_connect(
            url, protocols=("binary", await stream_protocol(client, login.session_id, view["token"]))
        )
        watcher = Viewer(watching)
        await watcher.handshake()
        await watcher.pointer(300, 250)
        await watcher.key(0x61)
        await watcher.sync()
        assert await pointer_at(sandbox) == (10, 10)

        driving = await client.http.ws_connect(
            url, protocols=("binary", await stream_protocol(client, login.session_id, control["token"]))
        )
        driver = Viewer(driving)
        await driver.handshake()
        await driver.pointer(300, 250)
        await driver.sync()
        while await pointer_at(sandbox) != (300, 250):
            await driver.sync()
    await watching.close()
    await driving.close()


@pytest.mark.local
@pytest.mark.skipif(shutil.which("x11vnc") is None or os.geteuid() != 0, reason="needs root and x11vnc")
async def test_revoking_a_share_closes_its_desktop_stream_at_once(
    start_server: StartServer, root: Path
) -> None:
    """DELETE of a share closes its guest's open desktop stream with 4403; the token then gets 401."""
    test_server, client, login, _ = await desktop_session(start_server, root)
    shared = await share(client, login, "control")
    protocol = await stream_protocol(client, login.session_id, shared["token"])
    url = socket_url(test_server, login)
    async with client.http.ws_connect(url, protocols=("binary", protocol)) as ws:
        await Viewer(ws).handshake()
        listed = await client.call("GET", f"/api/sessions/{login.session_id}/shares", token=login.token)
        assert listed["shares"][0]["streams"] == 1
        async with asyncio.TaskGroup() as tg:
            # A viewer reads all the time (the desktop streams to it): so does this one.
            closed = tg.create_task(close_code(ws))
            path = f"/api/sessions/{login.session_id}/shares/{shared['share_id']}"
            await client.call("DELETE", path, token=login.token)
        assert closed.result() == CloseCode.FORBIDDEN
    assert await handshake_status(client, url, protocol) == 401
    with pytest.raises(ClientError) as refused:
        await stream_protocol(client, login.session_id, shared["token"])
    assert refused.value.status == 403


@pytest.mark.local
@pytest.mark.skipif(shutil.which("x11vnc") is None or os.geteuid() != 0, reason="needs root and x11vnc")
async def test_a_stream_token_dies_with_its_desktop(start_server: StartServer, root: Path) -> None:
    """After kill_desktop and a new desktop the old stream token is refused (401) and a new one works."""
    test_server, client, login, _ = await desktop_session(start_server, root)
    old = await stream_protocol(client, login.session_id, login.token)
    url = socket_url(test_server, login)
    assert await handshake_status(client, url, old) == 101
    async with client.connect(login) as conn:
        killed = await conn.result(await conn.send("kill_desktop"), timeout=30)
        assert killed["ok"], killed
        assert await handshake_status(client, url, old) == 401
        await conn.result(await conn.send("start_desktop"), timeout=30)
    assert await handshake_status(client, url, old) == 401
    assert (
        await handshake_status(client, url, await stream_protocol(client, login.session_id, login.token))
        == 101
    )


@pytest.mark.local
@pytest.mark.skipif(shutil.which("x11vnc") is None or os.geteuid() != 0, reason="needs root and x11vnc")
async def test_a_stream_token_in_the_query_string_is_not_taken(start_server: StartServer, root: Path) -> None:
    """The token works as a subprotocol only: in ?token= (which proxies log) it is refused with 401."""
    test_server, client, login, _ = await desktop_session(start_server, root)
    protocol = await stream_protocol(client, login.session_id, login.token)
    token = protocol.removeprefix("deskhive.stream.")
    assert await handshake_status(client, f"{socket_url(test_server, login)}?token={token}") == 401
    assert await handshake_status(client, socket_url(test_server, login), protocol) == 101


async def test_no_stream_token_without_a_desktop_this_server_streams(served: tuple) -> None:
    """Asking for a stream token is 409 without a running desktop, and for a desktop streamed elsewhere."""
    _, client = served
    login = await client.login("idle")
    for _attempt in ("no desktop", "fake sandbox's desktop"):
        with pytest.raises(ClientError) as refused:
            await stream_protocol(client, login.session_id, login.token)
        assert refused.value.status == 409
        async with client.connect(login) as conn:
            await conn.result(await conn.send("start_desktop"))


async def test_a_stream_token_is_asked_for_with_this_sessions_token(served: tuple) -> None:
    """Another session's token, or none, gets no stream token of this session (403, 401)."""
    _, client = served
    ada, bob = await client.login("ada"), await client.login("bob")
    with pytest.raises(ClientError) as other:
        await stream_protocol(client, ada.session_id, bob.token)
    assert other.value.status == 403
    with pytest.raises(ClientError) as missing:
        await client.call("POST", f"/api/sessions/{ada.session_id}/stream")
    assert missing.value.status == 401
