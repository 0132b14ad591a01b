"""Each limit of SPEC 1.1 hit over real HTTP and real sockets: refused, named, counted, shown."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

import auth
from client import Client, ClientError, Connection, Login
from tests.conftest import StartServer
from tests.fakes import FakeSandbox

ADMIN = "admin-secret"
#: Every limit /status lists, the spec's table and the bounds of 1.0 and of "Robustness promises".
LIMIT_NAMES = {
    "sessions_per_user",
    "max_sessions",
    "max_desktops",
    "desktops_per_user",
    "frames_per_second",
    "logins_per_minute",
    "password_failures_per_user",
    "password_failures_per_address",
    "sockets_per_session",
    "mailbox_size",
}


@pytest.fixture
async def elsewhere() -> AsyncIterator[Callable[[TestServer], Client]]:
    """Clients that connect from 127.0.0.2: another client address on the same machine."""
    opened: list[Client] = []

    def make(test_server: TestServer) -> Client:
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
        client = Client(str(test_server.make_url("")), http=http)
        opened.append(client)
        return client

    yield make
    for client in opened:
        await client.http.close()


async def _refused(call: Any) -> ClientError:
    with pytest.raises(ClientError) as caught:
        await call
    assert (caught.value.status, caught.value.code) == (429, "rate_limited")
    return caught.value


async def _limits(client: Client) -> dict[str, dict[str, Any]]:
    status = await client.call("GET", "/status", token=ADMIN)
    limits: dict[str, dict[str, Any]] = status["limits"]
    return limits


async def _refusals(client: Client) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with client.http.get(
        client.base_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}
    ) as resp:
        text = await resp.text()
    return {
        s.labels["limit"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "deskhive_refusals"
        for s in family.samples
    }


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    """A users file of alice and bob, hashed outside the event loop (scrypt takes a while)."""
    path = tmp_path / "users"
    passwords = {"alice": "alice-pw", "bob": "bob-pw"}
    path.write_text("".join(f"{name}:{auth.hash_password(pw)}\n" for name, pw in passwords.items()))
    return path


# ----------------------------------------------------------------------------
# Sessions


async def test_session_limits_refuse_with_their_name_and_value(start_server: StartServer) -> None:
    """Past sessions_per_user and max_sessions a login is 429 naming the limit; /status and /metrics agree."""
    _, client = await start_server(sessions_per_user=2, max_sessions=3)
    await client.login("bob")
    await client.login("bob")
    refused = await _refused(client.login("bob"))
    assert "sessions_per_user = 2" in refused.message
    await client.login("carol")
    refused = await _refused(client.login("dave"))
    assert "max_sessions = 3" in refused.message
    limits = await _limits(client)
    assert set(limits) >= LIMIT_NAMES
    assert limits["max_sessions"] == {"value": 3, "use": 3}
    assert limits["sessions_per_user"] == {"value": 2, "use": 2}
    assert limits["frames_per_second"]["value"] == 2000
    refusals = await _refusals(client)
    assert (refusals["sessions_per_user"], refusals["max_sessions"]) == (1, 1)
    assert refusals["frames_per_second"] == 0


async def test_default_limits_are_the_spec_table(served: tuple) -> None:
    """With no options, /status shows the spec's default of every limit."""
    _, client = served
    limits = await _limits(client)
    values = {name: limits[name]["value"] for name in LIMIT_NAMES}
    assert values == {
        "sessions_per_user": 3,
        "max_sessions": 50000,
        "max_desktops": 16,
        "desktops_per_user": 3,
        "frames_per_second": 2000,
        "logins_per_minute": 0,
        "password_failures_per_user": 10,
        "password_failures_per_address": 10,
        "sockets_per_session": 16,
        "mailbox_size": 1000,
    }


# ----------------------------------------------------------------------------
# Desktops


async def _start(conn: Connection) -> dict[str, Any]:
    return await conn.result(await conn.send("start_desktop"))


async def test_desktop_limits_end_start_desktop_with_rate_limited(start_server: StartServer) -> None:
    """A start_desktop past a desktop limit ends ok:false rate_limited; a freed place can be taken."""
    _, client = await start_server(max_desktops=2, desktops_per_user=1)
    a1, a2, b, c = [await client.login(u) for u in ("alice", "alice", "bob", "carol")]
    async with (
        client.connect(a1) as conn_a1,
        client.connect(a2) as conn_a2,
        client.connect(b) as conn_b,
        client.connect(c) as conn_c,
    ):
        assert (await _start(conn_a1))["ok"]
        second = await _start(conn_a2)
        assert (second["ok"], second["error"]["code"]) == (False, "rate_limited")
        assert "desktops_per_user = 1" in second["error"]["message"]
        assert (await _start(conn_b))["ok"]
        # Over HTTP the request is accepted (202); its result says why it failed.
        rid = (await client.call("POST", "/start-desktop", token=c.token))["request_id"]
        third = await conn_c.result(rid)
        assert (third["ok"], third["error"]["code"]) == (False, "rate_limited")
        assert "max_desktops = 2" in third["error"]["message"]
        limits = await _limits(client)
        assert limits["max_desktops"] == {"value": 2, "use": 2}
        assert limits["desktops_per_user"] == {"value": 1, "use": 1}
        assert (await conn_a1.result(await conn_a1.send("kill_desktop")))["ok"]
        assert (await _start(conn_c))["ok"]
    refusals = await _refusals(client)
    assert (refusals["desktops_per_user"], refusals["max_desktops"]) == (1, 1)


# ----------------------------------------------------------------------------
# Frames per socket


async def test_frames_over_the_rate_are_refused_and_the_socket_stays_open(start_server: StartServer) -> None:
    """A flood past frames_per_second gets rate_limited errors naming it, and the socket lives on."""
    _, client = await start_server(frames_per_second=20)
    login = await client.login("flood")
    async with client.connect(login) as conn:
        assert conn.ws is not None
        started = time.monotonic()
        for i in range(100):
            await conn.send_raw(json.dumps({"type": "ping", "id": f"p{i}"}))
        replies = [await conn.recv() for _ in range(100)]
        took = time.monotonic() - started
        pongs = [r for r in replies if r["type"] == "pong"]
        errors = [r for r in replies if r["type"] == "error"]
        assert len(pongs) + len(errors) == 100
        # The burst is twice the rate; past it, only what the rate refilled while
        # the flood lasted (well under a second, unless the machine is loaded).
        assert 40 <= len(pongs) <= 40 + 20 * took, (len(pongs), took)
        assert {e["code"] for e in errors} == {"rate_limited"}
        assert all("frames_per_second = 20" in e["message"] for e in errors)
        assert {e["id"] for e in errors} <= {f"p{i}" for i in range(100)} - {p["id"] for p in pongs}
        # Refused frames were not handled, and the socket still works once the bucket refills.
        refused = len(errors)
        async with asyncio.timeout(5):
            while True:
                rid = await conn.send("ping")
                reply = await conn.wait_for(lambda e, rid=rid: e.get("id") == rid)
                if reply["type"] == "pong":
                    break
                refused += 1
    assert (await _refusals(client))["frames_per_second"] == refused


# ----------------------------------------------------------------------------
# Logins per address


async def test_logins_per_minute_is_per_client_address(
    start_server: StartServer, elsewhere: Callable[[TestServer], Client]
) -> None:
    """Past logins_per_minute an address gets 429 naming the limit; another address still logs in."""
    test_server, client = await start_server(logins_per_minute=2)
    await client.login("one")
    await client.login("two")
    refused = await _refused(client.login("three"))
    assert "logins_per_minute = 2" in refused.message
    await elsewhere(test_server).login("three")
    assert (await _refusals(client))["logins_per_minute"] == 1


# ----------------------------------------------------------------------------
# Password guessing


async def test_ten_wrong_passwords_lock_the_username_and_the_address(
    start_server: StartServer, users_file: Path, elsewhere: Callable[[TestServer], Client]
) -> None:
    """After 10 failures the username is 429 from anywhere, right password included, and so is the address."""
    test_server, client = await start_server(users_file=users_file)
    for _ in range(10):
        with pytest.raises(ClientError) as caught:
            await client.login("alice", password="guess")
        assert caught.value.status == 401
    other = elsewhere(test_server)
    refused = await _refused(other.login("alice", password="alice-pw"))
    assert "password_failures_per_user = 10" in refused.message
    refused = await _refused(client.login("bob", password="bob-pw"))
    assert "password_failures_per_address = 10" in refused.message
    await other.login("bob", password="bob-pw")
    limits = await _limits(client)
    assert limits["password_failures_per_user"] == {"value": 10, "use": 1}
    assert limits["password_failures_per_address"] == {"value": 10, "use": 1}


async def test_guesses_sent_at_once_are_not_all_checked(start_server: StartServer, users_file: Path) -> None:
    """Forty wrong passwords sent together: at most ten are checked (401), the rest are 429 at once."""
    _, client = await start_server(users_file=users_file)

    async def guess() -> int:
        try:
            await client.login("alice", password="guess")
        except ClientError as exc:
            return exc.status
        return 201

    async with asyncio.timeout(30):
        statuses = await asyncio.gather(*(guess() for _ in range(40)))
    assert statuses.count(401) <= 10
    assert statuses.count(429) >= 30
    assert set(statuses) <= {401, 429}


async def test_a_login_does_not_wait_for_a_busy_default_executor(
    start_server: StartServer, users_file: Path
) -> None:
    """With every default-executor thread blocked, a right password still logs in at once."""
    _, client = await start_server(users_file=users_file)
    loop = asyncio.get_running_loop()
    release = threading.Event()
    blockers = [loop.run_in_executor(None, release.wait, 30.0) for _ in range(64)]
    try:
        async with asyncio.timeout(10):
            login = await client.login("alice", password="alice-pw")
        assert login.session_id.startswith("alice_")
    finally:
        release.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*blockers)


# ----------------------------------------------------------------------------
# The bounds of 1.0 and of the robustness promises, shown as limits too


async def test_mailbox_and_socket_bounds_are_counted_as_refusals(
    start_server: StartServer, fakes: list[FakeSandbox]
) -> None:
    """A full mailbox (busy) and a 17th socket (rate_limited) are counted under their limit's name."""
    _, client = await start_server(mailbox_size=2)
    login: Login = await client.login("busy")
    async with client.connect(login) as conn:
        fakes[0].hold_commands = True
        await conn.send("run_command", cmd="hold")
        async with asyncio.timeout(5):
            await fakes[0].command_started.wait()
        await conn.send("run_command", cmd="wait 1")
        await conn.send("run_command", cmd="wait 2")
        over = await conn.send("run_command", cmd="one too many")
        error = await conn.wait_for(lambda e: e["type"] == "error" and e.get("id") == over)
        assert error["code"] == "busy"
        assert (await _limits(client))["mailbox_size"] == {"value": 2, "use": 2}
        conns = [Connection(client.http, login) for _ in range(15)]
        for extra in conns:
            await extra.open()
        seventeenth = Connection(client.http, login)
        with pytest.raises(ClientError) as caught:
            await seventeenth.open()
        await seventeenth.close()
        assert caught.value.code == "rate_limited"
        assert "sockets_per_session = 16" in caught.value.message
        assert (await _limits(client))["sockets_per_session"] == {"value": 16, "use": 16}
        for extra in conns:
            await extra.close()
    refusals = await _refusals(client)
    assert (refusals["mailbox_size"], refusals["sockets_per_session"]) == (1, 1)


def test_every_limit_is_an_option_and_a_variable() -> None:
    """Each limit is a flag and a DESKHIVE_ variable; 0 turns one off, a negative is refused."""
    import config

    args = config.parser().parse_args(
        ["serve", "--max-sessions", "7", "--max-desktops", "0", "--desktops-per-user", "2"]
    )
    environ = {
        "DESKHIVE_FRAMES_PER_SECOND": "50",
        "DESKHIVE_LOGINS_PER_MINUTE": "30",
        "DESKHIVE_METRICS": "off",
    }
    settings = config.from_args(args, environ)
    assert (settings.max_sessions, settings.max_desktops, settings.desktops_per_user) == (7, 0, 2)
    assert (settings.frames_per_second, settings.logins_per_minute, settings.metrics) == (50, 30, False)
    with pytest.raises(SystemExit):
        config.parser().parse_args(["serve", "--frames-per-second", "-1"])
