"""Local desktops under long data folders, and failures that say why."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from protocol.errors import SandboxBroken
from sandboxes.base import SandboxSpec
from sandboxes.local import LocalConfig, LocalSandbox
from sandboxes.local.vncproxy import pipe
from tests.conftest import MakeLocal
from tests.test_vnc_proxy import Viewer

pytestmark = pytest.mark.skipif(shutil.which("x11vnc") is None, reason="x11vnc is not installed")


def long_folder(root: Path) -> Path:
    """A data folder whose session sockets pass the 108-byte limit of a socket address."""
    folder = root / "srv" / "company" / "deployments" / "deskhive" / ("var-" + "x" * 60)
    folder.mkdir(mode=0o711, parents=True)
    for part in [folder, *folder.parents]:
        if part == root:
            break
        part.chmod(0o711)
    return folder


@pytest.fixture
async def far_desktop(root: Path) -> AsyncIterator[LocalSandbox]:
    data = long_folder(root)
    spec = SandboxSpec(session_id="far_1700000000_00000000000000fa", username="far", data_dir=data)
    sandbox = LocalSandbox(spec, LocalConfig(root=data / "sandboxes"))
    try:
        yield sandbox
    finally:
        async with asyncio.timeout(10):
            await sandbox.close()


async def test_a_desktop_starts_and_streams_under_a_long_data_folder(
    far_desktop: LocalSandbox, aiohttp_server: Callable[[web.Application], Awaitable[TestServer]]
) -> None:
    """With socket paths past 108 bytes the desktop starts, draws, and its VNC stream greets a viewer."""
    async with asyncio.timeout(15):
        await far_desktop.start_desktop()
    endpoint = far_desktop.vnc_endpoint
    assert endpoint is not None and len(endpoint.encode()) > 108
    assert (await far_desktop.screenshot()).startswith(b"\x89PNG")

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("binary",))
        await ws.prepare(request)
        await pipe(ws, endpoint, view_only=False, password=None)
        return ws

    app = web.Application()
    app.router.add_get("/websockify", handler)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http, asyncio.timeout(15):
        ws = await http.ws_connect(server.make_url("/websockify"), protocols=("binary",))
        assert await Viewer(ws).handshake() == far_desktop.config.screen
        await ws.close()


async def test_a_desktop_that_fails_to_start_says_why_in_the_error_and_the_log(make: MakeLocal) -> None:
    """A desktop program dying at start fails the start at once, naming it and its exit code, and logs it."""
    sandbox = make("wm", window_manager=("sh", "-c", "exit 3"))
    with capture_logs() as logs, pytest.raises(SandboxBroken, match="sh exited with code 3") as failed:
        async with asyncio.timeout(8):
            await sandbox.start_desktop()
    assert not sandbox.desktop_running
    reasons = [e["reason"] for e in logs if e["event"] == "sandbox.desktop_failed"]
    assert reasons == [str(failed.value)]
