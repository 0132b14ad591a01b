"""Outbound data is bounded: sockets per session, unsent bytes per socket, paced replays, shutdown."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

import server
import ws_api
import wspeer
from client import Client, Connection, Login
from protocol.closecodes import CloseCode
from tests.conftest import StartServer
from wspeer import WsPeer

#: Output of one command: ``ran <cmd>`` from the fake sandbox, about 30 KB.
BIG_CMD = "x" * 30_000
#: A frame of the journal is at most this large here (one BIG_CMD output).
FRAME_SLACK = 64 * 1024


class RawSocket:
    """A WebSocket client on a bare TCP socket with a small receive buffer: it reads only when told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, test_server: TestServer, path: str = "/ws", rcvbuf: int = 4096) -> RawSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        host, port = str(test_server.host), int(test_server.port or 0)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send_json(self, obj: dict[str, Any]) -> None:
        payload, mask = json.dumps(obj).encode(), os.urandom(4)
        n = len(payload)
        length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(b"\x81" + length + mask + masked)

    async def hello(self, login: Login, last_seq: int | None = None) -> None:
        hello: dict[str, Any] = {"type": "hello", "token": login.token}
        if last_seq is not None:
            hello["last_seq"] = last_seq
        self.send_json(hello)

    async def frame(self, timeout: float = 10.0) -> tuple[bytes, int, bytes]:
        """The next frame as (header, opcode, payload); server frames are unmasked."""
        async with asyncio.timeout(timeout):
            header = await self.reader.readexactly(2)
            length = header[1] & 0x7F
            if length == 126:
                extra = await self.reader.readexactly(2)
                length, header = struct.unpack("!H", extra)[0], header + extra
            elif length == 127:
                extra = await self.reader.readexactly(8)
                length, header = struct.unpack("!Q", extra)[0], header + extra
            return header, header[0] & 0x0F, await self.reader.readexactly(length)

    async def event(self, timeout: float = 10.0) -> dict[str, Any] | int:
        """The next text frame as JSON, or the close code once the server closes."""
        while True:
            _, opcode, payload = await self.frame(timeout)
            if opcode == 0x1:
                event: dict[str, Any] = json.loads(payload)
                return event
            if opcode == 0x8:
                code: int = struct.unpack("!H", payload[:2])[0]
                return code

    def close(self) -> None:
        self.writer.transport.abort()


def _peers(test_server: TestServer) -> set[WsPeer]:
    return set(test_server.app[server.SOCKETS])


async def _say_hello(
    test_server: TestServer, count: int, logins: list[Login], last_seq: int | None = None, rcvbuf: int = 4096
) -> tuple[list[RawSocket], list[WsPeer]]:
    """Open *count* raw sockets bound round robin to *logins*; return them and the server's ends.

    Each reads its ``welcome`` and nothing more: by then the server queued
    the first part of the replay, in the same step.
    """
    before = _peers(test_server)
    raws = [await RawSocket.open(test_server, rcvbuf=rcvbuf) for _ in range(count)]
    for n, raw in enumerate(raws):
        await raw.hello(logins[n % len(logins)], last_seq)
        welcome = await raw.event()
        assert isinstance(welcome, dict) and welcome["type"] == "welcome", welcome
    fresh = list(_peers(test_server) - before)
    assert len(fresh) == count
    return raws, fresh


async def _fill(conn: Connection, commands: int, batch: int = 25) -> None:
    """Run *commands* commands of about 30 KB of output each, *batch* at a time."""
    for start in range(0, commands, batch):
        rids = [await conn.send("run_command", cmd=BIG_CMD) for _ in range(min(batch, commands - start))]
        await conn.results(*rids, timeout=30)


async def _sockets_of(client: Client, login: Login) -> int:
    status = await client.call("GET", "/status", token="admin-secret")
    return next(s["sockets"] for s in status["sessions"] if s["session_id"] == login.session_id)


# ----------------------------------------------------------------------------
# Sockets per session


async def test_the_seventeenth_socket_of_a_session_is_refused_with_4429(served: tuple) -> None:
    """Sixteen sockets may watch one session; the 17th hello gets rate_limited and close 4429."""
    test_server, client = served
    login = await client.login("many")
    conns = [Connection(client.http, login) for _ in range(16)]
    for conn in conns:
        await conn.open()
    extra = await RawSocket.open(test_server)
    await extra.hello(login)
    error = await extra.event()
    assert isinstance(error, dict) and (error["type"], error["code"]) == ("error", "rate_limited")
    assert "16" in error["message"]
    assert await extra.event() == CloseCode.RATE_LIMITED
    extra.close()
    # One tab closes: its place is free again.
    await conns.pop().close()
    async with asyncio.timeout(5):
        while await _sockets_of(client, login) != 15:
            pass
    async with client.connect(login) as conn:
        assert conn.welcome["type"] == "welcome"
    for conn in conns:
        await conn.close()


# ----------------------------------------------------------------------------
# Unsent data per socket


async def test_a_socket_that_does_not_read_is_bounded_and_closed_with_1008(served: tuple) -> None:
    """A live socket that stops reading never holds much over 4 MiB unsent, then gets 1008 and resumes."""
    test_server, client = served
    login = await client.login("stuck")
    async with client.connect(login) as owner:
        (raw,), (peer,) = await _say_hello(test_server, 1, [login])
        worst = 0
        for _ in range(40):  # 40 x 10 x 30 KB = 12 MB, three times the bound
            await _fill(owner, 10, batch=10)
            worst = max(worst, peer.unsent_bytes)
            if not peer.live or peer.closing:
                break
        assert peer.closing, "a socket that reads nothing must be closed once past the bound"
        assert worst <= wspeer.MAX_UNSENT_BYTES + FRAME_SLACK
        # The client reads again: what was queued, then the close with 1008.
        seen: list[int] = []
        while isinstance(event := await raw.event(), dict):
            if "seq" in event:
                seen.append(event["seq"])
        assert event == CloseCode.POLICY_VIOLATION
        raw.close()
        assert seen == list(range(1, len(seen) + 1))
        await owner.send("get_state", id="mark")
        newest = (await owner.wait_for(lambda e: e["type"] == "state" and e.get("id") == "mark"))["seq"]
    # It resumes from its last seq and misses nothing.
    async with client.connect(login, last_seq=seen[-1]) as again:
        replay = [await again.recv() for _ in range(newest - seen[-1])]
    assert [e["seq"] for e in replay] == list(range(seen[-1] + 1, newest + 1))


async def test_replays_to_sockets_that_do_not_read_stay_small(start_server: StartServer) -> None:
    """Sixteen hellos from 0 that never read a full journal each hold a replay chunk, not the journal."""
    test_server, client = await start_server(journal_size=100_000)
    login = await client.login("replays")
    async with client.connect(login) as owner:
        await _fill(owner, 560)  # 16 MiB: the journal's byte bound
    raws, peers = await _say_hello(test_server, 16, [login], last_seq=0)
    assert all(not p.live and not p.closing for p in peers)
    assert min(p.unsent_bytes for p in peers) > 64 * 1024, "each socket must be stalled on its replay"
    assert max(p.unsent_bytes for p in peers) <= wspeer.REPLAY_CHUNK_BYTES + FRAME_SLACK
    for raw in raws:
        raw.close()


async def test_a_slow_reader_gets_a_whole_journal_in_order_with_live_events(
    start_server: StartServer,
) -> None:
    """A resume from 0 of a 16 MiB journal over a slow link arrives whole and in order, live events too."""
    test_server, client = await start_server(journal_size=100_000)
    login = await client.login("slow")
    async with client.connect(login) as owner:
        await _fill(owner, 560)
        (raw,), (peer,) = await _say_hello(test_server, 1, [login], last_seq=0, rcvbuf=8192)
        seqs: list[int] = []
        gaps: list[dict[str, Any]] = []
        live: list[str] = []
        worst = 0
        while True:
            event = await raw.event()
            assert isinstance(event, dict), f"closed with {event}"
            worst = max(worst, peer.unsent_bytes)
            if event["type"] == "gap":
                gaps.append(event)
                continue
            seqs.append(event["seq"])
            # Live work while the replay is under way: its events must take their turn.
            if len(seqs) % 400 == 0 and len(live) < 5:
                live.append(await owner.send("run_command", cmd="echo live"))
            if event["type"] == "result" and len(live) == 5 and event["id"] == live[-1]:
                break
    raw.close()
    assert not peer.closing
    assert worst <= wspeer.MAX_UNSENT_BYTES
    first = gaps[0]["to_seq"] + 1 if gaps else 1
    assert len(gaps) <= 1 and (not gaps or gaps[0]["from_seq"] == 1)
    assert seqs == list(range(first, first + len(seqs)))


# ----------------------------------------------------------------------------
# Shutdown


async def test_shutdown_closes_unresponsive_sockets_under_one_deadline(start_server: StartServer) -> None:
    """Twenty clients that read nothing and never answer the close still let shutdown finish in seconds."""
    test_server, client = await start_server(journal_size=100_000)
    logins = [await client.login("gone"), await client.login("gone")]
    for login in logins:
        async with client.connect(login) as owner:
            await _fill(owner, 200)  # 6 MB each: more than the kernel takes for a silent client
    raws, peers = await _say_hello(test_server, 20, logins, last_seq=0)
    assert all(p.unsent_bytes > 64 * 1024 for p in peers), "each socket must have a stalled backlog"
    started = time.monotonic()
    await test_server.close()
    took = time.monotonic() - started
    print(f"shutdown with 20 stalled sockets: {took:.2f} s")
    assert took < ws_api.SHUTDOWN_CLOSE_S + 4, f"shutdown took {took:.1f} s"
    assert all(p.unsent_bytes == 0 for p in peers)
    for raw in raws:
        raw.close()


@pytest.mark.parametrize("code", list(CloseCode))
def test_close_codes_are_the_documented_numbers(code: CloseCode) -> None:
    """Each close code keeps the number clients branch on."""
    documented = {
        "GOING_AWAY": 1001,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "UNAUTHORIZED": 4401,
        "FORBIDDEN": 4403,
        "NOT_FOUND": 4404,
        "RATE_LIMITED": 4429,
    }
    assert documented[code.name] == code.value


def test_journal_reads_in_parts_and_reports_what_left_as_a_gap() -> None:
    """A paced read takes about its budget (at least one event) and names events that left as a gap."""
    from actors.journal import Journal
    from protocol import messages as m

    journal = Journal(max_events=5, max_bytes=1 << 20)
    for n in range(8):
        journal.append(m.Output(id="r", stream="stdout", data=str(n) * 100))
    size = len(journal.read(4, 1 << 20).frames[0])
    part = journal.read(4, 2 * size)
    assert (part.gap, len(part.frames), part.next_seq) == (None, 2, 6)
    late = journal.read(2, 1)
    assert (late.gap, len(late.frames), late.next_seq) == ((2, 3), 1, 5)
    done = journal.read(9, 1 << 20)
    assert (done.gap, done.frames, done.next_seq) == (None, [], 9)
