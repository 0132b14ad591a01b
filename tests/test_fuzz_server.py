"""A live server under hostile input: any frame, header or query, and nobody's session ends.

The repros first (each once crashed an actor, a socket handler or a request),
then generated frames of every type against a real server with FakeSandbox.
"""

from __future__ import annotations

import asyncio
import collections
import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from client import Client, Connection, Login
from protocol import codec
from protocol import messages as m
from protocol.errors import ProtocolError
from tests.conftest import StartServer
from tests.fakes import FakeSandbox

LONE = "\ud800"
#: Every code an ``error`` frame may carry (SPEC, "Error codes").
ERROR_CODES = {
    "bad_json", "bad_message", "unknown_type", "unauthorized", "not_found", "forbidden",
    "too_large", "rate_limited", "busy", "timeout", "sandbox_failed", "internal",
}  # fmt: skip
#: One valid frame of each request type, to which a test adds what it probes.
REQUESTS: dict[str, dict[str, Any]] = {
    "start_desktop": {},
    "setup_environment": {"packages": ["jq", "pip:numpy==2.0"]},
    "run_command": {"cmd": "echo hi"},
    "run_task": {"query": "look"},
    "run_workflow": {"workflow": "default", "query": "look"},
    "cancel": {"target": "nothing-runs"},
    "kill_desktop": {},
    "clear_logs": {},
    "get_state": {},
    "screenshot": {},
    "launch": {"app": "terminal"},
    "ping": {},
}


async def _raw_http(test_server: TestServer, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send one request as raw bytes (headers no HTTP client would send); status and body."""
    reader, writer = await asyncio.open_connection(test_server.host, test_server.port)
    try:
        length = f"Content-Length: {len(body)}\r\n".encode()
        writer.write(head + b"\r\n" + length + b"Connection: close\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _crashes(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") in {"actor.crashed", "job.crashed"} or e.get("exc_info")]


async def _replies_until(conn: Connection, rid: str, kinds: set[str]) -> list[dict[str, Any]]:
    """Every frame up to and including the first of *kinds* whose id is *rid*."""
    frames = []
    async with asyncio.timeout(10):
        while True:
            frame = await conn.recv()
            frames.append(frame)
            if frame["type"] in kinds and frame.get("id") == rid:
                return frames


# ----------------------------------------------------------------------------
# The repros


async def test_lone_surrogate_pings_are_answered_and_the_session_lives(served: tuple) -> None:
    """Four pings whose id is a lone surrogate get four pongs with that id; the session stays up."""
    _, client = served
    login = await client.login("surrogate")
    with capture_logs() as logs:
        async with client.connect(login) as conn:
            for _ in range(4):
                await conn.send_raw('{"type": "ping", "id": "\\ud800"}')
                assert await conn.recv() == {"type": "pong", "id": LONE}
            state = await conn.result(await conn.send("run_command", cmd="echo alive"))
            assert state["ok"]
    assert not _crashes(logs)


@pytest.mark.parametrize("kind", sorted(REQUESTS))
async def test_every_request_type_echoes_a_surrogate_id(served: tuple, kind: str) -> None:
    """Each request type with a lone surrogate in its id is answered with that id, never a crash."""
    _, client = served
    login = await client.login("echo")
    rid = f"r{LONE}"
    with capture_logs() as logs:
        async with client.connect(login) as conn:
            await conn.send_raw(json.dumps({"type": kind, "id": rid, **REQUESTS[kind]}))
            first = await conn.wait_for(lambda e: e.get("id") == rid)
            if kind == "ping":
                assert first["type"] == "pong"
            elif kind == "cancel":
                assert (first["type"], first["code"]) == ("error", "not_found")
            else:
                assert first["type"] == "ack"
                answer = "state" if kind == "get_state" else "result"
                await conn.wait_for(lambda e: e["type"] == answer and e.get("id") == rid)
            await conn.send("ping", id="after")
            await conn.wait_for(lambda e: e["type"] == "pong" and e["id"] == "after")
    assert not [e for e in logs if e.get("event") == "actor.crashed"]


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("run_command", "cmd", f"echo {LONE}"),
        ("run_command", "cmd", "echo a\x00b"),
        ("run_task", "query", f"find {LONE}"),
        ("run_workflow", "query", "find \x00"),
        ("setup_environment", "packages", [f"jq{LONE}"]),
        ("setup_environment", "packages", ["numpy==2.0"]),
    ],
)
async def test_text_the_sandbox_cannot_take_gets_bad_message_and_no_ack(
    served: tuple, kind: str, field: str, value: object
) -> None:
    """Over the socket and over HTTP, such text is refused with bad_message and its id; nothing runs."""
    test_server, client = served
    login = await client.login("refused")
    async with client.connect(login) as conn:
        await conn.send_raw(json.dumps({"type": kind, "id": f"x{LONE}", field: value}))
        error = await conn.recv()
        assert (error["type"], error["code"], error["id"]) == ("error", "bad_message", f"x{LONE}")
        endpoint = {"run_task": "/run-task", "run_workflow": "/run-workflow"}.get(kind, "/setup-environment")
        if kind != "run_command":
            head = (
                f"POST {endpoint} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {login.token}".encode()
            )
            status, body = await _raw_http(test_server, head, json.dumps({field: value}).encode())
            assert (status, json.loads(body)["error"]["code"]) == (400, "bad_message")
        await conn.send("ping", id="next")
        assert await conn.recv() == {"type": "pong", "id": "next"}
    assert not any(name in {"run", "setup"} for fake in FakeSandbox.instances for name, _ in fake.calls)


async def test_a_60000_character_command_runs(served: tuple, fakes: list[FakeSandbox]) -> None:
    """A command of 60,000 characters (inside one 64 KiB frame) is accepted and run whole."""
    _, client = served
    login = await client.login("longcmd")
    cmd = "echo " + "y" * 59_995
    async with client.connect(login) as conn:
        result = await conn.result(await conn.send("run_command", cmd=cmd))
    assert result["ok"]
    assert ("run", (cmd, 600.0)) in fakes[0].calls


async def test_hello_with_a_surrogate_token_closes_4401(served: tuple) -> None:
    """A hello whose token holds a lone surrogate is unauthorized (4401), not a handler crash."""
    test_server, client = served
    async with client.http.ws_connect(test_server.make_url("/ws")) as ws:
        await ws.send_str('{"type": "hello", "token": "\\ud800"}')
        error = await ws.receive_json(timeout=5)
        assert (error["type"], error["code"]) == ("error", "unauthorized")
        closing = await ws.receive(timeout=5)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4401


async def test_a_surrogate_request_id_over_http_is_accepted_and_answered(served: tuple) -> None:
    """POST /start-desktop with a lone surrogate id answers 202 with that id, and its result follows."""
    test_server, client = served
    login = await client.login("httpid")
    async with client.connect(login) as conn:
        head = (
            f"POST /start-desktop HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {login.token}".encode()
        )
        status, body = await _raw_http(test_server, head, b'{"id": "\\ud800"}')
        assert (status, json.loads(body)) == (202, {"request_id": LONE})
        result = await conn.wait_for(lambda e: e["type"] == "result" and e["id"] == LONE)
        assert result["ok"]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff",
        b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer admin-secret\xff",
        b"POST /start-desktop HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe",
        b"POST /run-task HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xc3\xa9",
        b"DELETE /api/sessions/x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xed\xa0\x80",
    ],
)
async def test_undecodable_authorization_answers_401(served: tuple, head: bytes) -> None:
    """A bearer token with bytes that are not visible ASCII is a JSON 401, not a 500."""
    test_server, _ = served
    status, body = await _raw_http(test_server, head)
    assert (status, json.loads(body)["error"]["code"]) == (401, "unauthorized")


@pytest.mark.parametrize("token", ["%C3%A9", "%ED%A0%80", "%FF", "%00", "a%20b"])
async def test_a_non_ascii_stream_token_answers_401(served: tuple, token: str) -> None:
    """The desktop stream refuses a ?token= that is not visible ASCII with 401, not a 500."""
    test_server, client = served
    login = await client.login("streamer")
    head = f"GET /desktop/{login.session_id}/websockify?token={token} HTTP/1.1\r\nHost: 127.0.0.1".encode()
    status, body = await _raw_http(test_server, head)
    assert (status, json.loads(body)["error"]["code"]) == (401, "unauthorized")


async def test_an_undecodable_host_gets_a_json_421(served: tuple) -> None:
    """A Host header that is not UTF-8 (no name of this server) gets a 421 with valid JSON."""
    test_server, _ = served
    status, body = await _raw_http(
        test_server, b"POST /api/sessions HTTP/1.1\r\nHost: h\xff", b'{"username":"h"}'
    )
    assert status == 421
    assert json.loads(body.decode("utf-8"))["error"]["code"] == "forbidden"


# ----------------------------------------------------------------------------
# Generated frames of every type


@attrs.frozen
class Live:
    """A running server, a session under fuzz and a bystander session watching."""

    server: TestServer
    client: Client
    login: Login
    conn: Connection
    bystander: Connection
    sentinels: collections.Counter[str] = attrs.field(factory=collections.Counter)


@pytest.fixture
async def live(start_server: StartServer) -> AsyncIterator[Live]:
    test_server, client = await start_server()
    login, other = await client.login("fuzz"), await client.login("bystander")
    async with client.connect(login) as conn, client.connect(other) as bystander:
        await bystander.send("ping", id="ready")
        assert await bystander.recv() == {"type": "pong", "id": "ready"}
        yield Live(test_server, client, login, conn, bystander)


#: Examples share one server (the ``live`` fixture): each makes its own session.
LIVE = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: What broke encoders and handlers: lone surrogates, NUL, blanks, the fake's special commands.
NASTY = st.sampled_from(
    [LONE, "\udfff", f"a{LONE}b", "\x00", "a\x00", " ", "", "\U0001f600", "exit x", "fail"]
)
TEXT = st.one_of(st.text(max_size=40), NASTY, st.integers(60_000, 70_000).map(lambda n: "z" * n))
JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | NASTY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)
PACKAGES = st.lists(
    st.one_of(st.sampled_from(["jq", "pip:numpy==2.0", "numpy==2.0", "pip:-r"]), TEXT), max_size=3
)
#: Per field: values a client means, then anything.
FIELDS = {
    "id": st.one_of(NASTY, st.text(min_size=1, max_size=70), JSON),
    "cmd": st.one_of(st.sampled_from(["true", "exit 3"]), TEXT, JSON),
    "query": st.one_of(st.just("look"), TEXT, JSON),
    "workflow": st.one_of(st.sampled_from(["default", "inspect", "nope", "../x"]), TEXT, JSON),
    "target": st.one_of(st.text(max_size=70), NASTY, JSON),
    "timeout": st.one_of(st.floats(), st.integers(), JSON),
    "packages": st.one_of(PACKAGES, JSON),
    "token": st.one_of(TEXT, JSON),
    "last_seq": st.one_of(st.integers(), JSON),
    "app": st.one_of(st.sampled_from(["terminal", "browser", "xeyes"]), TEXT, JSON),
    "url": st.one_of(st.just("https://example.invalid/"), TEXT, JSON),
}
#: The fields each type reads (the rest are ignored, so fuzzing them says little).
TYPE_FIELDS = {kind: ["id", *fields] for kind, fields in {
    "hello": ["token", "last_seq"], "start_desktop": [], "setup_environment": ["packages"],
    "run_command": ["cmd", "timeout"], "run_task": ["query"], "run_workflow": ["workflow", "query"],
    "cancel": ["target"], "kill_desktop": [], "clear_logs": [], "get_state": [], "screenshot": [], "ping": [],
    "launch": ["app", "url"],
}.items()}  # fmt: skip
REQUESTS_OF_EVERY_TYPE = st.sampled_from(sorted(TYPE_FIELDS)).flatmap(
    lambda kind: st.fixed_dictionaries(
        {"type": st.just(kind)}, optional={name: FIELDS[name] for name in TYPE_FIELDS[kind]}
    )
)
OBJECTS = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(sorted(TYPE_FIELDS)), JSON)}, optional=FIELDS
)
#: A frame: a request of a known type, a JSON object of any shape, broken JSON, any text, binary.
FRAMES = st.one_of(
    REQUESTS_OF_EVERY_TYPE.map(json.dumps),
    REQUESTS_OF_EVERY_TYPE.map(json.dumps),
    OBJECTS.map(json.dumps),
    OBJECTS.map(lambda o: json.dumps(o)[:-1]),  # cut short: not JSON
    st.text(max_size=50),
    st.binary(max_size=50),
)


def test_every_message_type_is_fuzzed() -> None:
    """The generated requests cover every type the codec knows, so a new one is fuzzed too."""
    assert set(TYPE_FIELDS) == codec.MESSAGE_TYPES


def _expected(frame: str | bytes) -> tuple[str, str | None, str | None]:
    """The reply a frame gets: (type, id or None, error code); type ``cancel`` for ack or not_found."""
    if isinstance(frame, bytes):
        return "error", None, "bad_message"
    try:
        msg = codec.decode(frame)
    except ProtocolError as exc:
        return "error", exc.request_id, exc.code
    if isinstance(msg, m.Hello):
        return "error", None, "bad_message"
    if isinstance(msg, m.Ping):
        return "pong", msg.id, None
    return ("cancel" if isinstance(msg, m.Cancel) else "ack"), msg.id, None


def _check_replies(frames: list[str | bytes], direct: list[dict[str, Any]]) -> collections.Counter[str]:
    """Match one reply to each frame (decode errors may overtake acks); return the acked ids."""
    expected = [_expected(frame) for frame in frames]
    given_ids = {rid for _, rid, _ in expected if rid is not None}
    left = [(r["type"], r.get("id"), r.get("code")) for r in direct]
    for kind, rid, code in expected:
        options = (
            [("ack", rid, None), ("error", rid, "not_found")] if kind == "cancel" else [(kind, rid, code)]
        )
        found = next((r for r in left if r in options or _auto(r, given_ids) in options), None)
        assert found is not None, (kind, rid, code, left)
        left.remove(found)
    assert not left, left
    assert all(r["code"] in ERROR_CODES for r in direct if r["type"] == "error")
    return collections.Counter(r["id"] for r in direct if r["type"] == "ack")


def _auto(reply: tuple[str, Any, Any], given_ids: set[str]) -> tuple[str, Any, Any]:
    """A request sent without id gets an id the server made up in its ack or error: match it as None."""
    kind, rid, code = reply
    made_up = kind == "ack" or code in {"not_found", "busy"}
    return (kind, None, code) if made_up and rid not in given_ids else reply


@settings(LIVE, max_examples=150)
@given(frames=st.lists(FRAMES, min_size=1, max_size=6))
async def test_generated_frames_get_documented_replies_and_harm_nobody(
    live: Live, frames: list[str | bytes]
) -> None:
    """Any frames get one documented reply each and one result per ack; the socket and a bystander live."""
    live.sentinels["n"] += 1
    n = live.sentinels["n"]
    last = m.RunCommand(id=f"sentinel-{n}", cmd="true")
    # A session per example: a failed one leaves no stale reply for the next.
    login = await live.client.login(f"fuzz{n}")
    with capture_logs() as logs:
        async with live.client.connect(login) as conn:
            for frame in frames:
                await conn.send_raw(frame)
            await conn.request(last)
            replies = await _replies_until(conn, f"sentinel-{n}", {"result"})
        await live.client.logout(login)
    direct = [r for r in replies if r["type"] in {"ack", "error", "pong"}]
    acked = _check_replies([*frames, codec.encode_request(last)], direct)
    answered = collections.Counter(
        r["id"] for r in replies if r["type"] == "result" or (r["type"] == "state" and "id" in r)
    )
    assert answered == acked, replies
    assert not [e for e in logs if e.get("event") == "actor.crashed"]
    await live.bystander.send("ping", id=f"sentinel-{n}")
    # Pongs a failed earlier example left unread are the only other frames it may see.
    while (frame := await live.bystander.recv()).get("id") != f"sentinel-{n}":
        assert frame["type"] == "pong", frame


#: A hello with the live session's token (``LIVE``, put in at run time) and any ``last_seq``.
LIVE_HELLOS = st.fixed_dictionaries(
    {"type": st.just("hello"), "token": st.just("LIVE")}, optional={"last_seq": FIELDS["last_seq"]}
).map(json.dumps)


@settings(LIVE, max_examples=100)
@given(first=st.one_of(FRAMES, LIVE_HELLOS))
async def test_a_generated_first_frame_gets_welcome_or_4401(live: Live, first: str | bytes) -> None:
    """A first frame is welcomed only as a valid hello; else it is closed with 4401, never dropped (1006)."""
    async with live.client.http.ws_connect(live.server.make_url("/ws")) as ws:
        if isinstance(first, bytes):
            await ws.send_bytes(first)
        else:
            first = first.replace('"LIVE"', json.dumps(live.login.token))
            await ws.send_str(first)
        welcomed = _hello_token(first) == live.login.token
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            frame = json.loads(msg.data)
            assert (frame["type"] == "welcome") is welcomed, (first, frame)
            if welcomed:
                assert frame["session_id"] == live.login.session_id
                return
            assert frame["code"] in ERROR_CODES
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4401, msg


def _hello_token(frame: str | bytes) -> str | None:
    """The token of *frame* if it is a valid hello."""
    try:
        msg = codec.decode(frame) if isinstance(frame, str) else None
    except ProtocolError:
        return None
    return msg.token if isinstance(msg, m.Hello) else None


HEADER_BYTES = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
#: ``LIVE`` stands for the live session's own token, so the request gets past authentication.
AUTHORIZATION = st.one_of(st.just(b"Bearer LIVE"), HEADER_BYTES.map(lambda b: b"Bearer " + b), HEADER_BYTES)
SEGMENT = st.text(max_size=12).map(lambda t: urllib.parse.quote(t.encode("utf-8", "surrogatepass"), safe=""))
LOGIN_BODY = st.fixed_dictionaries(
    {},
    optional={
        key: st.one_of(st.just("ada"), TEXT, JSON) for key in ("username", "aws_login", "customer_name")
    },
)
ROUTES = [
    "GET /status", "GET /healthz", "GET /api/workflows", "POST /api/sessions", "DELETE /api/sessions/{}",
    "POST /start-desktop", "POST /setup-environment", "POST /run-task", "POST /kill-desktop",
    "POST /run-workflow", "GET /desktop/{}", "GET /desktop/{}/websockify?token={}",
]  # fmt: skip


@settings(LIVE, max_examples=150)
@given(
    route=st.sampled_from(ROUTES),
    segment=SEGMENT,
    auth=AUTHORIZATION,
    host=st.one_of(st.just(b"127.0.0.1"), HEADER_BYTES),
    body=st.one_of(
        OBJECTS.map(json.dumps).map(str.encode),
        LOGIN_BODY.map(json.dumps).map(str.encode),
        st.binary(max_size=40),
    ),
)
async def test_generated_requests_never_answer_500(
    live: Live, route: str, segment: str, auth: bytes, host: bytes, body: bytes
) -> None:
    """Any path segment, Authorization, Host and body bytes, on every route, get a 2xx or 4xx, never a 5xx."""
    target = route.replace("{}", segment).encode()
    auth = auth.replace(b"LIVE", live.login.token.encode())
    head = target + b" HTTP/1.1\r\nHost: " + host + b"\r\nAuthorization: " + auth
    status, _ = await _raw_http(live.server, head, body)
    assert status < 500


@settings(LIVE, max_examples=60)
@given(token=st.text(max_size=20))
async def test_generated_stream_tokens_are_refused_with_401(live: Live, token: str) -> None:
    """Any ?token= on the desktop stream other than the session's own is a 401."""
    query = urllib.parse.quote(token.encode("utf-8", "surrogatepass"), safe="")
    head = (
        f"GET /desktop/{live.login.session_id}/websockify?token={query} HTTP/1.1\r\nHost: 127.0.0.1".encode()
    )
    status, _ = await _raw_http(live.server, head)
    assert status == 401
