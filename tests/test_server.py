"""The server end to end: real HTTP and WebSocket clients against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path

import aiohttp
import pytest

import server
import ws_api
from client import Client, ClientError, Connection, Login, SessionEnded
from protocol import codec
from tests.conftest import MakeLocal, StartServer
from tests.fakes import FakeSandbox


async def _result(conn: Connection, rid: str) -> dict:
    return await conn.result(rid)


# ----------------------------------------------------------------------------
# Login and logout


async def test_login_answers_id_token_and_urls(served: tuple) -> None:
    """A login gets a session id of the documented form and a long secret token."""
    _, client = served
    data = await client.call(
        "POST", "/api/sessions", body={"username": "ada.l-1", "aws_login": "a", "customer_name": "c"}
    )
    assert re.fullmatch(r"ada\.l-1_\d+_[0-9a-f]{16}", data["session_id"])
    assert len(data["token"]) >= 43 and data["token"] not in data["session_id"]
    assert data["ws_url"].endswith("/ws")
    assert "stream_url" in data


@pytest.mark.parametrize("username", ["", "a" * 33, "bad name", "ünï", "../x", 7, None])
async def test_bad_usernames_get_400_with_a_message(served: tuple, username: object) -> None:
    """A username outside 1-32 of [A-Za-z0-9._-] is a 400 saying what is allowed."""
    _, client = served
    with pytest.raises(ClientError) as caught:
        await client.call("POST", "/api/sessions", body={"username": username})
    assert (caught.value.status, caught.value.code) == (400, "bad_message")
    assert "username" in caught.value.message


async def test_bad_bodies_get_json_errors(served: tuple) -> None:
    """Broken JSON is a 400, a body over 64 KiB a 413, both with the error body."""
    test_server, client = served
    url = str(test_server.make_url("/api/sessions"))
    async with client.http.post(url, data=b"{oops") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "bad_json"
    async with client.http.post(url, data=b"{" + b" " * 70_000 + b"}") as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "too_large"


async def test_quota_of_three_sessions_per_username(served: tuple) -> None:
    """A fourth session for one username is refused with 429 until one ends."""
    _, client = served
    logins = [await client.login("bob") for _ in range(3)]
    with pytest.raises(ClientError) as caught:
        await client.login("bob")
    assert (caught.value.status, caught.value.code) == (429, "rate_limited")
    await client.logout(logins[0])
    await client.login("bob")


async def test_logout_ends_session_closes_sockets_and_sandbox(
    served: tuple, fakes: list[FakeSandbox]
) -> None:
    """Logout closes the session's sockets with 4404, kills its sandbox and voids its token."""
    _, client = served
    login = await client.login("carol")
    async with client.connect(login) as conn:
        await client.logout(login)
        with pytest.raises(SessionEnded):  # noqa: PT012 - read until the close arrives
            while True:
                await conn.recv(timeout=5)
    assert fakes[0].closed == 1
    with pytest.raises(ClientError) as caught:
        await client.call("POST", "/start-desktop", token=login.token)
    assert caught.value.status == 404
    with pytest.raises(ClientError) as caught:
        await client.logout(login)
    assert caught.value.status == 404


async def test_token_of_one_session_cannot_end_another(served: tuple) -> None:
    """DELETE with a token for another session is refused and leaves both alive."""
    _, client = served
    a, b = await client.login("dan"), await client.login("eve")
    with pytest.raises(ClientError) as caught:
        await client.call("DELETE", f"/api/sessions/{b.session_id}", token=a.token)
    assert caught.value.status == 403
    async with client.connect(b) as conn:
        assert conn.welcome["state"] == "idle"


# ----------------------------------------------------------------------------
# The seed's HTTP endpoints


async def test_seed_endpoints_answer_202_and_results_arrive_on_the_socket(served: tuple) -> None:
    """Each seed endpoint answers 202 with a request id whose result arrives on the WebSocket."""
    _, client = served
    login = await client.login("fay")
    async with client.connect(login) as conn:
        rid = (await client.call("POST", "/start-desktop", token=login.token))["request_id"]
        assert (await _result(conn, rid))["ok"] is True
        rid = (
            await client.call("POST", "/setup-environment", token=login.token, body={"packages": ["cowsay"]})
        )["request_id"]
        assert (await _result(conn, rid))["ok"] is True
        rid = (await client.call("POST", "/run-task", token=login.token, body={"query": "hi"}))["request_id"]
        failed = await _result(conn, rid)
        assert failed["ok"] is False and "model endpoint" in failed["error"]["message"]
        rid = (await client.call("POST", "/kill-desktop", token=login.token))["request_id"]
        assert (await _result(conn, rid))["ok"] is True
        assert (await client.call("GET", "/api/workflows"))["workflows"]


async def test_seed_endpoints_need_a_token(served: tuple) -> None:
    """Without a token, or with a wrong one, the seed endpoints answer 401."""
    _, client = served
    for token in (None, "wrong"):
        with pytest.raises(ClientError) as caught:
            await client.call("POST", "/start-desktop", token=token)
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")


async def test_run_task_needs_a_query(served: tuple) -> None:
    """POST /run-task without a query is a 400 naming the field."""
    _, client = served
    login = await client.login("gus")
    with pytest.raises(ClientError) as caught:
        await client.call("POST", "/run-task", token=login.token, body={})
    assert caught.value.status == 400 and "query" in caught.value.message


# ----------------------------------------------------------------------------
# Isolation


async def test_twenty_users_each_see_only_their_own_events(served: tuple) -> None:
    """Twenty users working at once each get their own output and nobody else's."""
    _, client = served

    async def user(n: int) -> list[dict]:
        login = await client.login(f"user{n}")
        async with client.connect(login) as conn:
            rid = await conn.send("run_command", cmd=f"echo secret-{n}")
            seen = []
            while True:
                event = await conn.recv()
                seen.append(event)
                if event["type"] == "result" and event["id"] == rid:
                    return seen

    everything = await asyncio.gather(*(user(n) for n in range(20)))
    for n, events in enumerate(everything):
        text = json.dumps(events)
        assert f"secret-{n}" in text
        assert not re.search(rf"secret-(?!{n}\b)\d+", text)


async def test_two_sockets_on_one_session_each_get_every_event_once(served: tuple) -> None:
    """Two tabs of one session see the same events, once each, in seq order."""
    _, client = served
    login = await client.login("hal")
    async with client.connect(login) as one, client.connect(login) as two:
        rid = await one.send("run_command", cmd="echo both")
        await one.result(rid)
        await two.result(rid)
        await one.send("get_state", id="sync")
        a = await _drain_until(one, "sync")
        b = await _drain_until(two, "sync")
    seqs = [e["seq"] for e in a]
    assert seqs == sorted(set(seqs))
    assert [e["seq"] for e in b] == seqs


async def _drain_until(conn: Connection, rid: str) -> list[dict]:
    events = []
    while True:
        event = await conn.ws.receive_json(timeout=5)  # type: ignore[union-attr]
        if "seq" in event:
            events.append(event)
        if event.get("type") == "state" and event.get("id") == rid:
            return events


# ----------------------------------------------------------------------------
# Journal and resume


async def test_resume_replays_exactly_what_was_missed(served: tuple) -> None:
    """A reconnect with last_seq gets every later event, including ones made while away, once."""
    _, client = served
    login = await client.login("ida")
    async with client.connect(login) as conn:
        await conn.result(await conn.send("run_command", cmd="echo one"))
        seen = conn.last_seq
    # Work happens while no socket is connected.
    rid = (await client.call("POST", "/start-desktop", token=login.token))["request_id"]
    async with client.connect(login, last_seq=seen) as conn:
        assert conn.welcome["resumed"] is True
        replay = []
        while not replay or replay[-1].get("id") != rid or replay[-1]["type"] != "result":
            replay.append(await conn.ws.receive_json(timeout=5))  # type: ignore[union-attr]
    seqs = [e["seq"] for e in replay]
    assert seqs == list(range(seen + 1, seen + 1 + len(seqs)))
    assert all(e["type"] != "gap" for e in replay)


async def test_a_last_seq_ahead_of_the_session_is_a_fresh_start(served: tuple) -> None:
    """A hello holding seqs the session never numbered is not resumed: it gets the whole journal."""
    _, client = served
    login = await client.login("ivo")
    async with client.connect(login) as conn:
        await conn.result(await conn.send("run_command", cmd="echo one"))
        newest = conn.last_seq
    async with client.connect(login, last_seq=newest + 1000) as conn:
        assert conn.welcome["resumed"] is False
        assert (await conn.ws.receive_json(timeout=5))["seq"] == 1  # type: ignore[union-attr]


async def test_resume_after_the_journal_dropped_events_starts_with_gap(start_server: StartServer) -> None:
    """When events after last_seq have left the journal, the replay starts with a gap naming them."""
    _, client = await start_server(journal_size=5)
    login = await client.login("jon")
    async with client.connect(login) as conn:
        for n in range(4):
            await conn.result(await conn.send("run_command", cmd=f"echo {n}"))
    async with client.connect(login, last_seq=1) as conn:
        newest = conn.welcome["seq"]
        gap = await conn.ws.receive_json(timeout=5)  # type: ignore[union-attr]
        assert gap == {"type": "gap", "from_seq": 2, "to_seq": newest - 5}
        replay = [await conn.ws.receive_json(timeout=5) for _ in range(5)]  # type: ignore[union-attr]
    assert [e["seq"] for e in replay] == list(range(newest - 4, newest + 1))


async def test_clear_logs_empties_only_this_sessions_journal(served: tuple) -> None:
    """clear_logs empties the asking session's journal and leaves another's whole."""
    _, client = served
    mine, theirs = await client.login("kim"), await client.login("lee")
    for login in (mine, theirs):
        async with client.connect(login) as conn:
            await conn.result(await conn.send("run_command", cmd="echo x"))
    async with client.connect(mine) as conn:
        cleared = await conn.result(await conn.send("clear_logs", id="clear"))
    async with client.connect(mine) as conn:
        first = await conn.ws.receive_json(timeout=5)  # type: ignore[union-attr]
        assert first["type"] == "gap"
        assert (await conn.ws.receive_json(timeout=5))["seq"] == cleared["seq"]  # type: ignore[union-attr]
    async with client.connect(theirs) as conn:
        assert (await conn.ws.receive_json(timeout=5))["seq"] == 1  # type: ignore[union-attr]


# ----------------------------------------------------------------------------
# Jobs


async def test_jobs_run_in_order_while_ping_and_cancel_answer_at_once(
    served: tuple, fakes: list[FakeSandbox]
) -> None:
    """A held job keeps later jobs waiting while ping answers; cancel ends it and the next runs."""
    _, client = served
    login = await client.login("max")
    fakes[0].hold_commands = True
    async with client.connect(login) as conn:
        slow = await conn.send("run_command", cmd="sleep 60")
        later = await conn.send("screenshot")
        await asyncio.wait_for(fakes[0].command_started.wait(), 5)
        state = await conn.wait_for(lambda e: e["type"] == "state" and e["state"] == "busy")
        assert state["current_command"] == "sleep 60"
        await conn.send("ping", id="p")
        assert await conn.wait_for(lambda e: e["type"] == "pong") == {"type": "pong", "id": "p"}
        cancel = await conn.send("cancel", target=slow)
        results = await conn.results(slow, cancel, later)
        assert results[slow]["ok"] is False and results[slow]["error"]["code"] == "cancelled"
        assert results[cancel]["ok"] is True
        shot = results[later]
        assert shot["seq"] > results[slow]["seq"]
        assert shot["ok"] is True and shot["data"]["png"].startswith("iVBOR")
    assert fakes[0].released.is_set()


async def test_results_say_how_a_job_ended(served: tuple) -> None:
    """Exit codes, sandbox failures and run_task without a model each end in a clear result."""
    _, client = served
    login = await client.login("ned")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("run_command", cmd="exit 3")))["exit_code"] == 3
        broken = await conn.result(await conn.send("run_command", cmd="fail"))
        assert broken["error"]["code"] == "sandbox_failed"
        task = await conn.result(await conn.send("run_task", query="hello"))
        assert task["error"]["code"] == "forbidden" and "model" in task["error"]["message"]
        flow = await conn.result(await conn.send("run_workflow", workflow="nope"))
        assert flow["ok"] is False and "nope" in flow["error"]["message"]


@pytest.mark.parametrize(
    ("cmd", "kept"),
    [
        ("x" * 30, "ran " + "x" * 16),  # the chunk that crosses the cap is cut at it
        ("é" * 30, "ran " + "é" * 8),  # counted in UTF-8 bytes, cut on a character
    ],
)
async def test_output_is_kept_up_to_its_cap_then_a_notice(
    start_server: StartServer, cmd: str, kept: str
) -> None:
    """A job's output goes out up to the cap's last byte, then one notice says the rest is dropped."""
    _, client = await start_server(output_limit=20)
    login = await client.login("chatty")
    async with client.connect(login) as conn:
        rid = await conn.send("run_command", cmd=cmd)
        outputs = []
        while (event := await conn.recv())["type"] != "result" or event["id"] != rid:
            if event["type"] == "output":
                outputs.append((event["stream"], event["data"]))
    assert outputs[0] == ("stdout", kept)
    assert len(kept.encode()) <= 20
    assert outputs[1:] == [("stderr", "\n[deskhive: output over 20 bytes; the rest is dropped]\n")]


async def test_kill_desktop_cancels_jobs_and_stops_the_desktop(
    served: tuple, fakes: list[FakeSandbox]
) -> None:
    """kill_desktop cancels the running and waiting jobs, then stops the desktop."""
    _, client = served
    login = await client.login("oli")
    async with client.connect(login) as conn:
        await conn.result(await conn.send("start_desktop"))
        fakes[0].hold_commands = True
        running = await conn.send("run_command", cmd="sleep 60")
        waiting = await conn.send("run_command", cmd="echo later")
        kill = await conn.send("kill_desktop")
        results = await conn.results(running, waiting, kill)
        assert results[waiting]["error"]["code"] == "cancelled"
        assert results[running]["error"]["code"] == "cancelled"
        assert results[kill]["ok"] is True
        await conn.wait_for(lambda e: e["type"] == "state" and e["state"] == "idle")
    assert ("stop_desktop", ()) in fakes[0].calls


async def test_requests_without_id_get_one(served: tuple) -> None:
    """A request sent without an id is acknowledged with one the server chose."""
    _, client = served
    login = await client.login("pam")
    async with client.connect(login) as conn:
        await conn.send_raw('{"type": "start_desktop"}')
        ack = await conn.wait_for(lambda e: e["type"] == "ack")
        assert ack["id"]
        assert (await conn.result(ack["id"]))["data"]["stream_url"].startswith("https://")


async def test_ids_the_server_gives_never_clash_with_ids_a_client_chose(served: tuple, fakes: list) -> None:
    """Client jobs named r1, r2, ... keep their own results when the server names other requests."""
    _, client = served
    login = await client.login("pia")
    fakes[-1].hold_commands = True
    chosen = [f"r{n}" for n in range(1, 4)]
    async with client.connect(login) as conn:
        for rid in chosen:
            await conn.send("run_command", cmd="sleep", id=rid)
        given = [(await client.call("POST", "/setup-environment", token=login.token, body={}))["request_id"]]
        await conn.send_raw('{"type": "run_command", "cmd": "sleep"}')
        given.append((await conn.wait_for(lambda e: e["type"] == "ack" and e["id"] not in chosen))["id"])
        assert not set(given) & set(chosen)
        cancels = [await conn.send("cancel", target=rid) for rid in given]
        answered = await conn.results(*cancels, *given)
        assert all(answered[rid]["ok"] for rid in cancels)
        assert all(answered[rid]["error"]["code"] == "cancelled" for rid in given)
        await conn.send("kill_desktop")
        ended = await conn.results(*chosen)
        assert all("kill_desktop" in ended[rid]["error"]["message"] for rid in chosen)


# ----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{bad", "bad_json"),
        ("[]", "bad_message"),
        ("42", "bad_message"),
        ('{"type": "warp", "id": "w"}', "unknown_type"),
        ('{"type": "run_command", "id": "w", "cmd": ["ls"]}', "bad_message"),
        ('{"type": "run_command", "id": "w"}', "bad_message"),
        ('{"type": "ping", "id": {"a": 1}}', "bad_message"),
        ('{"type": "cancel", "id": "w", "target": "nothing"}', "not_found"),
        ('{"type": "hello", "token": "x"}', "bad_message"),
        (json.dumps({"type": "run_command", "id": "w", "cmd": "x" * 70_000}), "too_large"),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_stays_open(
    served: tuple, frame: str, code: str
) -> None:
    """Each bad frame gets an error with its code and the same socket still answers ping."""
    _, client = served
    login = await client.login("quinn")
    async with client.connect(login) as conn:
        await conn.send_raw(frame)
        error = await conn.wait_for(lambda e: e["type"] == "error")
        assert error["code"] == code
        if '"id": "w"' in frame and code != "too_large":
            assert error["id"] == "w"
        await conn.send("ping", id="still")
        assert (await conn.wait_for(lambda e: e["type"] == "pong"))["id"] == "still"


async def test_binary_frames_are_refused_politely(served: tuple) -> None:
    """A binary frame gets bad_message and the socket stays usable."""
    _, client = served
    login = await client.login("rae")
    async with client.connect(login) as conn:
        await conn.send_raw(b'{"type":"ping"}')
        assert (await conn.wait_for(lambda e: e["type"] == "error"))["code"] == "bad_message"
        await conn.send("ping", id="ok")
        assert (await conn.wait_for(lambda e: e["type"] == "pong"))["id"] == "ok"


async def test_frames_over_a_mebibyte_close_with_1009(served: tuple) -> None:
    """A frame over 1 MiB closes only that socket, with 1009; the session lives on."""
    _, client = served
    login = await client.login("sam")
    async with client.connect(login) as conn:
        await conn.send_raw("x" * (1024 * 1024 + 10))
        msg = await conn.ws.receive(timeout=5)  # type: ignore[union-attr]
        assert msg.type in {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING}
        assert conn.ws.close_code == 1009  # type: ignore[union-attr]
    async with client.connect(login) as conn:
        await conn.send("ping", id="alive")
        assert (await conn.wait_for(lambda e: e["type"] == "pong"))["id"] == "alive"


async def test_mailbox_past_its_bound_answers_busy(start_server: StartServer) -> None:
    """A burst beyond the mailbox bound gets busy errors, and every frame gets exactly one reply."""
    _, client = await start_server(mailbox_size=2)
    login = await client.login("tia")
    async with client.connect(login) as conn:
        assert conn.ws is not None
        # The client's sends do not yield, so the frames arrive as one burst.
        for n in range(200):
            await conn.ws.send_str(json.dumps({"type": "ping", "id": f"p{n}"}))
        replies = [await conn.ws.receive_json(timeout=5) for _ in range(200)]
    kinds = {r["type"] for r in replies}
    assert kinds <= {"pong", "error"}
    assert sorted(r["id"] for r in replies) == sorted(f"p{n}" for n in range(200))
    assert any(r.get("code") == "busy" for r in replies)


# ----------------------------------------------------------------------------
# Hello


async def _raw_socket(client: Client) -> aiohttp.ClientWebSocketResponse:
    return await client.http.ws_connect(client.base_url.replace("http", "ws") + "/ws")


async def test_wrong_token_closes_with_4401(served: tuple) -> None:
    """A hello with a wrong token gets unauthorized and the socket closes with 4401."""
    _, client = served
    ws = await _raw_socket(client)
    await ws.send_str('{"type": "hello", "token": "nope"}')
    assert (await ws.receive_json(timeout=5))["code"] == "unauthorized"
    msg = await ws.receive(timeout=5)
    assert msg.data == 4401
    await ws.close()


async def test_first_frame_must_be_hello(served: tuple) -> None:
    """A socket whose first frame is not hello is closed with 4401."""
    _, client = served
    ws = await _raw_socket(client)
    await ws.send_str('{"type": "ping", "id": "p"}')
    assert (await ws.receive_json(timeout=5))["code"] == "unauthorized"
    msg = await ws.receive(timeout=5)
    assert msg.data == 4401
    await ws.close()


async def test_silent_socket_is_closed_after_the_hello_timeout(
    served: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket that says nothing is closed with 4401 once the hello time is up."""
    monkeypatch.setattr(ws_api, "HELLO_TIMEOUT_S", 0.2)
    _, client = served
    ws = await _raw_socket(client)
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 4401


async def test_hello_for_an_ended_session_closes_with_4404(served: tuple) -> None:
    """A hello with the token of an ended session is closed with 4404."""
    _, client = served
    login = await client.login("uma")
    await client.logout(login)
    with pytest.raises(ClientError) as caught:
        async with client.connect(login):
            pass
    assert caught.value.code == "not_found"


# ----------------------------------------------------------------------------
# Status and shutdown


async def test_status_needs_the_admin_token(served: tuple) -> None:
    """/status refuses a missing or wrong admin token and lists sessions for the right one."""
    _, client = served
    login = await client.login("vic")
    for token in (None, "admin-wrong", login.token):
        with pytest.raises(ClientError) as caught:
            await client.call("GET", "/status", token=token)
        assert caught.value.status == 401
    snapshot = await client.call("GET", "/status", token="admin-secret")
    (session,) = snapshot["sessions"]
    assert session["session_id"] == login.session_id
    assert {
        "state",
        "mailbox_depth",
        "journal_size",
        "sockets",
        "idle_seconds",
        "sandbox_kind",
        "sandbox_id",
    } <= set(session)
    assert snapshot["totals"]["spawned"] == 1
    assert (await client.call("GET", "/healthz"))["ok"] is True


async def test_shutdown_closes_sockets_with_going_away(start_server: StartServer) -> None:
    """Closing the server closes open sockets with 1001 and kills every sandbox."""
    test_server, client = await start_server()
    login = await client.login("wes")
    async with client.connect(login) as conn:
        await test_server.close()
        msg = await conn.ws.receive(timeout=5)  # type: ignore[union-attr]
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
    assert all(sandbox.closed == 1 for sandbox in FakeSandbox.instances)


@pytest.mark.local
@pytest.mark.skipif(shutil.which("x11vnc") is None or os.geteuid() != 0, reason="needs root and x11vnc")
async def test_desktop_stream_needs_its_token(start_server: StartServer, root: Path) -> None:
    """The desktop proxy speaks RFB for the owner's and a view share's stream token, refuses a wrong one."""
    test_server, client = await start_server(sandbox_factory=None, sandbox="local", data_dir=root)
    data = await client.call("POST", "/api/sessions", body={"username": "vnc"})
    login = Login(data["session_id"], data["token"], data["ws_url"], data["stream_url"])
    async with client.connect(login) as conn:
        started = await conn.result(await conn.send("start_desktop"), timeout=30)
    assert "token" not in started["data"]["stream_url"], "every watcher sees it: it must grant nothing"
    share = await client.call(
        "POST", f"/api/sessions/{login.session_id}/shares", token=login.token, body={"mode": "view"}
    )
    stream = f"/api/sessions/{login.session_id}/stream"
    control = (await client.call("POST", stream, token=login.token))["protocol"]
    view = (await client.call("POST", stream, token=share["token"]))["protocol"]
    assert control != view
    socket_url = str(test_server.make_url(f"/desktop/{login.session_id}/websockify"))
    for protocol in (control, view):
        async with client.http.ws_connect(socket_url, protocols=("binary", protocol)) as ws:
            greeting = await ws.receive(timeout=10)
            assert greeting.data.startswith(b"RFB 003.00")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.http.ws_connect(socket_url, protocols=("binary", "deskhive.stream.owner.1.wrong"))
    assert refused.value.status == 401


async def test_random_frames_never_hurt_the_session(served: tuple) -> None:
    """Hundreds of malformed or odd frames leave the socket, the actor and the session working."""
    import random

    _, client = served
    login = await client.login("fuzz")
    rng = random.Random(7)
    values: list[object] = [
        None,
        True,
        0,
        -1,
        2**70,
        1.5,
        "",
        " ",
        "x" * 70,
        "é\u2028",
        [],
        {},
        [1],
        {"a": 1},
    ]
    kinds = [*codec.MESSAGE_TYPES, "", "PING", None, 3]
    fields = ["id", "cmd", "query", "target", "timeout", "packages", "workflow", "last_seq", "token", "type"]
    async with client.connect(login) as conn:
        assert conn.ws is not None
        for _ in range(300):
            frame = {key: rng.choice(values) for key in rng.sample(fields, rng.randint(0, 4))}
            frame["type"] = rng.choice(kinds)
            if frame["type"] in {"run_task", "run_workflow", "setup_environment", "start_desktop"}:
                frame["type"] = "get_state"  # jobs are exercised elsewhere; here only the front door
            await conn.ws.send_str(json.dumps(frame))
        await conn.send("ping", id="after-fuzz")
        assert await conn.wait_for(lambda e: e.get("id") == "after-fuzz" and e["type"] == "pong", 20)
    async with client.connect(login) as conn:
        await conn.result(await conn.send("run_command", cmd="echo still here"))


@pytest.mark.local
@pytest.mark.skipif(shutil.which("bwrap") is None or os.geteuid() != 0, reason="needs root and bubblewrap")
async def test_command_limits_come_from_the_settings(start_server: StartServer, root: Path) -> None:
    """--command-file-size stops a command that writes a larger file; a smaller one is fine."""
    _, client = await start_server(
        sandbox_factory=None, sandbox="local", data_dir=root, command_file_size=1_000_000
    )
    login = await client.login("lim")
    async with client.connect(login) as conn:
        small = await conn.result(
            await conn.send("run_command", cmd="head -c 1000 /dev/zero > small"), timeout=30
        )
        large = await conn.result(
            await conn.send("run_command", cmd="head -c 2000000 /dev/zero > large"), timeout=30
        )
    assert small["exit_code"] == 0
    assert large["exit_code"] != 0


@pytest.mark.local
@pytest.mark.skipif(shutil.which("x11vnc") is None or os.geteuid() != 0, reason="needs root and x11vnc")
async def test_working_on_the_desktop_keeps_the_session_alive(start_server: StartServer, root: Path) -> None:
    """Pointer input through the desktop stream counts as activity; without it the session is reaped."""
    from tests.test_vnc_proxy import Viewer

    test_server, client = await start_server(
        sandbox_factory=None, sandbox="local", data_dir=root, idle_timeout=1.0, sweep_interval=0.1
    )
    login = await client.login("busy")
    url = str(test_server.make_url(f"/desktop/{login.session_id}/websockify"))

    async def alive() -> bool:
        status = await client.call("GET", "/status", token="admin-secret")
        return any(s["session_id"] == login.session_id for s in status["sessions"])

    async def keep_pinging(conn: Connection) -> None:
        while True:
            await conn.send("ping")
            await asyncio.sleep(0.2)

    async with client.connect(login) as conn:
        await conn.result(await conn.send("start_desktop"), timeout=30)
        # Opening the stream can take longer than the idle timeout on a loaded
        # machine: pings keep the session until the viewer's first input.
        pinger = asyncio.create_task(keep_pinging(conn))
        try:
            stream = await client.call("POST", f"/api/sessions/{login.session_id}/stream", token=login.token)
            async with client.http.ws_connect(url, protocols=("binary", stream["protocol"])) as ws:
                viewer = Viewer(ws)
                await viewer.handshake()
                await viewer.pointer(9, 10)
                pinger.cancel()
                await asyncio.wait([pinger])
                for step in range(10):  # 2 s of work alone, twice the idle timeout
                    await viewer.pointer(10 + step, 10)
                    await asyncio.sleep(0.2)
                assert await alive()
        finally:
            pinger.cancel()
            await asyncio.wait([pinger])
    async with asyncio.timeout(10):
        while await alive():  # noqa: ASYNC110 - the reaper has no event to wait on
            await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------
# Structure: what the server asks of sandboxes, and the wiring of settings


async def test_desktop_stream_of_a_sandbox_streamed_elsewhere_is_409(served: tuple) -> None:
    """A sandbox without a VNC endpoint of its own (not a StreamedSandbox) has no stream here: 409."""
    test_server, client = served
    login = await client.login("e2blike")
    async with client.connect(login) as conn:
        await conn.result(await conn.send("start_desktop"))
    token = test_server.app[server.STREAM_TOKENS].token(login.session_id, run=1)
    url = str(test_server.make_url(f"/desktop/{login.session_id}/websockify"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.http.ws_connect(url, protocols=("binary", f"deskhive.stream.{token}"))
    assert refused.value.status == 409


def test_only_the_local_sandbox_is_streamed_by_the_server(make: MakeLocal) -> None:
    """LocalSandbox satisfies StreamedSandbox; the null and fake sandboxes do not."""
    from sandboxes.base import SandboxSpec, StreamedSandbox
    from sandboxes.null import NullSandbox

    spec = SandboxSpec(session_id="s_1_0000000000000000", username="s", data_dir=Path("/nonexistent"))
    assert isinstance(make("streamed"), StreamedSandbox)
    assert not isinstance(NullSandbox(spec), StreamedSandbox)
    assert not isinstance(FakeSandbox(spec), StreamedSandbox)


async def test_settings_reach_the_supervisor_the_actors_and_the_jobs(tmp_path: Path) -> None:
    """Each limit given in the settings is the one the supervisor, actors and jobs run with."""
    import wiring
    from config import Settings

    settings = Settings(
        data_dir=tmp_path,
        idle_timeout=7.0,
        sweep_interval=2.0,
        sessions_per_user=5,
        mailbox_size=11,
        journal_size=13,
        command_timeout=17.0,
        output_limit=19,
        model_url="http://127.0.0.1:9/v1",
        model_key="k",
    )
    async with aiohttp.ClientSession() as http:
        config = wiring.supervisor_config(settings, {}, http)
    assert (config.idle_timeout, config.sweep_interval, config.sessions_per_user) == (7.0, 2.0, 5)
    assert (config.actor.mailbox_size, config.actor.journal_size) == (11, 13)
    assert (config.actor.jobs.command_timeout, config.actor.jobs.output_limit) == (17.0, 19)
    assert config.actor.jobs.model is not None and config.actor.jobs.model.url == "http://127.0.0.1:9/v1"
    assert wiring.model_config(Settings(data_dir=tmp_path)) is None


@pytest.mark.parametrize("store", ["memory", "durable"])
async def test_shutdown_answers_every_acknowledged_job_before_the_socket_closes(
    start_server: StartServer, fakes: list[FakeSandbox], store: str
) -> None:
    """A running and a waiting job each get their cancelled result on the socket, then it closes."""
    options = {"store": "memory"} if store == "memory" else {}
    test_server, client = await start_server(**options)
    login = await client.login("wes")
    async with client.connect(login) as conn:
        fakes[0].hold_commands = True
        running = await conn.send("run_command", cmd="sleep 100")
        waiting = await conn.send("run_command", cmd="true")
        await conn.wait_for(lambda e: e["type"] == "ack" and e.get("id") == waiting)
        closing = asyncio.create_task(test_server.close())
        results = {}
        while len(results) < 2:
            event = await conn.recv(timeout=10)
            if event["type"] == "result":
                results[event["id"]] = event
        await closing
    assert set(results) == {running, waiting}
    assert all(r["ok"] is False and r["error"]["code"] == "cancelled" for r in results.values())


async def test_a_session_id_that_names_no_session_is_404_and_another_sessions_is_403(
    start_server: StartServer,
) -> None:
    """With a valid token, an unknown session id in the path is 404; a live session of someone else is 403."""
    _, client = await start_server()
    mine, theirs = await client.login("ann"), await client.login("bob")
    for path in ("/api/sessions/{}", "/api/sessions/{}/shares", "/api/sessions/{}/files"):
        method = "DELETE" if path == "/api/sessions/{}" else "GET"
        with pytest.raises(ClientError) as unknown:
            await client.call(method, path.format("nobody_1_0000000000000000"), token=mine.token)
        assert (unknown.value.status, unknown.value.code) == (404, "not_found")
        with pytest.raises(ClientError) as other:
            await client.call(method, path.format(theirs.session_id), token=mine.token)
        assert (other.value.status, other.value.code) == (403, "forbidden")


async def test_a_workflow_that_needs_a_query_says_so_before_any_step(
    served: tuple, fakes: list[FakeSandbox]
) -> None:
    """The default workflow without a query fails at once with bad_message, its desktop never started."""
    _, client = served
    login = await client.login("wfq")
    async with client.connect(login) as conn:
        flow = await conn.result(await conn.send("run_workflow"))
    assert flow["ok"] is False and flow["error"]["code"] == "bad_message"
    assert "query" in flow["error"]["message"]
    assert not fakes[0].running
