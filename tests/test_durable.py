"""Sessions that survive a restart: a real SQLite file, servers started one after another on it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp.test_utils import TestServer

import config
import server
from actors.journal import Journal
from client import Client, ClientError, Login, SessionEnded
from config import Settings
from protocol import messages as m
from store import SqliteStore
from tests.fakes import FakeSandbox

Start = Callable[..., Awaitable[Client]]


@pytest.fixture
async def boot(tmp_path: Path) -> AsyncIterator[tuple[Start, Callable[[], Awaitable[None]]]]:
    """Start a server on one data folder and store; stop it (a clean shutdown) to start the next."""
    running: list[tuple[TestServer, Client]] = []

    async def start(**options: Any) -> Client:
        options.setdefault("sandbox", "null")
        options.setdefault("data_dir", tmp_path / "var")
        options.setdefault("admin_token", "admin-secret")
        options.setdefault("store", f"sqlite://{tmp_path / 'deskhive.db'}")
        app = server.create_app(Settings(**options), sandbox_factory=FakeSandbox)
        test_server = TestServer(app, host="127.0.0.1", port=0)
        await test_server.start_server()
        client = Client(str(test_server.make_url("")))
        await client.__aenter__()
        running.append((test_server, client))
        return client

    async def stop() -> None:
        test_server, client = running.pop()
        await client.__aexit__(None, None, None)
        await test_server.close()

    yield start, stop
    while running:
        await stop()


def at(client: Client, login: Login) -> Login:
    """*login* as seen through the server *client* talks to (the restarted one listens elsewhere)."""
    return attrs.evolve(login, ws_url=client.base_url.replace("http", "ws", 1) + "/ws")


def crashed(db: Path) -> None:
    """Make the store look as a killed server leaves it: not closed cleanly."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'clean'")


async def events_after(
    client: Client, login: Login, last_seq: int | None, until: int
) -> list[dict[str, Any]]:
    """Every frame of a resume after *last_seq*, up to the event numbered *until*."""
    frames: list[dict[str, Any]] = []
    async with client.connect(login, last_seq=last_seq) as conn:
        while not frames or frames[-1].get("seq", 0) < until:
            frames.append(await conn._next_frame(10))
    return frames


async def hold_a_command(client: Client, login: Login) -> tuple[str, int]:
    """Start a command the fake sandbox holds; its request id, and the newest seq seen."""
    async with client.connect(login) as conn:
        FakeSandbox.instances[-1].hold_commands = True
        held = await conn.send("run_command", cmd="sleep")
        await conn.wait_for(lambda e: e.get("type") == "output" and e.get("id") == held)
        return held, conn.last_seq


def test_journal_keeps_a_skipped_range_as_a_gap_for_every_later_reader() -> None:
    """Numbers skipped between two events come back as a gap at their place, however far back one reads."""
    journal = Journal(100, 1 << 20)
    for _ in range(3):
        journal.append(m.Log(ts="t", level="info", event="before"))
    journal.skip_to(10)
    journal.append(m.Log(ts="t", level="info", event="after"))
    first = journal.read(1, 1 << 20)
    assert (first.gap, len(first.frames), first.next_seq) == (None, 3, 4)
    second = journal.read(first.next_seq, 1 << 20)
    assert (second.gap, len(second.frames), second.next_seq) == ((4, 10), 1, 12)
    assert b'"seq":11' in second.frames[0]
    again = Journal(100, 1 << 20)
    again.restore([(1, first.frames[0]), (11, second.frames[0])], 20)
    assert again.read(2, 1 << 20).gap == (2, 10)
    assert again.read(12, 1 << 20).gap == (12, 20)


async def test_a_clean_restart_brings_sessions_back_with_their_journal_and_no_gap(
    boot: tuple[Start, Callable[[], Awaitable[None]]],
) -> None:
    """After a shutdown the token resumes with nothing lost, numbering goes on, a held job got `cancelled`."""
    start, stop = boot
    FakeSandbox.instances.clear()
    client = await start()
    login = await client.login("ann")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("run_command", cmd="echo one")))["ok"]
    held, seen = await hold_a_command(client, login)
    await stop()
    client = await start()
    login = at(client, login)
    status = await client.call("GET", "/status", token="admin-secret")
    assert [s["session_id"] for s in status["sessions"]] == [login.session_id]
    assert (status["totals"]["restored"], status["totals"]["spawned"]) == (1, 0)
    async with client.connect(login, last_seq=seen) as conn:
        assert conn.welcome["resumed"] is True
        result = await conn.result(held)
        assert (result["ok"], result["error"]["code"]) == (False, "cancelled")
        assert "shutting down" in result["error"]["message"]
        after = conn.last_seq
        rid = await conn.send("run_command", cmd="echo two")
        assert (await conn.result(rid))["ok"]
    frames = await events_after(client, login, 0, after)
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert not [f for f in frames if f["type"] == "gap"]
    assert seqs == list(range(1, after + 1))
    async with client.connect(login, last_seq=after) as conn:
        assert (await conn.recv())["seq"] == after + 1, "the next event is numbered on with no hole"


async def test_a_replay_after_a_restart_mid_job_ends_on_the_state_the_session_is_in(
    boot: tuple[Start, Callable[[], Awaitable[None]]],
) -> None:
    """A client that applies a replay in order ends on `idle`, not on the old server's `stopping`."""
    start, stop = boot
    FakeSandbox.instances.clear()
    client = await start()
    login = await client.login("ann")
    await hold_a_command(client, login)
    await stop()
    client = await start()
    login = at(client, login)
    async with client.connect(login) as conn:
        welcome = conn.welcome
    frames = await events_after(client, login, 0, welcome["seq"])
    states = [f["state"] for f in frames if f["type"] == "state"]
    assert "stopping" in states
    assert states[-1] == welcome["state"] == "idle"


async def test_after_a_crash_new_events_are_numbered_above_the_reservation_with_a_gap(
    boot: tuple[Start, Callable[[], Awaitable[None]]], tmp_path: Path
) -> None:
    """An unclean store makes the next server skip reserved seqs, say so with a gap, and cancel held jobs."""
    start, stop = boot
    FakeSandbox.instances.clear()
    client = await start()
    login = await client.login("bob")
    held, last = await hold_a_command(client, login)
    await stop()
    db = tmp_path / "deskhive.db"
    with sqlite3.connect(db) as conn_db:
        # As if the server had been killed here, after sending seqs up to its reservation.
        conn_db.execute("DELETE FROM events WHERE seq > ?", (last,))
        conn_db.execute("UPDATE sessions SET seq_reserved = 500, last_seq = ?", (last,))
        conn_db.execute("INSERT OR IGNORE INTO pending VALUES (?, ?)", (login.session_id, held))
    crashed(db)
    client = await start()
    login = at(client, login)
    async with client.connect(login, last_seq=last) as conn:
        gap = await conn._next_frame(10)
        assert (gap["type"], gap["from_seq"], gap["to_seq"]) == ("gap", last + 1, 500)
        result = await conn.result(held)
        assert result["seq"] == 501
        assert (result["error"]["code"], result["error"]["message"]) == (
            "cancelled",
            "the server restarted before this request finished",
        )
    # A later resume from before the hole meets the gap at its place.
    frames = await events_after(client, login, last - 1, 501)
    assert [(f["type"], f.get("seq")) for f in frames] == [
        ("output", last),
        ("gap", None),
        ("result", 501),
    ]


async def test_an_ended_session_stays_ended_after_a_restart(
    boot: tuple[Start, Callable[[], Awaitable[None]]],
) -> None:
    """A logged-out session's token gets 404 and 4404 from the next server too, not 401."""
    start, stop = boot
    client = await start()
    login = await client.login("cat")
    await client.logout(login)
    await stop()
    client = await start()
    login = at(client, login)
    with pytest.raises(ClientError) as http:
        await client.call("POST", "/start-desktop", token=login.token)
    assert http.value.status == 404
    with pytest.raises(ClientError) as hello:
        async with client.connect(login):
            pass
    assert hello.value.code == "not_found"


async def test_restored_sessions_count_toward_the_quota(
    boot: tuple[Start, Callable[[], Awaitable[None]]],
) -> None:
    """A user at the quota before a restart is still at it after."""
    start, stop = boot
    client = await start(sessions_per_user=1)
    await client.login("dan")
    await stop()
    client = await start(sessions_per_user=1)
    with pytest.raises(ClientError) as refused:
        await client.login("dan")
    assert refused.value.status == 429


async def test_a_session_idle_past_the_timeout_while_down_is_reaped_at_once(
    boot: tuple[Start, Callable[[], Awaitable[None]]], tmp_path: Path
) -> None:
    """A session whose last activity is older than the idle timeout ends at the first sweep after start-up."""
    start, stop = boot
    client = await start()
    login = await client.login("eve")
    await stop()
    store = SqliteStore(tmp_path / "deskhive.db")
    await store.open()
    store.touch(login.session_id, time.time() - 7200)
    await store.aclose()
    client = await start(idle_timeout=3600)
    login = at(client, login)
    with pytest.raises(ClientError) as hello:
        async with client.connect(login):
            pass
    assert hello.value.code == "not_found"
    status = await client.call("GET", "/status", token="admin-secret")
    assert status["sessions"] == []


async def test_with_the_memory_store_a_shutdown_ends_sessions(
    boot: tuple[Start, Callable[[], Awaitable[None]]],
) -> None:
    """`--store memory` keeps nothing: after a restart the old token is unknown."""
    start, stop = boot
    client = await start(store="memory")
    login = await client.login("fay")
    await stop()
    client = await start(store="memory")
    login = at(client, login)
    with pytest.raises(ClientError) as unknown:
        await client.call("POST", "/start-desktop", token=login.token)
    assert unknown.value.status == 401


async def test_a_desktop_that_died_with_the_server_is_reported_lost(
    boot: tuple[Start, Callable[[], Awaitable[None]]],
) -> None:
    """A session whose desktop ran comes back idle with a `desktop.lost` event, and can start a new one."""
    start, stop = boot
    client = await start()
    login = await client.login("gus")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
        seen = conn.last_seq
    await stop()
    client = await start()
    login = at(client, login)
    async with client.connect(login, last_seq=seen) as conn:
        assert conn.welcome["state"] == "idle"
        lost = await conn.wait_for(lambda e: e.get("event") == "desktop.lost")
        assert "restarted" in lost["reason"]
        assert (await conn.wait_for(lambda e: e["type"] == "state"))["state"] == "idle"
        assert (await conn.result(await conn.send("start_desktop")))["ok"]


async def test_a_result_stored_before_a_crash_is_not_given_twice(
    boot: tuple[Start, Callable[[], Awaitable[None]]], tmp_path: Path
) -> None:
    """A request still marked pending but whose result was stored gets no second, `cancelled` result."""
    start, stop = boot
    client = await start()
    login = await client.login("hal")
    async with client.connect(login) as conn:
        done = await conn.send("run_command", cmd="echo done")
        assert (await conn.result(done))["ok"]
        last = conn.last_seq
    await stop()
    db = tmp_path / "deskhive.db"
    with sqlite3.connect(db) as conn_db:
        # The crash fell between the result's commit and the removal of its pending mark.
        conn_db.execute("INSERT INTO pending VALUES (?, ?)", (login.session_id, done))
    crashed(db)
    client = await start()
    login = at(client, login)
    async with client.connect(login, last_seq=0) as conn:
        probe = await conn.send("get_state", id="probe")
        frames = [await conn._next_frame(10)]
        while (frames[-1].get("id"), frames[-1]["type"]) != (probe, "state"):
            frames.append(await conn._next_frame(10))
    results = [f for f in frames if f["type"] == "result" and f["id"] == done]
    assert [r["ok"] for r in results] == [True]
    assert frames[-1]["seq"] > last


def test_the_store_comes_from_store_or_deskhive_store() -> None:
    """`--store` and `DESKHIVE_STORE` name the store; anything but memory or sqlite:// is refused."""
    args = config.parser().parse_args(["serve"])
    assert config.from_args(args, {"DESKHIVE_STORE": "memory"}).store == "memory"
    assert config.from_args(args, {}).store is None, "the default: a SQLite file in the data folder"
    with pytest.raises(SystemExit, match="DESKHIVE_STORE"):
        config.from_args(args, {"DESKHIVE_STORE": "redis://x"})


async def test_shares_come_back_with_their_session_and_revoked_ones_stay_revoked(boot: Any) -> None:
    """After a restart a live share's token opens the session as its guest; a revoked one's does not."""
    start, stop = boot
    client = await start()
    owner = await client.login("ada")
    shares = f"/api/sessions/{owner.session_id}/shares"
    kept = await client.call("POST", shares, token=owner.token, body={"mode": "view"})
    gone = await client.call("POST", shares, token=owner.token, body={"mode": "control"})
    await client.call("DELETE", f"{shares}/{gone['share_id']}", token=owner.token)
    await stop()
    client = await start()
    guest = attrs.evolve(at(client, owner), token=kept["token"])
    async with client.connect(guest) as conn:
        assert conn.welcome["role"] == "view"
        assert conn.welcome["session_id"] == owner.session_id
    listed = await client.call("GET", shares, token=owner.token)
    assert [s["share_id"] for s in listed["shares"]] == [kept["share_id"]]
    with pytest.raises(ClientError) as refused:
        await client.call("POST", "/start-desktop", token=gone["token"])
    assert refused.value.status in (403, 404)


async def test_an_ack_comes_once_the_store_keeps_the_request(boot: Any, tmp_path: Path) -> None:
    """When a job's ack or 202 arrives, the store keeps it as pending: a crash still answers it."""
    start, _ = boot
    client = await start()
    login = await client.login("ada")
    sandbox = FakeSandbox.instances[-1]
    sandbox.hold_commands = True
    db = sqlite3.connect(tmp_path / "deskhive.db")
    try:

        def pending() -> set[str]:
            return {rid for (rid,) in db.execute("SELECT request_id FROM pending")}

        async with client.connect(login) as conn:
            rid = await conn.send("run_command", cmd="sleep 100", id="held")
            await conn.wait_for(lambda e: e["type"] == "ack" and e.get("id") == rid)
            assert rid in pending()
            answer = await client.call("POST", "/run-task", token=login.token, body={"query": "q"})
            assert answer["request_id"] in pending()
            sandbox.released.set()
    finally:
        db.close()


async def acks_and_results(conn: Any, *rids: str) -> list[tuple[str, str]]:
    """The acks and results of *rids*, in the order they arrive, until each has its result."""
    order: list[tuple[str, str]] = []
    async with asyncio.timeout(10):
        while not all(("result", rid) in order for rid in rids):
            frame = await conn.recv()
            if frame["type"] in {"ack", "result"} and frame.get("id") in rids:
                order.append((frame["type"], frame["id"]))
    return order


async def test_a_job_cancelled_as_the_store_keeps_it_gets_its_ack_before_its_result(boot: Any) -> None:
    """A job cancelled (by cancel or kill_desktop) right after it is sent is still acked before its result."""
    start, _ = boot
    client = await start()
    login = await client.login("ada")
    async with client.connect(login) as conn:
        for n in range(10):
            job = await conn.send("run_command", cmd="echo hi", id=f"job-{n}")
            stop = await conn.send("cancel", target=job, id=f"cancel-{n}")
            order = await acks_and_results(conn, job, stop)
            assert order.index(("ack", job)) < order.index(("result", job)), order
            job = await conn.send("run_command", cmd="echo hi", id=f"killed-{n}")
            stop = await conn.send("kill_desktop", id=f"kill-{n}")
            order = await acks_and_results(conn, job, stop)
            assert order.index(("ack", job)) < order.index(("result", job)), order


async def acks_and_results_until_the_end(conn: Any, rid: str) -> list[tuple[str, str]]:
    """The ack and result of *rid*, in the order they arrive, until the session's end closes the socket."""
    order: list[tuple[str, str]] = []
    try:
        async with asyncio.timeout(10):
            while True:
                frame = await conn.recv()
                if frame["type"] in {"ack", "result"} and frame.get("id") == rid:
                    order.append((frame["type"], rid))
    except SessionEnded:
        return order


async def test_a_job_sent_just_before_a_logout_is_acked_before_its_result(boot: Any) -> None:
    """The session's end settles waiting jobs only once they are acked."""
    start, _ = boot
    client = await start()
    for n in range(5):
        login = await client.login(f"leaver{n}")
        async with client.connect(login) as conn:
            job = await conn.send("run_command", cmd="echo hi", id="last-words")
            await client.logout(login)
            order = await acks_and_results_until_the_end(conn, job)
            assert order == [("ack", job), ("result", job)]
