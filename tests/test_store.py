"""The store: sessions, shares and journals kept in memory or in a SQLite file."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest

from protocol.errors import NotConfigured
from store import MemoryStore, SessionRecord, ShareRecord, SqliteStore, Store, lock_data_dir, open_store
from store.sqlite import MIGRATIONS, SCHEMA_VERSION


def record(sid: str = "alice_1_00", token_hash: bytes = b"h" * 32) -> SessionRecord:
    now = time.time()
    return SessionRecord(
        session_id=sid,
        username="alice",
        token_hash=token_hash,
        created=now,
        last_active=now,
        sandbox_kind="null",
        customer_name="Acme",
    )


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    made: Store = MemoryStore(5) if request.param == "memory" else SqliteStore(tmp_path / "d.db", 5)
    await made.open()
    yield made
    await made.aclose()


async def test_session_lives_until_ended_then_leaves_a_tombstone(store: Store) -> None:
    """A created session is listed as live; once ended its token hash tells why, and it is not listed."""
    await store.create_session(record())
    await store.set_sandbox("alice_1_00", "local", "local-abc")
    store.touch("alice_1_00", 123.0)
    await store.flush()
    (live,) = await store.live_sessions()
    assert (live.customer_name, live.sandbox_kind, live.sandbox_id, live.last_active) == (
        "Acme",
        "local",
        "local-abc",
        123.0,
    )
    assert await store.ended_reason(b"h" * 32) is None
    await store.end_session("alice_1_00", "logout", time.time())
    assert await store.live_sessions() == []
    assert await store.ended_reason(b"h" * 32) == "logout"
    assert (await store.load_journal("alice_1_00")).events == ()


async def test_journal_keeps_the_newest_events_within_its_bound(store: Store) -> None:
    """Appended events come back in order, the oldest beyond the bound gone; clearing forgets them."""
    await store.create_session(record())
    for seq in range(1, 9):
        store.append("alice_1_00", seq, f'{{"seq":{seq}}}'.encode())
    await store.flush()
    journal = await store.load_journal("alice_1_00")
    assert [seq for seq, _ in journal.events] == [4, 5, 6, 7, 8]
    assert journal.events[-1][1] == b'{"seq":8}'
    assert journal.last_seq == 8
    store.clear_journal("alice_1_00", 8)
    await store.flush()
    cleared = await store.load_journal("alice_1_00")
    assert (cleared.events, cleared.last_seq) == ((), 8)


async def test_seq_reservation_is_kept(store: Store) -> None:
    """The reserved high-water mark of a session is what a restarted owner numbers above."""
    await store.create_session(record())
    store.reserve_seq("alice_1_00", 1000)
    store.reserve_seq("alice_1_00", 10)  # never lowered
    await store.flush()
    (live,) = await store.live_sessions()
    assert live.seq_reserved == 1000


async def test_pending_requests_are_listed_until_answered(store: Store) -> None:
    """Acknowledged requests stay listed until their result, so that a restart can answer them."""
    await store.create_session(record())
    store.add_pending("alice_1_00", "r1")
    store.add_pending("alice_1_00", "r2")
    store.remove_pending("alice_1_00", "r1")
    await store.flush()
    (live,) = await store.live_sessions()
    assert live.pending == ("r2",)


async def test_shares_are_listed_with_their_session_and_revoked_shares_leave_tombstones(store: Store) -> None:
    """A share belongs to its session until revoked; its token then reads as ended."""
    await store.create_session(record())
    share = ShareRecord(
        share_id="s1",
        session_id="alice_1_00",
        token_hash=b"s" * 32,
        mode="view",
        label="Bob",
        created=time.time(),
    )
    await store.create_share(share)
    (live,) = await store.live_sessions()
    assert live.shares == (share,)
    await store.revoke_share("s1")
    (live,) = await store.live_sessions()
    assert live.shares == ()
    assert await store.ended_reason(b"s" * 32) is not None


async def test_sqlite_store_keeps_everything_across_a_reopen(tmp_path: Path) -> None:
    """What was committed before close is all there when the file is opened again."""
    first = SqliteStore(tmp_path / "d.db", 100)
    await first.open()
    await first.create_session(record())
    for seq in range(1, 51):
        first.append("alice_1_00", seq, b"x%d" % seq)
    await first.aclose()
    again = SqliteStore(tmp_path / "d.db", 100)
    await again.open()
    try:
        assert again.was_clean
        assert [r.session_id for r in await again.live_sessions()] == ["alice_1_00"]
        journal = await again.load_journal("alice_1_00")
        assert [seq for seq, _ in journal.events] == list(range(1, 51))
    finally:
        await again.aclose()


def modes(folder: Path) -> dict[str, int]:
    return {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}


async def test_the_database_and_its_wal_files_are_the_servers_alone(tmp_path: Path) -> None:
    """Under a umask of 022 the store's files are 0600, also ones an older server left readable."""
    path = tmp_path / "d.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    old = os.umask(0o022)
    try:
        store = SqliteStore(path, 100)
        await store.open()
        try:
            await store.create_session(record())
            store.append("alice_1_00", 1, b"output of a command")
            await store.committed()
            assert modes(tmp_path) == {"d.db": 0o600, "d.db-shm": 0o600, "d.db-wal": 0o600}
        finally:
            await store.aclose()
    finally:
        os.umask(old)


async def test_events_reach_the_file_without_anyone_waiting(tmp_path: Path) -> None:
    """Appends are committed by the writer on its own, seen by another connection without a flush."""
    store = SqliteStore(tmp_path / "d.db", 100)
    await store.open()
    try:
        await store.create_session(record())
        store.append("alice_1_00", 1, b"one")
        reader = sqlite3.connect(tmp_path / "d.db")
        try:
            # A commit is an fsync: seconds on a busy disk, and no flush is asked.
            async with asyncio.timeout(15):
                # Another connection's view: there is no event to wait on.
                while not reader.execute("SELECT count(*) FROM events").fetchone()[0]:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
        finally:
            reader.close()
    finally:
        await store.aclose()


async def test_a_store_written_by_schema_version_1_opens_and_is_migrated(tmp_path: Path) -> None:
    """A file of the first schema (before shares) keeps its sessions and gains the shares table."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO sessions (session_id, username, token_hash, created, last_active, sandbox_kind)"
        " VALUES ('bob_1_00', 'bob', x'00', 1.0, 2.0, 'local')"
    )
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        (live,) = await store.live_sessions()
        assert (live.session_id, live.last_active, live.shares) == ("bob_1_00", 2.0, ())
        await store.create_share(
            ShareRecord(
                share_id="s", session_id="bob_1_00", token_hash=b"t", mode="view", label=None, created=3.0
            )
        )
        assert len((await store.live_sessions())[0].shares) == 1
    finally:
        await store.aclose()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    check.close()


async def test_a_store_from_a_newer_server_is_refused(tmp_path: Path) -> None:
    """Opening a file whose schema is newer than this server's fails clearly instead of guessing."""
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        await SqliteStore(path).open()


def test_a_data_folder_the_server_makes_lists_its_names_to_nobody_else(tmp_path: Path) -> None:
    """A new data folder is 0711 (enterable, not listable); the lock file is 0600."""
    old = os.umask(0o022)
    try:
        lock_data_dir(tmp_path / "var").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o711
    assert modes(tmp_path / "var") == {"deskhive.lock": 0o600}


def test_a_second_server_cannot_take_the_same_data_folder(tmp_path: Path) -> None:
    """The lock on the data folder refuses a second holder, naming the folder."""
    held = lock_data_dir(tmp_path)
    try:
        with pytest.raises(NotConfigured, match=str(tmp_path)):
            lock_data_dir(tmp_path)
    finally:
        held.close()
    lock_data_dir(tmp_path).close()  # free again once the first let go


def test_store_urls() -> None:
    """``memory`` and ``sqlite://PATH`` name stores; anything else is a clear error."""
    assert isinstance(open_store("memory", journal_size=10), MemoryStore)
    made = open_store("sqlite:///var/lib/x.db", journal_size=10)
    assert isinstance(made, SqliteStore)
    assert made.path == Path("/var/lib/x.db")
    with pytest.raises(NotConfigured, match="--store"):
        open_store("postgres://db", journal_size=10)


async def test_a_store_left_open_by_a_crash_reads_as_not_clean(tmp_path: Path) -> None:
    """A file its server never closed says so: seqs up to each reservation may have gone out."""
    crashed = SqliteStore(tmp_path / "d.db")
    await crashed.open()
    await crashed.create_session(record())
    crashed.reserve_seq("alice_1_00", 500)
    await crashed.flush()
    # No aclose: the server died. Its thread is abandoned; the next opener reads the file as left.
    again = SqliteStore(tmp_path / "d.db")
    await again.open()
    try:
        assert not again.was_clean
        assert (await again.live_sessions())[0].seq_reserved == 500
    finally:
        await again.aclose()
        await crashed.aclose()


async def test_a_burst_of_events_is_committed_soon_while_the_loop_is_busy(tmp_path: Path) -> None:
    """5,000 events and pending marks reach the disk within a second even when the loop never idles."""
    store = SqliteStore(tmp_path / "busy.db", 10_000)
    await store.open()
    try:
        await store.create_session(record())
        for seq in range(1, 5_001):
            store.append("alice_1_00", seq, b'{"type":"output","seq":%d}' % seq)
            store.add_pending("alice_1_00", f"r{seq}")
        flushed = asyncio.ensure_future(store.flush())
        started = time.perf_counter()
        # A loop busy with other work: it yields only every 50 ms.
        while not flushed.done() and time.perf_counter() - started < 5.0:
            until = time.perf_counter() + 0.05
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)
        assert flushed.done()
        assert time.perf_counter() - started < 1.0
        assert len((await store.load_journal("alice_1_00")).events) == 5_000
    finally:
        await store.aclose()


async def test_text_a_json_string_may_hold_round_trips(store: Store) -> None:
    """Profile fields and request ids with lone surrogates are kept and read back as they were."""
    await store.create_session(attrs.evolve(record(), customer_name="Ac\ud800me"))
    store.add_pending("alice_1_00", "r\udfff")
    await store.flush()
    (live,) = await store.live_sessions()
    assert (live.customer_name, live.pending) == ("Ac\ud800me", ("r\udfff",))
