"""The durable store: one SQLite file in WAL mode, written by one thread of its own.

Every call becomes an operation on a queue; the writer thread takes all
that is waiting, runs it in one transaction and commits (group commit), so
a burst of events costs one commit, and an event is on disk a few
milliseconds after it was emitted, well within the 100 ms the spec allows
to lose on SIGKILL. Awaited calls get their answer once their transaction
committed; streaming calls (``append``, ``touch``, ``clear_journal``) are
not waited for. Nothing here runs SQLite on the event loop.

The schema is versioned with ``PRAGMA user_version`` and migrated at open,
one step at a time (:data:`MIGRATIONS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from store.base import TOMBSTONE_SECONDS, SessionRecord, ShareRecord, StoredJournal
from store.batch import Writes

logger = structlog.get_logger("deskhive.store")

T = TypeVar("T")

#: One entry per schema version: the statements that bring version N-1 to N.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY,
            username TEXT NOT NULL,
            token_hash BLOB NOT NULL UNIQUE,
            created REAL NOT NULL,
            last_active REAL NOT NULL,
            aws_login TEXT,
            customer_name TEXT,
            sandbox_kind TEXT NOT NULL,
            sandbox_id TEXT,
            seq_reserved INTEGER NOT NULL DEFAULT 0,
            last_seq INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE events (
            session_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            frame BLOB NOT NULL,
            PRIMARY KEY (session_id, seq)
        ) WITHOUT ROWID""",
        """CREATE TABLE tombstones (
            token_hash BLOB PRIMARY KEY,
            reason TEXT NOT NULL,
            ended REAL NOT NULL
        ) WITHOUT ROWID""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    (
        """CREATE TABLE shares (
            share_id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            token_hash BLOB NOT NULL UNIQUE,
            mode TEXT NOT NULL,
            label TEXT,
            created REAL NOT NULL
        )""",
        "CREATE INDEX shares_by_session ON shares (session_id)",
        """CREATE TABLE pending (
            session_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            PRIMARY KEY (session_id, request_id)
        ) WITHOUT ROWID""",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
#: Bound on waiting for the writer thread to finish at close.
_CLOSE_TIMEOUT_S: Final = 30.0
#: Operations taken into one transaction at most.
_BATCH: Final = 5_000
#: Sessions whose events since their last trim are counted, at most (then counting restarts).
_TRIM_MEMORY: Final = 100_000

_Op = tuple[Any, ...]
_STOP: Final = ("stop",)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; return the version found."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise RuntimeError(f"store schema version {found} is newer than this server's {SCHEMA_VERSION}")
    for version in range(found, SCHEMA_VERSION):
        with conn:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
    return found


class SqliteStore:
    """Sessions, shares and journals in one SQLite file."""

    durable = True

    def __init__(self, path: Path, journal_size: int = 1000) -> None:
        self.path = path
        self._journal_size = journal_size
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        #: Events stored per session since its last trim (the writer thread's own).
        self._since_trim: dict[str, int] = {}
        #: Whether the last server using the file closed it (False after a crash).
        self.was_clean = True

    # -- life --------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        ready: asyncio.Future[int] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="deskhive-store", daemon=True)
        self._thread.start()
        found = await ready
        if found != SCHEMA_VERSION:
            logger.info("store.migrated", path=str(self.path), **{"from": found, "to": SCHEMA_VERSION})
        cutoff = time.time() - TOMBSTONE_SECONDS

        def start(c: sqlite3.Connection) -> bool:
            c.execute("DELETE FROM tombstones WHERE ended < ?", (cutoff,))
            row = c.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone()
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', '0')")
            return row is None or row[0] == "1"

        self.was_clean = await self._call(start)

    async def aclose(self) -> None:
        if self._thread is None or self._done is None:
            return
        self._queue.put(("clean",))
        self._queue.put(_STOP)
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await asyncio.shield(self._done)
        except TimeoutError:
            logger.error("store.close_timeout", path=str(self.path))  # noqa: TRY400 - no traceback to add
        self._thread = None

    async def flush(self) -> None:
        await self._call(lambda _c: None)

    def committed(self) -> asyncio.Future[None]:
        return self._submit(lambda _c: None)

    # -- sessions ----------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        row = (
            record.session_id,
            record.username,
            record.token_hash,
            record.created,
            record.last_active,
            _enc(record.aws_login),
            _enc(record.customer_name),
            record.sandbox_kind,
            record.sandbox_id,
            record.seq_reserved,
        )
        await self._call(
            lambda c: c.execute(
                "INSERT INTO sessions (session_id, username, token_hash, created, last_active, aws_login,"
                " customer_name, sandbox_kind, sandbox_id, seq_reserved) VALUES (?,?,?,?,?,?,?,?,?,?)",
                row,
            )
        )

    async def live_sessions(self) -> Sequence[SessionRecord]:
        return await self._call(_read_sessions)

    def touch(self, session_id: str, last_active: float) -> None:
        self._queue.put(("touch", session_id, last_active))

    async def set_sandbox(self, session_id: str, kind: str, sandbox_id: str | None) -> None:
        await self._call(
            lambda c: c.execute(
                "UPDATE sessions SET sandbox_kind = ?, sandbox_id = ? WHERE session_id = ?",
                (kind, sandbox_id, session_id),
            )
        )

    def reserve_seq(self, session_id: str, upto: int) -> None:
        self._queue.put(("reserve", session_id, upto))

    def sent_seq(self, session_id: str, seq: int) -> None:
        self._queue.put(("sent", session_id, seq))

    def add_pending(self, session_id: str, request_id: str) -> None:
        self._queue.put(("pending+", session_id, _enc(request_id)))

    def remove_pending(self, session_id: str, request_id: str) -> None:
        self._queue.put(("pending-", session_id, _enc(request_id)))

    async def end_session(self, session_id: str, reason: str, at: float) -> None:
        def end(c: sqlite3.Connection) -> None:
            hashes = c.execute(
                "SELECT token_hash FROM sessions WHERE session_id = ?"
                " UNION ALL SELECT token_hash FROM shares WHERE session_id = ?",
                (session_id, session_id),
            ).fetchall()
            c.executemany(
                "INSERT OR REPLACE INTO tombstones (token_hash, reason, ended) VALUES (?, ?, ?)",
                [(h, reason, at) for (h,) in hashes],
            )
            for table in ("events", "shares", "pending", "sessions"):
                c.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))

        await self._call(end)

    async def ended_reason(self, token_hash: bytes) -> str | None:
        def read(c: sqlite3.Connection) -> str | None:
            row = c.execute("SELECT reason FROM tombstones WHERE token_hash = ?", (token_hash,)).fetchone()
            return None if row is None else str(row[0])

        return await self._call(read)

    async def recent_tombstones(self, limit: int) -> Sequence[tuple[bytes, str]]:
        def read(c: sqlite3.Connection) -> list[tuple[bytes, str]]:
            rows = c.execute(
                "SELECT token_hash, reason FROM tombstones ORDER BY ended DESC LIMIT ?", (limit,)
            )
            return [(bytes(h), str(r)) for h, r in rows]

        return await self._call(read)

    # -- shares ------------------------------------------------------------

    async def create_share(self, share: ShareRecord) -> None:
        row = (share.share_id, share.session_id, share.token_hash, share.mode, share.label, share.created)
        await self._call(
            lambda c: c.execute(
                "INSERT INTO shares (share_id, session_id, token_hash, mode, label, created)"
                " VALUES (?,?,?,?,?,?)",
                row,
            )
        )

    async def revoke_share(self, share_id: str) -> None:
        def revoke(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT OR REPLACE INTO tombstones (token_hash, reason, ended)"
                " SELECT token_hash, 'the share was revoked', ? FROM shares WHERE share_id = ?",
                (time.time(), share_id),
            )
            c.execute("DELETE FROM shares WHERE share_id = ?", (share_id,))

        await self._call(revoke)

    # -- journals ----------------------------------------------------------

    def append(self, session_id: str, seq: int, frame: bytes) -> None:
        self._queue.put(("append", session_id, seq, frame))

    def clear_journal(self, session_id: str, upto_seq: int) -> None:
        self._queue.put(("clear", session_id, upto_seq))

    async def load_journal(self, session_id: str) -> StoredJournal:
        def read(c: sqlite3.Connection) -> StoredJournal:
            rows = c.execute(
                "SELECT seq, frame FROM events WHERE session_id = ? ORDER BY seq DESC LIMIT ?",
                (session_id, self._journal_size),
            ).fetchall()
            rows.reverse()
            last = c.execute("SELECT last_seq FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
            return StoredJournal(
                events=tuple((int(s), bytes(f)) for s, f in rows), last_seq=int(last[0]) if last else 0
            )

        return await self._call(read)

    # -- the writer thread ---------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run *fn* in the writer thread's next transaction; its result once committed."""
        return await self._submit(fn)

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._loop is None or self._thread is None:
            raise RuntimeError(f"store {self.path} is not open")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(("call", fn, future))
        return future

    def _run(self, ready: asyncio.Future[int]) -> None:
        try:
            conn = _connect(self.path)
            found = migrate(conn)
        except BaseException as exc:  # noqa: BLE001 - handed to the opener, which raises it
            self._settle(ready, None, exc)
            self._settle(self._done, None, None)
            return
        self._settle(ready, found, None)
        try:
            while self._step(conn):
                pass
        finally:
            conn.close()
            self._settle(self._done, None, None)

    def _step(self, conn: sqlite3.Connection) -> bool:
        """One transaction of everything waiting; ``False`` once told to stop."""
        batch = [self._queue.get()]
        with contextlib.suppress(queue.Empty):
            while len(batch) < _BATCH:
                batch.append(self._queue.get_nowait())
        settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        writes = Writes()
        stop = False
        try:
            conn.execute("BEGIN")
            for op in batch:
                if writes.add(op):
                    continue
                # Calls, clears and the clean mark see everything submitted before them.
                self._count(writes.flush(conn), conn)
                kind = op[0]
                if kind == "call":
                    settled.append(_apply(conn, op[1], op[2]))
                elif kind == "clear":
                    conn.execute("DELETE FROM events WHERE session_id = ? AND seq <= ?", (op[1], op[2]))
                elif kind == "clean":
                    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', '1')")
                elif kind == "stop":
                    stop = True
            self._count(writes.flush(conn), conn)
            conn.execute("COMMIT")
        except Exception as exc:
            # Whatever it was, the writer goes on with the next batch: a thread
            # that died would leave every later write waiting for nobody.
            logger.exception("store.commit_failed", path=str(self.path), operations=len(batch))
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            settled = [(f, None, exc) for f, _, _ in settled]
        for future, result, error in settled:
            self._settle(future, result, error)
        return not stop

    def _count(self, appended: dict[str, int], conn: sqlite3.Connection) -> None:
        """Trim a session's stored events once a tenth of its bound came since the last trim.

        By count, not by seq arithmetic: numbers skipped at a restart are no
        events. Between trims a few more than the bound are kept;
        ``load_journal`` reads the newest within it.
        """
        if len(self._since_trim) > _TRIM_MEMORY:
            self._since_trim.clear()
        every = max(1, self._journal_size // 10)
        for sid, count in appended.items():
            total = self._since_trim.get(sid, 0) + count
            if total < every:
                self._since_trim[sid] = total
                continue
            self._since_trim.pop(sid, None)
            conn.execute(
                "DELETE FROM events WHERE session_id = ? AND seq <= (SELECT seq FROM events"
                " WHERE session_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (sid, sid, self._journal_size),
            )

    def _settle(self, future: asyncio.Future[Any] | None, result: Any, error: BaseException | None) -> None:
        if future is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(_resolve, future, result, error)


def _apply(
    conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]
) -> tuple[asyncio.Future[Any], Any, BaseException | None]:
    try:
        return future, fn(conn), None
    except Exception as exc:  # noqa: BLE001 - raised again in the caller that awaits it
        return future, None, exc


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _enc(text: str | None) -> str | bytes | None:
    """*text* as SQLite takes it: a lone surrogate (valid in a JSON string) goes as bytes."""
    if text is None:
        return None
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")
    return text


def _dec(value: str | bytes | None) -> str | None:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    _owner_only(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    # WAL with synchronous=NORMAL survives a crash of the process (SIGKILL);
    # only a power loss may take the last commits.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def _owner_only(path: Path) -> None:
    """Make the database (and its WAL files, made with its mode) readable by this account alone.

    It holds every session's journal (command output included), usernames and
    share records: no other host account may read it, whatever the umask.
    """
    for name, create in (
        (path, os.O_CREAT),
        (path.with_name(f"{path.name}-wal"), 0),
        (path.with_name(f"{path.name}-shm"), 0),
    ):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | create, 0o600)
        except FileNotFoundError:
            continue
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def _read_sessions(c: sqlite3.Connection) -> list[SessionRecord]:
    shares: dict[str, list[ShareRecord]] = {}
    for share_id, sid, token_hash, mode, label, created in c.execute(
        "SELECT share_id, session_id, token_hash, mode, label, created FROM shares ORDER BY created"
    ):
        share = ShareRecord(
            share_id=share_id,
            session_id=sid,
            token_hash=bytes(token_hash),
            mode=mode,
            label=label,
            created=created,
        )
        shares.setdefault(sid, []).append(share)
    pending: dict[str, list[str]] = {}
    for sid, rid in c.execute("SELECT session_id, request_id FROM pending"):
        pending.setdefault(sid, []).append(_dec(rid) or "")
    records = []
    for row in c.execute(
        "SELECT session_id, username, token_hash, created, last_active, aws_login, customer_name,"
        " sandbox_kind, sandbox_id, seq_reserved FROM sessions ORDER BY created"
    ):
        sid = row[0]
        records.append(
            SessionRecord(
                session_id=sid,
                username=row[1],
                token_hash=bytes(row[2]),
                created=row[3],
                last_active=row[4],
                aws_login=_dec(row[5]),
                customer_name=_dec(row[6]),
                sandbox_kind=row[7],
                sandbox_id=row[8],
                seq_reserved=row[9],
                shares=tuple(shares.get(sid, ())),
                pending=tuple(pending.get(sid, ())),
            )
        )
    return records
