"""Sharing a session: the owner, a view guest and a control guest on real sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

import cli
from client import Client, ClientError, Connection, Login
from protocol.closecodes import CloseCode
from tests.conftest import StartServer
from tests.fakes import FakeSandbox


async def share(client: Client, login: Login, mode: str, **body: Any) -> dict[str, Any]:
    answer: dict[str, Any] = await client.call(
        "POST", f"/api/sessions/{login.session_id}/shares", token=login.token, body={"mode": mode, **body}
    )
    return answer


def as_guest(login: Login, shared: dict[str, Any]) -> Login:
    """The login a guest holds: the session's id and socket, the share's token."""
    return Login(login.session_id, shared["token"], login.ws_url, None)


async def closed_with(conn: Connection, timeout: float = 5.0) -> int:
    """The close code of the socket, reading (and dropping) whatever frames come before it."""
    assert conn.ws is not None
    async with asyncio.timeout(timeout):
        while True:
            msg = await conn.ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return int(msg.data if msg.type is aiohttp.WSMsgType.CLOSE else conn.ws.close_code or 0)


async def pong(conn: Connection) -> bool:
    """Whether a ping on *conn* comes back: the socket is open and its actor answers."""
    rid = await conn.send("ping")
    return bool(await conn.wait_for(lambda e: e.get("id") == rid and e["type"] == "pong", 5))


async def error_for(conn: Connection, rid: str) -> dict[str, Any]:
    event: dict[str, Any] = await conn.wait_for(
        lambda e: e.get("id") == rid and e["type"] in {"error", "result"}
    )
    return event


async def log_events(conn: Connection, name: str) -> list[dict[str, Any]]:
    """Every ``log`` event called *name* in the session's journal, from a fresh replay."""
    await conn.resume()
    conn.last_seq = 0
    await conn.resume()
    rid = await conn.send("ping")
    found: list[dict[str, Any]] = []
    while (event := await conn.recv())["type"] != "pong" or event.get("id") != rid:
        if event["type"] == "log" and event["event"] == name:
            found.append(event)
    return found


# ----------------------------------------------------------------------------
# The share endpoints


async def test_a_share_answers_a_strong_token_and_a_guest_link(served: tuple) -> None:
    """POST .../shares answers 201 with share_id, a fresh 256-bit token, the mode and a /#share= link."""
    _, client = served
    login = await client.login("ada")
    shared = await share(client, login, "view", label="for bob")
    assert shared["mode"] == "view" and shared["label"] == "for bob"
    assert shared["share_id"].startswith("sh_") and shared["share_id"] not in shared["token"]
    assert len(shared["token"]) >= 43 and shared["token"] != login.token
    assert shared["url"] == f"/#share={shared['token']}"
    other = await share(client, login, "control")
    assert other["token"] != shared["token"] and other["share_id"] != shared["share_id"]


@pytest.mark.parametrize("body", [{}, {"mode": "admin"}, {"mode": 1}, {"mode": "view", "label": 5}])
async def test_a_share_with_a_bad_mode_or_label_is_400(served: tuple, body: dict[str, Any]) -> None:
    """A mode other than view or control, or a label that is no short string, is refused with 400."""
    _, client = served
    login = await client.login("ada")
    with pytest.raises(ClientError) as refused:
        await client.call("POST", f"/api/sessions/{login.session_id}/shares", token=login.token, body=body)
    assert (refused.value.status, refused.value.code) == (400, "bad_message")


async def test_the_list_shows_shares_and_their_sockets_but_no_token(served: tuple) -> None:
    """GET .../shares lists each share with its mode, label, creation time and sockets, never its token."""
    _, client = served
    login = await client.login("ada")
    viewing = await share(client, login, "view", label="wall screen")
    await share(client, login, "control")
    path = f"/api/sessions/{login.session_id}/shares"
    async with client.connect(as_guest(login, viewing)), client.connect(as_guest(login, viewing)):
        listed = await client.call("GET", path, token=login.token)
    assert viewing["token"] not in json.dumps(listed)
    by_id = {s["share_id"]: s for s in listed["shares"]}
    entry = by_id[viewing["share_id"]]
    assert (entry["mode"], entry["label"], entry["sockets"]) == ("view", "wall screen", 2)
    assert isinstance(entry["created"], float)
    assert sorted(s["mode"] for s in listed["shares"]) == ["control", "view"]


async def test_a_share_token_cannot_manage_shares_or_end_the_session(served: tuple) -> None:
    """With a share's token (even control), creating, listing, revoking shares and logging out are 403."""
    _, client = served
    login = await client.login("ada")
    guest = (await share(client, login, "control"))["token"]
    path = f"/api/sessions/{login.session_id}"
    for method, target, body in [
        ("POST", f"{path}/shares", {"mode": "control"}),
        ("GET", f"{path}/shares", None),
        ("DELETE", f"{path}/shares/sh_0000000000000000", None),
        ("DELETE", path, None),
    ]:
        with pytest.raises(ClientError) as refused:
            await client.call(method, target, token=guest, body=body)
        assert (refused.value.status, refused.value.code) == (403, "forbidden"), target
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("run_command", cmd="echo alive")))["ok"]


async def test_another_sessions_owner_cannot_share_this_one(served: tuple) -> None:
    """An owner's token shares its own session only: another session's shares answer 403."""
    _, client = served
    ada, bob = await client.login("ada"), await client.login("bob")
    with pytest.raises(ClientError) as refused:
        await client.call(
            "POST", f"/api/sessions/{ada.session_id}/shares", token=bob.token, body={"mode": "view"}
        )
    assert refused.value.status == 403


# ----------------------------------------------------------------------------
# Roles on the socket


async def test_welcome_names_each_sockets_role(served: tuple) -> None:
    """The owner's welcome says owner, a view guest's view, a control guest's control."""
    _, client = served
    login = await client.login("ada")
    view, control = await share(client, login, "view"), await share(client, login, "control")
    async with (
        client.connect(login) as owner,
        client.connect(as_guest(login, view)) as viewer,
        client.connect(as_guest(login, control)) as driver,
    ):
        roles = [c.welcome["role"] for c in (owner, viewer, driver)]
        assert all(c.welcome["session_id"] == login.session_id for c in (owner, viewer, driver))
    assert roles == ["owner", "view", "control"]


async def test_guests_get_every_event_replay_included(served: tuple) -> None:
    """A guest joining late gets what ran before (replay) and what runs after, as the owner does."""
    _, client = served
    login = await client.login("ada")
    async with client.connect(login) as owner:
        await owner.result(await owner.send("run_command", cmd="echo before"))
        async with client.connect(as_guest(login, await share(client, login, "view")), last_seq=0) as viewer:
            seen = await viewer.wait_for(lambda e: e["type"] == "output" and "before" in e["data"])
            rid = await owner.send("run_command", cmd="echo after")
            live = await viewer.wait_for(lambda e: e["type"] == "output" and "after" in e["data"])
            assert (await viewer.wait_for(lambda e: e.get("id") == rid and e["type"] == "result"))["ok"]
    assert seen["seq"] < live["seq"]


async def test_a_view_guest_may_only_ping_and_get_state(served: tuple, fakes: list[FakeSandbox]) -> None:
    """A view guest's ping and get_state are answered; all else gets error forbidden and runs nothing."""
    _, client = served
    login = await client.login("ada")
    async with client.connect(as_guest(login, await share(client, login, "view"))) as viewer:
        assert await pong(viewer)
        state_id = await viewer.send("get_state")
        assert (await viewer.wait_for(lambda e: e.get("id") == state_id and e["type"] == "state"))[
            "state"
        ] == "idle"
        for kind, fields in [
            ("run_command", {"cmd": "touch /tmp/x"}),
            ("start_desktop", {}),
            ("kill_desktop", {}),
            ("clear_logs", {}),
            ("screenshot", {}),
            ("cancel", {"target": "r1"}),
            ("run_task", {"query": "q"}),
        ]:
            answer = await error_for(viewer, await viewer.send(kind, **fields))
            assert (answer["type"], answer["code"]) == ("error", "forbidden"), kind
        assert await pong(viewer), "the socket stays open"
    assert [name for name, _ in fakes[0].calls] == []


async def test_a_control_guest_may_do_all_but_clear_logs(served: tuple) -> None:
    """A control guest runs commands and gets results; clear_logs gets error forbidden, the log stays."""
    _, client = served
    login = await client.login("ada")
    async with client.connect(as_guest(login, await share(client, login, "control"))) as driver:
        result = await driver.result(await driver.send("run_command", cmd="echo from-guest"))
        assert result["ok"]
        refused = await error_for(driver, await driver.send("clear_logs"))
        assert (refused["type"], refused["code"]) == ("error", "forbidden")
    async with client.connect(login, last_seq=0) as owner:
        assert await owner.wait_for(lambda e: e["type"] == "output" and "from-guest" in e["data"])


async def test_seed_endpoints_take_a_control_token_and_refuse_a_view_token(served: tuple) -> None:
    """POST /start-desktop with a control share's token is 202; with a view share's it is 403."""
    _, client = served
    login = await client.login("ada")
    control, view = await share(client, login, "control"), await share(client, login, "view")
    assert "request_id" in await client.call("POST", "/start-desktop", token=control["token"])
    for path in ("/start-desktop", "/kill-desktop", "/run-task"):
        with pytest.raises(ClientError) as refused:
            await client.call("POST", path, token=view["token"], body={"query": "q"})
        assert (refused.value.status, refused.value.code) == (403, "forbidden")


async def test_guest_sockets_count_toward_the_sixteen(served: tuple) -> None:
    """With 8 owner and 8 guest sockets open, the 17th hello, a guest's, gets rate_limited and 4429."""
    _, client = served
    login = await client.login("ada")
    guest = as_guest(login, await share(client, login, "view"))
    conns = [Connection(client.http, login if n % 2 else guest) for n in range(16)]
    try:
        for conn in conns:
            await conn.open()
        extra = Connection(client.http, guest)
        with pytest.raises(ClientError) as refused:
            await extra.open()
        assert refused.value.code == "rate_limited"
        assert await closed_with(extra) == CloseCode.RATE_LIMITED
    finally:
        for conn in conns:
            await conn.close()


# ----------------------------------------------------------------------------
# Revocation and the session's end


async def test_revoking_closes_the_guests_sockets_at_once_with_4403(served: tuple) -> None:
    """DELETE of a share is 204 and closes its guests' sockets (4403); the owner's and others stay."""
    _, client = served
    login = await client.login("ada")
    gone, kept = await share(client, login, "control"), await share(client, login, "view")
    async with (
        client.connect(login) as owner,
        client.connect(as_guest(login, gone)) as first,
        client.connect(as_guest(login, gone)) as second,
        client.connect(as_guest(login, kept)) as other,
    ):
        await client.call(
            "DELETE", f"/api/sessions/{login.session_id}/shares/{gone['share_id']}", token=login.token
        )
        assert [await closed_with(first), await closed_with(second)] == [CloseCode.FORBIDDEN] * 2
        for conn in (owner, other):
            assert await pong(conn)
    listed = await client.call("GET", f"/api/sessions/{login.session_id}/shares", token=login.token)
    assert [s["share_id"] for s in listed["shares"]] == [kept["share_id"]]


async def test_a_revoked_token_opens_nothing(served: tuple) -> None:
    """After revocation the share's token gets 4403 on hello, 403 over HTTP, and a second DELETE is 404."""
    _, client = served
    login = await client.login("ada")
    shared = await share(client, login, "control")
    path = f"/api/sessions/{login.session_id}/shares/{shared['share_id']}"
    await client.call("DELETE", path, token=login.token)
    conn = Connection(client.http, as_guest(login, shared))
    with pytest.raises(ClientError) as refused:
        await conn.open()
    assert refused.value.code == "forbidden"
    assert await closed_with(conn) == CloseCode.FORBIDDEN
    with pytest.raises(ClientError) as http_refused:
        await client.call("POST", "/start-desktop", token=shared["token"])
    assert http_refused.value.status == 403
    with pytest.raises(ClientError) as missing:
        await client.call("DELETE", path, token=login.token)
    assert missing.value.status == 404


async def test_logout_voids_the_shares_and_closes_the_guests(served: tuple) -> None:
    """Ending the session closes its guests' sockets with 4404; their tokens then get 404 and 4404."""
    _, client = served
    login = await client.login("ada")
    shared = await share(client, login, "view")
    async with client.connect(as_guest(login, shared)) as viewer:
        await client.logout(login)
        assert await closed_with(viewer) == CloseCode.NOT_FOUND
    late = Connection(client.http, as_guest(login, shared))
    with pytest.raises(ClientError) as ended:
        await late.open()
    assert ended.value.code == "not_found"
    assert await closed_with(late) == CloseCode.NOT_FOUND
    with pytest.raises(ClientError) as refused:
        await client.call("POST", "/start-desktop", token=shared["token"])
    assert refused.value.status == 404


async def test_the_journal_tells_of_shares_without_their_tokens(served: tuple) -> None:
    """share.created, share.joined and share.revoked are logged with share_id and mode, never the token."""
    _, client = served
    login = await client.login("ada")
    shared = await share(client, login, "view")
    async with client.connect(as_guest(login, shared)) as viewer:
        await viewer.send("get_state")
    await client.call(
        "DELETE", f"/api/sessions/{login.session_id}/shares/{shared['share_id']}", token=login.token
    )
    async with client.connect(login, last_seq=0) as owner:
        events = {
            name: await log_events(owner, name) for name in ("share.created", "share.joined", "share.revoked")
        }
        journal = json.dumps(events)
    for name, found in events.items():
        assert [(e["share_id"], e["mode"]) for e in found] == [(shared["share_id"], "view")], name
    assert shared["token"] not in journal


async def test_status_shows_each_sessions_shares_and_sockets(served: tuple) -> None:
    """/status lists each session's shares with their sockets, and no share token."""
    _, client = served
    login = await client.login("ada")
    shared = await share(client, login, "control", label="pair")
    async with client.connect(as_guest(login, shared)):
        status = await client.call("GET", "/status", token="admin-secret")
    session = next(s for s in status["sessions"] if s["session_id"] == login.session_id)
    assert [(s["share_id"], s["mode"], s["label"], s["sockets"]) for s in session["shares"]] == [
        (shared["share_id"], "control", "pair", 1)
    ]
    assert shared["token"] not in json.dumps(status)


async def test_a_share_of_an_ended_session_cannot_be_made(start_server: StartServer) -> None:
    """Sharing after logout answers 404: the token is that of an ended session."""
    _, client = await start_server()
    login = await client.login("ada")
    await client.logout(login)
    with pytest.raises(ClientError) as refused:
        await share(client, login, "view")
    assert refused.value.status == 404


async def test_shares_per_session_are_bounded(served: tuple) -> None:
    """The 65th live share of one session is refused with 429 naming the bound; revoking one makes room."""
    _, client = served
    login = await client.login("ada")
    made = [await share(client, login, "view") for _ in range(64)]
    with pytest.raises(ClientError) as refused:
        await share(client, login, "view")
    assert (refused.value.status, refused.value.code) == (429, "rate_limited")
    assert "64" in refused.value.message
    await client.call(
        "DELETE", f"/api/sessions/{login.session_id}/shares/{made[0]['share_id']}", token=login.token
    )
    assert (await share(client, login, "control"))["mode"] == "control"


class E2BLike(FakeSandbox):
    """A sandbox whose desktop is streamed from elsewhere, with a URL that takes input."""

    kind = "e2b"


async def test_a_view_share_of_a_desktop_streamed_elsewhere_is_refused(start_server: StartServer) -> None:
    """On E2B, whose stream URL all watchers see and which takes input, a view share is 403, control not."""
    _, client = await start_server(sandbox_factory=E2BLike)
    login = await client.login("ada")
    with pytest.raises(ClientError) as refused:
        await share(client, login, "view")
    assert (refused.value.status, refused.value.code) == (403, "forbidden")
    assert (await share(client, login, "control"))["mode"] == "control"


async def test_share_tokens_reach_no_log_event_or_status(
    served: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    """Making, joining, using and revoking shares puts no share token in the server log, events or /status."""
    _, client = served
    cli.configure_logging("debug", "json", cache=False)  # to the stdout capsys holds
    login = await client.login("ada")
    view, control = await share(client, login, "view"), await share(client, login, "control")
    async with (
        client.connect(as_guest(login, view)) as viewer,
        client.connect(as_guest(login, control)) as driver,
    ):
        await error_for(viewer, await viewer.send("run_command", cmd="echo no"))
        await driver.result(await driver.send("run_command", cmd="echo yes"))
        await client.call("POST", "/start-desktop", token=control["token"])
        status = json.dumps(await client.call("GET", "/status", token="admin-secret"))
    for shared in (view, control):
        await client.call(
            "DELETE", f"/api/sessions/{login.session_id}/shares/{shared['share_id']}", token=login.token
        )
    with pytest.raises(ClientError):
        await client.call("POST", "/start-desktop", token=view["token"])
    async with client.connect(login, last_seq=0) as owner:
        events = json.dumps(await log_events(owner, "share.revoked"))
    log = capsys.readouterr()
    assert '"share.revoked"' in log.out, "the server's log was captured"
    for token in (view["token"], control["token"]):
        assert token not in log.out + log.err and token not in status and token not in events


async def test_shares_are_kept_in_the_store_and_come_back_from_it(served: tuple) -> None:
    """A share is stored as its hash before its 201, revoking leaves a tombstone, a restored one lets in."""
    import auth
    import server
    from store import MemoryStore, SessionRecord, ShareRecord

    test_server, client = served
    supervisor = test_server.app[server.SUPERVISOR]
    login = await client.login("ada")
    actor = supervisor.get(login.session_id)
    store = MemoryStore()
    info = actor.info
    await store.create_session(
        SessionRecord(
            session_id=info.session_id,
            username=info.username,
            token_hash=info.token_hash,
            created=info.created_at,
            last_active=info.created_at,
        )
    )
    supervisor.store = store  # type: ignore[attr-defined]  # what the durable supervisor holds
    shared = await share(client, login, "control")
    (record,) = (await store.live_sessions())[0].shares
    assert (record.share_id, record.mode, record.token_hash) == (
        shared["share_id"],
        "control",
        auth.token_hash(shared["token"]),
    )
    await client.call(
        "DELETE", f"/api/sessions/{login.session_id}/shares/{shared['share_id']}", token=login.token
    )
    assert (await store.live_sessions())[0].shares == ()
    assert await store.ended_reason(auth.token_hash(shared["token"])) == "the share was revoked"

    token = auth.new_token()
    restored = ShareRecord(
        share_id="sh_00000000000000aa",
        session_id=login.session_id,
        token_hash=auth.token_hash(token),
        mode="view",
        label=None,
        created=1.0,
    )
    supervisor.add_share(actor, restored, announce=False)
    async with client.connect(Login(login.session_id, token, login.ws_url, None), last_seq=0) as guest:
        assert guest.welcome["role"] == "view"
        created = await log_events(guest, "share.created")
    assert [e["share_id"] for e in created] == [shared["share_id"]]
