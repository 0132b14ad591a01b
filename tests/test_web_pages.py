"""The server's routes for the web page: what it offers, and the operator's End."""

from __future__ import annotations

from aiohttp.test_utils import TestServer

from client import Client
from tests.conftest import StartServer

ADMIN = {"Authorization": "Bearer admin-secret"}


async def test_info_tells_the_page_what_the_server_lacks(served: tuple[TestServer, Client]) -> None:
    """GET /api/info says there is no model, no passwords and no network, without any secret."""
    server, client = served
    async with client.http.get(server.make_url("/api/info")) as answer:
        assert answer.status == 200
        info = await answer.json()
    assert info == {
        "sandbox": "null",
        "agent": False,
        "passwords": False,
        "network": False,
        "idle_timeout": 3600.0,
    }


async def test_info_says_an_agent_is_there_when_a_model_is_configured(start_server: StartServer) -> None:
    """With a model endpoint configured, /api/info says the agent can run (and never shows the key)."""
    server, client = await start_server(model_url="http://127.0.0.1:9/v1", model_key="sk-secret-key")
    async with client.http.get(server.make_url("/api/info")) as answer:
        text = await answer.text()
    assert '"agent": true' in text
    assert "sk-secret-key" not in text


async def test_admin_ends_a_session_with_the_admin_token_only(served: tuple[TestServer, Client]) -> None:
    """DELETE /admin/sessions/{id} needs the admin token; with it the session ends and its token is void."""
    server, client = served
    login = await client.login("operated")
    path = server.make_url(f"/admin/sessions/{login.session_id}")
    async with client.http.delete(path, headers={"Authorization": f"Bearer {login.token}"}) as answer:
        assert answer.status == 401
    async with client.http.delete(path, headers=ADMIN) as answer:
        assert answer.status == 204
    async with client.http.delete(path, headers=ADMIN) as answer:
        assert answer.status == 404
        assert (await answer.json())["error"]["code"] == "not_found"
    async with client.http.get(server.make_url("/status"), headers=ADMIN) as answer:
        assert login.session_id not in {s["session_id"] for s in (await answer.json())["sessions"]}


async def test_admin_page_is_served(served: tuple[TestServer, Client]) -> None:
    """GET /admin serves the operator's page, under the same CSP as every page."""
    server, client = served
    async with client.http.get(server.make_url("/admin")) as answer:
        assert answer.status == 200
        assert "admin.js" in await answer.text()
        assert "script-src 'self'" in answer.headers["Content-Security-Policy"]
