"""``deskhive serve`` killed or stopped while sessions stream, then started again on the same store."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from client import Client, Connection, Login
from tests.datadirs import fresh_data_dir, remove_data_dir
from tests.test_cli import Served, start, stop

SESSIONS = 3
COMMANDS = 300
#: Big enough that nothing leaves the journal: every event sent can be compared.
JOURNAL = ("--journal-size", "100000")


async def _now_and_then(n: int) -> None:
    # Frames already received are read without suspending: a long run of
    # them would hold this test's loop past the slow-callback bound.
    if n % 50 == 0:
        await asyncio.sleep(0)


def at(served: Served, login: Login) -> Login:
    """*login* as seen through *served* (a restarted server listens on another port)."""
    return attrs.evolve(login, ws_url=served.url.replace("http", "ws", 1) + "/ws")


async def frames_until_closed(conn: Connection) -> list[dict[str, Any]]:
    """Every frame the socket still delivers until it closes (what the old server sent)."""
    assert conn.ws is not None
    got: list[dict[str, Any]] = []
    while True:
        msg = await conn.ws.receive(timeout=20)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return got
        got.append(json.loads(msg.data))
        await _now_and_then(len(got))


async def frames_until(
    conn: Connection, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Every frame until *done* says the frames so far are enough."""
    assert conn.ws is not None
    got: list[dict[str, Any]] = []
    while not done(got):
        got.append(json.loads((await conn.ws.receive(timeout=20)).data))
        await _now_and_then(len(got))
    return got


async def replay(served: Served, login: Login) -> tuple[list[dict[str, Any]], int]:
    """Everything a fresh socket is sent after ``hello {last_seq: 0}``, and a new event's seq.

    A ``get_state`` probe is journaled after whatever the restarted server
    emitted first, so once its event arrives the replay is complete.
    """
    async with Client(served.url) as client, client.connect(at(served, login), last_seq=0) as conn:
        rid = await conn.send("get_state", id="probe")
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(20):
            while True:
                frame = await conn._next_frame(20)
                if frame.get("id") == rid and frame["type"] == "state":
                    return frames, frame["seq"]
                frames.append(frame)
                await _now_and_then(len(frames))


def check_numbering(frames: list[dict[str, Any]]) -> None:
    """Seqs grow one by one, each jump announced by a gap naming exactly the skipped numbers."""
    expected = 1
    for frame in frames:
        if frame["type"] == "gap":
            assert frame["from_seq"] == expected, frame
            expected = frame["to_seq"] + 1
        elif "seq" in frame:
            assert frame["seq"] == expected, (frame, expected)
            expected += 1


@pytest.fixture
async def data_dir() -> AsyncIterator[Path]:
    made = fresh_data_dir()
    yield made
    remove_data_dir(made)


async def stream_then(
    signum: int, data_dir: Path
) -> tuple[Served, list[Login], list[dict[int, Any]], list[set[str]]]:
    """Sessions stream output; the server gets *signum* mid-way. What each socket got, and its acks."""
    served = await start("--sandbox", "null", "--data-dir", str(data_dir), *JOURNAL)
    sent: list[dict[int, Any]] = []
    acked: list[set[str]] = []
    try:
        async with Client(served.url) as client:
            logins = [await client.login(f"k{i}") for i in range(SESSIONS)]
            conns = [Connection(client.http, login) for login in logins]
            for conn in conns:
                await conn.open()
                for n in range(COMMANDS):
                    await conn.send("run_command", cmd=f"echo {n}", id=f"c{n}")
                    await _now_and_then(n)
            # Stop while the output flows, once every request was acknowledged
            # (an acknowledgement of the last milliseconds may be lost like an event).
            early = [
                await frames_until(conn, lambda got: sum(f["type"] == "ack" for f in got) == COMMANDS)
                for conn in conns
            ]
            if signum == signal.SIGKILL:
                os.killpg(served.proc.pid, signal.SIGKILL)
            else:
                served.proc.send_signal(signum)
            for conn, before in zip(conns, early, strict=True):
                got = before + await frames_until_closed(conn)
                sent.append({f["seq"]: f for f in got if "seq" in f})
                acked.append({f["id"] for f in got if f["type"] == "ack"})
                await conn.close()
    finally:
        await stop(served, signalled=True)
    return served, logins, sent, acked


async def test_after_sigkill_every_session_resumes_with_no_seq_repeated(data_dir: Path) -> None:
    """Killed while streaming, restarted: journals come back, only a tail is lost, new seqs are above."""
    _, logins, sent, acked = await stream_then(signal.SIGKILL, data_dir)
    served = await start("--sandbox", "null", "--data-dir", str(data_dir), *JOURNAL)
    try:
        async with Client(served.url) as client:
            status = await client.call("GET", "/status", token=served.admin)
            assert len(status["sessions"]) == SESSIONS
        for login, old, old_acks in zip(logins, sent, acked, strict=True):
            frames, probe = await replay(served, login)
            check_numbering(frames)
            kept = {f["seq"]: f for f in frames if "seq" in f}
            top = max(old, default=0)
            for seq in old.keys() & kept.keys():
                assert old[seq] == kept[seq], "a seq may name one event only"
            lost, newest_kept = old.keys() - kept.keys(), max(old.keys() & kept.keys(), default=0)
            assert all(seq > newest_kept for seq in lost), "only a tail is lost"
            restarted = [f for f in kept.values() if "restarted" in str(f.get("error", {}).get("message"))]
            assert all(f["seq"] > top for f in restarted), "the new server numbers above what was sent"
            assert probe > top
            answered = {f["id"] for f in [*old.values(), *kept.values()] if f["type"] == "result"}
            assert old_acks <= answered, "every acknowledged request has its result"
    finally:
        assert await stop(served) == 0


async def test_after_sigterm_nothing_is_lost_and_numbering_goes_on(data_dir: Path) -> None:
    """Stopped while streaming, restarted: every event is back, no gap, the next seq follows the last."""
    _, logins, sent, acked = await stream_then(signal.SIGTERM, data_dir)
    served = await start("--sandbox", "null", "--data-dir", str(data_dir), *JOURNAL)
    try:
        for login, old, old_acks in zip(logins, sent, acked, strict=True):
            frames, probe = await replay(served, login)
            assert not [f for f in frames if f["type"] == "gap"]
            kept = {f["seq"]: f for f in frames if "seq" in f}
            assert sorted(kept) == list(range(1, probe)), "no hole, and the probe numbered right after"
            assert all(kept[seq] == frame for seq, frame in old.items()), "everything sent is kept"
            results = {f["id"]: f for f in kept.values() if f["type"] == "result"}
            assert old_acks <= results.keys(), "every acknowledged request has its result, kept"
            for failed in (r for r in results.values() if not r["ok"]):
                assert failed["error"]["code"] == "cancelled", "only the shutdown cut jobs off"
                assert "shutting down" in failed["error"]["message"]
    finally:
        assert await stop(served) == 0


async def test_a_second_server_on_the_same_data_folder_refuses(data_dir: Path) -> None:
    """While one server holds a data folder, another one started on it exits naming the folder."""
    served = await start("--sandbox", "null", "--data-dir", str(data_dir))
    try:
        with pytest.raises(RuntimeError, match=re.escape(f"data folder {data_dir} is in use")):
            await start("--sandbox", "null", "--data-dir", str(data_dir))
    finally:
        assert await stop(served) == 0


def _processes_of_uid(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            real = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
            zombie = "State:\tZ" in status
            if int(real) == uid and not zombie:
                found.append(int(entry.name))
    return found


@pytest.mark.local
@pytest.mark.skipif(shutil.which("bwrap") is None or os.geteuid() != 0, reason="needs root and bubblewrap")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
async def test_a_local_session_keeps_its_home_and_loses_its_desktop(data_dir: Path, signum: int) -> None:
    """After a restart the home's files are there, the desktop is reported lost, no old process lives."""
    served = await start("--sandbox", "local", "--data-dir", str(data_dir))
    try:
        async with Client(served.url) as client:
            login = await client.login("homer")
            async with client.connect(login) as conn:
                assert (await conn.result(await conn.send("start_desktop"), timeout=30))["ok"]
                wrote = await conn.result(
                    await conn.send("run_command", cmd="echo kept > ~/note; sleep 1000 &")
                )
                assert wrote["exit_code"] == 0
                seen = conn.last_seq
            home = data_dir / "sandboxes" / login.session_id / "home"
            uid = home.stat().st_uid
            assert await asyncio.to_thread(_processes_of_uid, uid), (
                "the test must see the session's processes"
            )
        if signum == signal.SIGKILL:
            os.killpg(served.proc.pid, signal.SIGKILL)
    finally:
        await stop(served, signalled=signum == signal.SIGKILL)
    served = await start("--sandbox", "local", "--data-dir", str(data_dir))
    try:
        async with Client(served.url) as client:
            await client.call("GET", "/healthz")
            # No event tells of another process's end: poll /proc, within the spec's 10 s.
            async with asyncio.timeout(10):
                while await asyncio.to_thread(_processes_of_uid, uid):  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            async with client.connect(at(served, login), last_seq=seen) as conn:
                assert conn.welcome["state"] == "idle"
                lost = await conn.wait_for(lambda e: e.get("event") == "desktop.lost")
                assert "restarted" in lost["reason"]
                read = await conn.send("run_command", cmd="cat ~/note")
                out = await conn.wait_for(lambda e: e["type"] == "output" and e["id"] == read)
                assert out["data"] == "kept\n"
                assert (await conn.result(read))["exit_code"] == 0
            assert (home / "note").stat().st_uid == uid, "the home keeps its owner across the restart"
    finally:
        assert await stop(served) == 0
