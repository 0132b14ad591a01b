"""The HTTP surface: JSON for every error, socket origins, and the headers of every page."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

import server
from client import Client
from config import Settings
from sandboxes.base import SandboxSpec
from tests.conftest import StartServer
from tests.fakes import FakeSandbox

SECRETISH = "text-of-the-error-7f3a"
StartApp = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def app_with() -> AsyncIterator[StartApp]:
    """Start a server whose app a test may add routes to before it serves."""
    started: list[TestServer] = []

    async def start(app: web.Application) -> TestServer:
        test_server = TestServer(app, host="127.0.0.1", port=0)
        await test_server.start_server()
        started.append(test_server)
        return test_server

    yield start
    for test_server in started:
        await test_server.close()


async def test_an_unexpected_error_answers_the_json_500_without_its_text(
    app_with: StartApp, tmp_path: Path
) -> None:
    """A bug in a handler answers the JSON 500 ``internal`` and is logged; its text stays out of the body."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError(SECRETISH)

    settings = Settings(sandbox="null", data_dir=tmp_path / "var", admin_token="admin-secret")
    app = server.create_app(settings, sandbox_factory=FakeSandbox)
    app.router.add_get("/broken", broken)
    test_server = await app_with(app)
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http, http.get(test_server.make_url("/broken")) as response:
            assert response.status == 500
            assert response.content_type == "application/json"
            body = await response.json()
    assert body["error"]["code"] == "internal"
    assert SECRETISH not in json.dumps(body)
    failed = [entry for entry in logs if entry["event"] == "http.failed"]
    assert failed and failed[0]["route"] == "/broken"


async def test_a_login_whose_sandbox_cannot_be_made_answers_a_json_error(start_server: StartServer) -> None:
    """A sandbox backend raising at creation gives the login a JSON error body, never aiohttp's text 500."""

    def broken_factory(spec: SandboxSpec) -> FakeSandbox:
        raise RuntimeError(SECRETISH)

    test_server, _ = await start_server(sandbox_factory=broken_factory)
    async with (
        aiohttp.ClientSession() as http,
        http.post(test_server.make_url("/api/sessions"), json={"username": "ada"}) as response,
    ):
        assert response.status >= 500
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["error"]["code"] and SECRETISH not in json.dumps(body)
    async with Client(str(test_server.make_url(""))) as client:
        assert (await client.call("GET", "/healthz"))["ok"]


# ----------------------------------------------------------------------------
# Origins of sockets


async def _handshake(url: str, origin: str | None) -> int:
    """The status a WebSocket handshake to *url* with *origin* gets (101 when it opens)."""
    headers = {"Origin": origin} if origin is not None else {}
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(url, headers=headers):
                return 101
        except aiohttp.WSServerHandshakeError as refused:
            return refused.status


async def test_sockets_refuse_pages_of_other_sites(start_server: StartServer) -> None:
    """``/ws`` and the desktop stream answer 403 to another site's Origin, and open for this site or none."""
    test_server, client = await start_server(sandbox="local", allowed_origins=("https://app.example",))
    login = await client.login("ada")
    here = f"http://127.0.0.1:{test_server.port}"
    ws = str(test_server.make_url("/ws"))
    stream = str(test_server.make_url(f"/desktop/{login.session_id}/websockify?token=nope"))
    for origin, expected in {
        "http://evil.example": 403,
        "null": 403,
        f"https://127.0.0.1:{test_server.port}": 403,  # another scheme is another site
        f"http://127.0.0.1:{test_server.port + 1}": 403,
        here: 101,
        here.upper() + "/": 101,
        "https://app.example": 101,
        None: 101,
    }.items():
        assert await _handshake(ws, origin) == expected, origin
    assert await _handshake(stream, "http://evil.example") == 403
    assert await _handshake(stream, here) == 401, "this site's page gets as far as the token check"


async def test_a_refused_origin_gets_a_json_forbidden(start_server: StartServer) -> None:
    """The refusal is the usual JSON error, code ``forbidden``, naming the option that widens it."""
    test_server, _ = await start_server()
    headers = {
        "Origin": "http://evil.example",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.get(test_server.make_url("/ws"), headers=headers) as response,
    ):
        assert response.status == 403
        body = await response.json()
    assert body["error"]["code"] == "forbidden" and "--allowed-origins" in body["error"]["message"]


# ----------------------------------------------------------------------------
# Pages


async def test_pages_and_files_carry_the_security_headers(start_server: StartServer) -> None:
    """Pages, scripts and errors have a CSP (framed here only, no inline script), nosniff, no referrer."""
    test_server, client = await start_server(sandbox="local")
    login = await client.login("ada")
    async with aiohttp.ClientSession() as http:
        for path in ("/", f"/desktop/{login.session_id}", "/static/app.js", "/static/desktop.js", "/nowhere"):
            async with http.get(test_server.make_url(path)) as response:
                policy = dict(
                    part.strip().split(" ", 1)
                    for part in response.headers["Content-Security-Policy"].split(";")
                )
                assert policy["frame-ancestors"] == "'self'", path
                assert "unsafe-inline" not in policy["script-src"], path
                assert response.headers["X-Content-Type-Options"] == "nosniff", path
                assert response.headers["Referrer-Policy"] == "no-referrer", path


class _InlineFinder(HTMLParser):
    """Collects what a script-src without 'unsafe-inline' would block: inline scripts and handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        self.found += [f"{tag} {name}=" for name in names if name.startswith("on")]
        if any((value or "").lower().startswith("javascript:") for value in names.values()):
            self.found.append(f"{tag} javascript: URL")
        self._in_script = tag == "script" and "src" not in names

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.found.append("inline <script>")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


@pytest.mark.parametrize("page", sorted(p.name for p in server.WEB_DIR.glob("*.html")))
def test_pages_have_no_inline_script(page: str) -> None:
    """Every page under web/ runs under the policy: no inline script, handler or javascript: URL."""
    finder = _InlineFinder()
    finder.feed((server.WEB_DIR / page).read_text())
    assert finder.found == []
