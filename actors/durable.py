"""A session's durability: what it streams to the store, and how it comes back after a restart.

Every event is streamed to the store as it is journaled, with seqs reserved
ahead (``SEQ_BLOCK``); activity is stored throttled; a request is acknowledged
once the store keeps it as pending. At the next start ``restore`` takes the
journal back, ``recover`` the sandbox, and a durable shutdown ``suspend``s the
session instead of ending it.

:class:`DurableSession` is a part of ``SessionActor`` (``actors.session``), not
an object of its own: an object the actor owned that pointed back at it would
make a cycle, and ended actors are freed by reference counting alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Final

from actors import jobs
from actors.basics import ActorConfig, QueuedJob, SessionInfo
from actors.journal import Journal
from actors.peer import Peer
from actors.shares import Closable
from protocol import codec
from protocol import messages as m
from protocol.closecodes import CloseCode
from sandboxes.base import Resumable, Sandbox
from store.base import SessionRecord, Store, StoredJournal

#: Seqs reserved in the store ahead of use, topped up when half is left: a
#: restarted server numbers above the reservation, which must therefore be
#: committed before any seq it covers is sent (half a block is thousands of
#: events, far more than a batch's few milliseconds let through).
SEQ_BLOCK: Final = 10_000
#: The store hears of a session's activity at most this often (seconds).
TOUCH_EVERY_S: Final = 5.0
RESTARTED: Final = "the server restarted before this request finished"
#: Bound on waiting for the store to keep a job before it starts anyway.
_KEPT_TIMEOUT_S: Final = 5.0


class DurableSession:
    """The session actor's side that faces the store (mixed into ``SessionActor``)."""

    info: SessionInfo
    sandbox: Sandbox
    config: ActorConfig
    store: Store | None
    journal: Journal
    _reserved: int
    _stored_active: float
    _last_active: float
    _lost_desktop: str | None
    _peers: set[Peer]

    if TYPE_CHECKING:
        # Defined by SessionActor.
        @property
        def log(self) -> Any: ...
        def emit(self, event: m.Event) -> None: ...
        def _publish_state(self, request_id: str | None = None) -> None: ...
        @property
        def state(self) -> m.SessionState: ...
        def _refuse_leftovers(self, reason: str, why: str = ...) -> None: ...
        async def _close_peers(
            self, peers: Collection[Closable], reason: str, code: CloseCode = ...
        ) -> None: ...

    def _touch_store(self, now: float | None = None) -> None:
        """Tell the store the session is in use (a client frame, a job's start or end); throttled.

        A running job keeps a session from being idle: after a crash, the
        activity stored is what decides whether it is reaped at once.
        """
        now = time.monotonic() if now is None else now
        if self.store is not None and now - self._stored_active >= TOUCH_EVERY_S:
            self._stored_active = now
            self.store.touch(self.info.session_id, time.time())

    def _keep_event(self, seq: int, frame: bytes) -> None:
        """Stream *frame* to the store, and reserve seqs ahead before half the block is used."""
        assert self.store is not None
        self.store.append(self.info.session_id, seq, frame)
        if seq > self._reserved - SEQ_BLOCK // 2:
            self._reserved = seq + SEQ_BLOCK
            self.store.reserve_seq(self.info.session_id, self._reserved)

    def _ack_when_kept(self, job: QueuedJob, origin: Peer | None) -> None:
        """Acknowledge *job* once the store keeps it as pending.

        An ack promises a result, also across a SIGKILL: the restarted server
        answers every pending request it finds. The job starts no earlier
        either (``_run_jobs``), so its ack still comes before its events.
        """
        store = self.store
        kept = store.committed() if store is not None and store.durable else None
        if kept is None or kept.done():
            if origin is not None:
                origin.deliver(codec.encode(m.Ack(id=job.rid)))
            return
        job.kept = kept
        if origin is not None:
            kept.add_done_callback(functools.partial(_deliver, origin, codec.encode(m.Ack(id=job.rid))))

    async def _store_desktop(self) -> None:
        """Keep the sandbox's id while its desktop runs (before ``start_desktop``'s result)."""
        if self.store is not None:
            running = self.sandbox.desktop_running
            sandbox_id = self.sandbox.sandbox_id if running else None
            await self.store.set_sandbox(self.info.session_id, self.sandbox.kind, sandbox_id)

    def restore(self, record: SessionRecord, stored: StoredJournal, *, clean: bool) -> None:
        """Take back a stored session's journal, activity and unanswered requests.

        After a crash (*clean* false) new events are numbered above the
        reservation, the skipped numbers kept as a hole; requests that were
        acknowledged get their ``cancelled`` result, and a desktop that ran is
        checked by ``recover``. Runs before the first incarnation, without suspending.
        """
        base = stored.last_seq if clean else max(stored.last_seq, record.seq_reserved)
        self.journal.restore(stored.events, base)
        self._reserved = base + SEQ_BLOCK
        assert self.store is not None
        sid = self.info.session_id
        self.store.reserve_seq(sid, self._reserved)
        self.store.sent_seq(sid, base)
        idle = max(0.0, time.time() - record.last_active)
        self._last_active = self._stored_active = time.monotonic() - idle
        answered = _answered(stored, record.pending)
        for rid in record.pending:
            if rid not in answered:
                self.emit(jobs.cancelled(rid, RESTARTED))
            self.store.remove_pending(sid, rid)
        # Whether the desktop survived is known once the sandbox recovered (E2B's may).
        self._lost_desktop = record.sandbox_id
        if self._lost_desktop is None and _last_state(stored) not in (None, self.state):
            # The last server's word was its stopping (or a job that ran):
            # a replay must end on the state the session is in now.
            self._publish_state()

    async def recover(self) -> None:
        """End or take back what the previous server left of the sandbox; report a desktop that died."""
        try:
            if isinstance(self.sandbox, Resumable):
                await self.sandbox.recover()
        finally:
            lost, self._lost_desktop = self._lost_desktop, None
            if lost is not None:
                if not self.sandbox.desktop_running:
                    self.log.warning("desktop.lost", reason="the server restarted", sandbox_id=lost)
                self._publish_state()
        if lost is not None and not self.sandbox.desktop_running and self.store is not None:
            await self.store.set_sandbox(self.info.session_id, self.sandbox.kind, None)

    async def suspend(self, reason: str) -> None:
        """The server stops but the session does not end: keep everything for the next start.

        Jobs were cancelled by the incarnation's end (their results stored);
        what the mailbox still holds is answered, the activity and the last
        seq are stored, and the sockets are told the server is going away.
        """
        self._refuse_leftovers(reason, "the server stopped before this request was handled")
        if self.store is not None:
            sid = self.info.session_id
            last = max(self._last_active, self._stored_active)
            self.store.touch(sid, time.time() - (time.monotonic() - last))
            self.store.sent_seq(sid, self.journal.last_seq)
        peers, self._peers = self._peers, set()
        await self._close_peers(peers, reason, CloseCode.GOING_AWAY)


def _answered(stored: StoredJournal, pending: tuple[str, ...]) -> set[str]:
    """Which of the *pending* requests already have a stored result.

    The result and the pending entry's removal are two writes; a crash can
    fall between their commits, and the request must not get a second result.
    """
    if not pending:
        return set()
    wanted, found = set(pending), set()
    for _, frame in stored.events:
        if b'"result"' in frame:
            event = codec.loads(frame)
            if event.get("type") == "result" and event.get("id") in wanted:
                found.add(event["id"])
    return found


def _last_state(stored: StoredJournal) -> str | None:
    """The ``state`` of the newest stored ``state`` event, if one is kept."""
    for _, frame in reversed(stored.events):
        if b'"state"' in frame:
            event = codec.loads(frame)
            if event.get("type") == "state":
                return str(event.get("state"))
    return None


def _deliver(peer: Peer, frame: bytes, _kept: asyncio.Future[None]) -> None:
    peer.deliver(frame)


async def until_kept(kept: asyncio.Future[None]) -> None:
    """Wait, within a bound, for the store to keep a job; a store that fails must not stall the session."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_KEPT_TIMEOUT_S):
            await asyncio.shield(kept)
