"""My sessions (list, end by password) and the idle figures that tell a client the time left."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

import auth
from client import Client, ClientError
from sandboxes.local import LocalConfig, LocalSandbox
from tests.conftest import StartServer


async def _idle_for(client: Client, token: str, seconds: float) -> None:
    """Wait, bounded, until the session has been idle *seconds* (a wait for the clock itself)."""
    async with asyncio.timeout(10):
        while True:
            (entry,) = (await client.call("GET", "/api/sessions", token=token))["sessions"]
            if entry["idle_seconds"] >= seconds:
                return
            await asyncio.sleep(0.05)


async def test_a_token_lists_every_live_session_of_its_user(served: tuple[TestServer, Client]) -> None:
    """GET /api/sessions with one token lists all of that user's sessions, no tokens and nobody else's."""
    _, client = served
    first, second = await client.login("maria"), await client.login("maria")
    other = await client.login("otto")
    async with client.connect(second) as conn:
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
    listed = (await client.call("GET", "/api/sessions", token=first.token))["sessions"]
    assert [s["session_id"] for s in listed] == [first.session_id, second.session_id]
    assert {s["session_id"]: s["desktop"] for s in listed} == {
        first.session_id: False,
        second.session_id: True,
    }
    assert set(listed[0]) == {"session_id", "created", "state", "idle_seconds", "desktop"}
    assert listed[1]["state"] == "ready"
    assert first.token not in str(listed) and other.session_id not in str(listed)
    with pytest.raises(ClientError) as caught:
        await client.call("GET", "/api/sessions")
    assert caught.value.status == 401


@pytest.fixture
async def with_users(start_server: StartServer, tmp_path: Path) -> tuple[TestServer, Client]:
    """A server with a users file: maria's password is 'right'."""
    users = tmp_path / "users"
    users.write_text(f"maria:{await asyncio.to_thread(auth.hash_password, 'right')}\n")
    return await start_server(users_file=users, sessions_per_user=3)


async def test_the_password_ends_forgotten_sessions_and_cures_the_lockout(
    with_users: tuple[TestServer, Client],
) -> None:
    """Three forgotten sessions refuse a login; the password lists and ends them, then login works."""
    _, client = with_users
    logins = [await client.login("maria", password="right") for _ in range(3)]
    with pytest.raises(ClientError) as caught:
        await client.login("maria", password="right")
    assert caught.value.status == 429
    body = {"username": "maria", "password": "right"}
    listed = (await client.call("POST", "/api/sessions/mine", body=body))["sessions"]
    assert [s["session_id"] for s in listed] == [x.session_id for x in logins]
    end = [logins[0].session_id, logins[2].session_id, "maria_1_00", "otto_1_0000000000000000"]
    left = (await client.call("POST", "/api/sessions/mine", body={**body, "end": end}))["sessions"]
    assert [s["session_id"] for s in left] == [logins[1].session_id]
    with pytest.raises(ClientError) as ended:
        await client.call("GET", "/api/sessions", token=logins[0].token)
    assert ended.value.status == 404
    await client.login("maria", password="right")


async def test_a_wrong_password_ends_nothing(with_users: tuple[TestServer, Client]) -> None:
    """A wrong or missing password is 401 and every session stays live."""
    _, client = with_users
    login = await client.login("maria", password="right")
    for password in ("wrong", None):
        body = {"username": "maria", "password": password, "end": [login.session_id]}
        with pytest.raises(ClientError) as caught:
            await client.call("POST", "/api/sessions/mine", body=body)
        assert caught.value.status == 401
    listed = (await client.call("GET", "/api/sessions", token=login.token))["sessions"]
    assert [s["session_id"] for s in listed] == [login.session_id]


async def test_without_a_users_file_the_password_route_is_refused(served: tuple[TestServer, Client]) -> None:
    """In demo mode nobody can end someone's sessions by naming them: 403."""
    _, client = served
    login = await client.login("maria")
    body = {"username": "maria", "password": "x", "end": [login.session_id]}
    with pytest.raises(ClientError) as caught:
        await client.call("POST", "/api/sessions/mine", body=body)
    assert caught.value.status == 403
    assert (await client.call("GET", "/api/sessions", token=login.token))["sessions"]


async def test_welcome_and_state_tell_the_idle_timeout_and_time_idle(
    start_server: StartServer,
) -> None:
    """welcome and state carry idle_timeout and idle_seconds; a replayed state keeps its emitted values."""
    _, client = await start_server(idle_timeout=1234)
    login = await client.login("idler")
    async with client.connect(login) as conn:
        welcome = conn.welcome
        assert welcome["idle_timeout"] == 1234
        assert 0 <= welcome["idle_seconds"] < 1
        rid = await conn.send("get_state")
        state = await conn.wait_for(lambda e: e["type"] == "state" and e.get("id") == rid)
    assert state["idle_timeout"] == 1234 and state["idle_seconds"] < 1
    await _idle_for(client, login.token, 0.3)
    async with client.connect(login, last_seq=state["seq"] - 1) as again:
        replayed = await again.wait_for(lambda e: e["type"] == "state")
    assert replayed == state


@pytest.mark.local
@pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox drops to session uids as root")
async def test_idle_time_counts_from_the_end_of_a_long_job(start_server: StartServer, root: Path) -> None:
    """After a long job the session is idle from the job's end, not from the frame that asked for it."""
    config = LocalConfig(root=root / "sandboxes")
    _, client = await start_server(sandbox_factory=lambda spec: LocalSandbox(spec, config))
    login = await client.login("worker")
    async with client.connect(login) as conn:
        rid = await conn.send("run_command", cmd="sleep 1")
        await conn.wait_for(lambda e: e["type"] == "state" and e["running_id"] == rid, timeout=30)
        (entry,) = (await client.call("GET", "/api/sessions", token=login.token))["sessions"]
        assert entry["idle_seconds"] == 0
        assert (await conn.result(rid, timeout=30))["ok"]
        after = await conn.wait_for(lambda e: e["type"] == "state" and e["running_id"] is None)
        seen = time.monotonic()
    assert after["idle_seconds"] < 0.5
    (entry,) = (await client.call("GET", "/api/sessions", token=login.token))["sessions"]
    # Idle since the job's end: no more than the time since its last state (a
    # loaded machine may take a while over this request), far from the 1 s job.
    assert entry["idle_seconds"] <= after["idle_seconds"] + (time.monotonic() - seen) + 0.1


async def test_wrong_passwords_here_count_toward_the_login_throttle(
    with_users: tuple[TestServer, Client],
) -> None:
    """Ten wrong passwords on /api/sessions/mine lock the username for login too, right password included."""
    _, client = with_users
    for _ in range(10):
        with pytest.raises(ClientError) as caught:
            await client.call("POST", "/api/sessions/mine", body={"username": "maria", "password": "wrong"})
        assert caught.value.status == 401
    with pytest.raises(ClientError) as caught:
        await client.login("maria", password="right")
    assert (caught.value.status, caught.value.code) == (429, "rate_limited")


async def test_a_blank_body_gets_the_same_answer_from_login_and_the_password_route(
    with_users: tuple[TestServer, Client],
) -> None:
    """A blank body is read as {} by both routes that take a password: 400, the username is missing."""
    test_server, client = with_users
    answers = []
    for path in ("/api/sessions", "/api/sessions/mine"):
        async with client.http.post(str(test_server.make_url(path)), data=b" \n") as resp:
            answers.append((resp.status, (await resp.json())["error"]))
    assert answers[0] == answers[1]
    assert answers[0][0] == 400 and "username" in answers[0][1]["message"]
