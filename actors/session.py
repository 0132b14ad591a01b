"""The session actor: one per login, with its own mailbox, sandbox and journal.

Its life, as in pykka: :meth:`SessionActor.run` is one incarnation (set up,
handle messages until told to stop, tear down). A crash ends the incarnation,
not the session: the supervisor calls ``run()`` again and the mailbox,
journal, sockets and sandbox carry over. ``Stop`` is a message, so whatever
was told before it is handled first.

Jobs run one at a time, in order, each in a task of the incarnation's
TaskGroup; ``ping``, ``get_state``, ``cancel``, ``clear_logs`` and
``kill_desktop`` are handled by the loop at once, even while a job runs. The
job runner settles every job's one result (:meth:`SessionActor._settle`).

An ended actor is freed by reference counting alone: nothing it owns points
back at it (the journal sink holds a weak reference, finished tasks are
dropped), so ten thousand logouts leave nothing for the cyclic GC.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections import deque
from collections.abc import Collection
from typing import Any, Final

import attrs
import structlog

from actors import jobs
from actors.basics import ActorConfig, ActorStats, QueuedJob, SessionInfo, Stop
from actors.desktop import DesktopWatch
from actors.durable import RESTARTED, SEQ_BLOCK, TOUCH_EVERY_S, DurableSession
from actors.journal import Journal
from actors.peer import Peer
from actors.queue import JobQueue
from actors.sessionlog import journal_logger
from actors.shares import OWNER, Closable, Grant, Shares, check_allowed
from protocol import codec
from protocol import messages as m
from protocol.closecodes import CloseCode
from protocol.errors import (
    Forbidden,
    MailboxFull,
    NotConfigured,
    SessionClosed,
    TooManySockets,
)
from sandboxes.base import Sandbox
from store.base import ShareRecord, Store

__all__ = [
    "RESTARTED",
    "SEQ_BLOCK",
    "SOCKETS_PER_SESSION",
    "TOUCH_EVERY_S",
    "ActorConfig",
    "ActorStats",
    "SessionActor",
    "SessionInfo",
    "Stop",
]

logger = structlog.get_logger("deskhive.actor")

#: Sockets watching one session at once (owner's and guests' together).
SOCKETS_PER_SESSION: Final = 16
#: What a job cut off by a stop is told, by the stop's reason.
_ENDING: Final = {"shutdown": "the server is shutting down; the job was cancelled"}
#: Requests that settle waiting jobs at once: they wait for the store to keep
#: those jobs first, so no job's result overtakes its ack (``_acks_first``).
_SETTLES_WAITING_JOBS: Final = (m.Cancel, m.KillDesktop)


@functools.lru_cache(maxsize=64)
def _stop_envelope(reason: str) -> tuple[Stop, None]:
    # One per reason: a sweep may stop ten thousand sessions at once.
    return Stop(reason), None


_Envelope = tuple[m.Request | Stop, Peer | None]


class SessionActor(JobQueue, DesktopWatch, DurableSession):
    """A session's mailbox, journal, sockets, sandbox and job queue."""

    def __init__(
        self, info: SessionInfo, sandbox: Sandbox, config: ActorConfig, store: Store | None = None
    ) -> None:
        self.info = info
        self.sandbox = sandbox
        self.config = config
        self.journal = Journal(config.journal_size, config.journal_bytes)
        #: Where events, activity and pending requests are kept across restarts.
        self.store = store
        self._reserved = SEQ_BLOCK
        self._stored_active = time.monotonic()
        #: A restored session's stored sandbox id, while its desktop may come back (``recover``).
        self._lost_desktop: str | None = None
        self._log: Any = None
        self.started = asyncio.Event()
        self.stop_requested_at: float | None = None
        self.stop_reason: str | None = None
        self._mailbox: asyncio.Queue[_Envelope] = asyncio.Queue()
        self._peers: set[Peer] = set()
        #: The credential each attached socket came with (kept until it detaches).
        self._grants: dict[Peer, Grant] = {}
        self.shares = Shares()
        #: Numbers each desktop this session has seen start: stream tokens name one.
        self._desktop_run = 0
        self._desktop_seen = False
        self._pending: deque[QueuedJob] = deque()
        self._current: QueuedJob | None = None
        self._runner: asyncio.Task[None] | None = None
        #: Awaits the running desktop's end (backends that can tell at once).
        self._watcher: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        #: A workflow's desktop step is starting the desktop.
        self._starting = False
        self._ended: str | None = None  # "closed" or "failed" once the session ended
        self._published: tuple[str, str | None, str | None, str | None] | None = None
        self._next_rid = 0
        #: Made on first use: ids the server gives (``<prefix>-1``, ...) then
        #: cannot be ones a client chose for requests still waiting.
        self._rid_prefix: str | None = None
        self._last_active = time.monotonic()
        self.frames_in = 0
        self.jobs_run = 0

    @property
    def log(self) -> Any:
        """Logger whose events land in this session's journal and sockets."""
        # Made on first use: most idle sessions never log, and logins are hot.
        if self._log is None:
            self._log = journal_logger(self)
        return self._log

    # ------------------------------------------------------------------
    # Called from other tasks (the server's handlers, the supervisor)

    def tell(self, msg: m.Request, origin: Peer | None = None, grant: Grant = OWNER) -> str | None:
        """Put *msg* in the mailbox; return its request id.

        Raises ``SessionClosed`` once the session ended, ``Forbidden`` for a
        request *grant* may not make, and ``MailboxFull`` at the mailbox's bound.
        """
        if self._ended is not None or self.stop_requested_at is not None:
            # After the Stop nothing would be handled: say so rather than drop it.
            raise SessionClosed(f"session {self.info.session_id} is closed", request_id=msg.id)
        if grant.share_id is not None:
            role = self.shares.role(grant)
            if role is None:
                raise Forbidden("this share was revoked", request_id=msg.id)
            check_allowed(role, msg)
        if self.mailbox_depth >= self.config.mailbox_size:
            raise MailboxFull(
                f"session {self.info.session_id} has {self.config.mailbox_size} requests waiting",
                request_id=msg.id,
            )
        if msg.id is None and not isinstance(msg, m.Ping):
            if self._rid_prefix is None:
                self._rid_prefix = f"r{secrets.token_hex(4)}"
            self._next_rid += 1
            msg = attrs.evolve(msg, id=f"{self._rid_prefix}-{self._next_rid}")
        self._active()
        self.frames_in += 1
        self._mailbox.put_nowait((msg, origin))
        return msg.id

    @property
    def mailbox_depth(self) -> int:
        """Requests received and not yet answered: the mailbox and the waiting jobs."""
        return self._mailbox.qsize() + len(self._pending)

    def refuse_requests(self, reason: str) -> None:
        """Refuse every later request at once: the session is ending without a ``Stop``."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
            self.stop_reason = reason

    def touch(self) -> None:
        """Count as activity: someone is working on the session outside its mailbox."""
        self._active()

    def _active(self) -> None:
        now = self._last_active = time.monotonic()
        self._touch_store(now)

    def request_stop(self, reason: str, now: float | None = None) -> None:
        """Ask the actor to end the session once earlier messages are handled.

        The bound does not apply: a full mailbox must still take its ``Stop``.
        """
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic() if now is None else now
            self.stop_reason = reason
            self._mailbox.put_nowait(_stop_envelope(reason))

    def attach(self, peer: Peer, last_seq: int | None, grant: Grant = OWNER) -> None:
        """Bind *peer*: welcome, gap, replay after *last_seq*, then live events.

        Runs without suspending, so no event can slip between the replay and
        the live stream; a long replay goes on as the socket drains (the peer
        reads the journal), and live events wait their turn there. A guest's
        socket (*grant* of a share) is announced by ``share.joined``.
        """
        if self._ended is not None:
            raise SessionClosed(f"session {self.info.session_id} is closed")
        if self.shares.role(grant) is None:
            raise Forbidden("this share was revoked")
        if len(self._peers) >= SOCKETS_PER_SESSION:
            raise TooManySockets(
                f"session {self.info.session_id} already has {SOCKETS_PER_SESSION} sockets, "
                f"the limit per session (sockets_per_session = {SOCKETS_PER_SESSION})"
            )
        self._active()
        if last_seq is not None and last_seq > self.journal.last_seq:
            # The client holds events this session never numbered (it knew
            # another server, or a store lost its tail): a fresh start, not a
            # resume, or it would drop the events numbered below what it holds.
            last_seq = None
        peer.deliver(
            codec.encode(
                m.Welcome(
                    session_id=self.info.session_id,
                    username=self.info.username,
                    state=self.state,
                    stream_url=self.sandbox.stream_url,
                    seq=self.journal.last_seq,
                    resumed=last_seq is not None,
                    role=grant.role,
                    idle_timeout=self.config.idle_timeout,
                    idle_seconds=self._idle_now(),
                )
            )
        )
        peer.follow(self.journal, last_seq or 0)
        self._peers.add(peer)
        self._grants[peer] = grant
        if grant.share_id is not None:
            self.shares.join(grant, peer, "socket")
            self.log.info("share.joined", share_id=grant.share_id, mode=grant.role)

    def detach(self, peer: Peer) -> None:
        self._peers.discard(peer)
        grant = self._grants.pop(peer, OWNER)
        self.shares.leave(grant, peer)

    # ------------------------------------------------------------------
    # Shares and desktop streams

    def check_shareable(self, mode: str) -> None:
        """Raise unless a new share of *mode* may be made: the per-session bound, the stream's reach."""
        if mode == "view" and self.sandbox.kind == "e2b":
            # E2B's stream URL, which every watcher sees, carries its password and
            # takes input (view_only is only a flag in it): nothing here could drop it.
            raise NotConfigured("a view share needs a desktop this server streams; E2B's stream takes input")
        self.shares.check_room(self.info.session_id)

    def add_share(self, share: ShareRecord, *, announce: bool = True) -> None:
        """Let *share*'s token in; *announce* it with ``share.created`` (not when restored)."""
        self.shares.add(share)
        if announce:
            self.log.info("share.created", share_id=share.share_id, mode=share.mode)

    async def revoke_share(self, share_id: str) -> ShareRecord | None:
        """Void the share and close its sockets and desktop streams at once (4403)."""
        share, members = self.shares.revoke(share_id)
        if share is None:
            return None
        # Off the broadcast first: a revoked guest sees nothing more while it closes.
        self._peers.difference_update(p for p in self._grants if self._grants[p].share_id == share_id)
        self.log.info("share.revoked", share_id=share_id, mode=share.mode)
        await self._close_peers(members, "the share was revoked", CloseCode.FORBIDDEN)
        return share

    def join_stream(self, stream: Closable, grant: Grant) -> None:
        """A desktop stream opened with *grant*: a revocation of its share closes it."""
        if self.shares.role(grant) is None:
            raise Forbidden("this share was revoked")
        self.shares.join(grant, stream, "stream")

    def leave_stream(self, stream: Closable, grant: Grant) -> None:
        self.shares.leave(grant, stream)

    @property
    def state(self) -> m.SessionState:
        if self._ended is not None:
            return "failed" if self._ended == "failed" else "closed"
        if self.stop_requested_at is not None:
            return "stopping"
        running = self.sandbox.desktop_running
        job = self._current.msg if self._current is not None else None
        # Starting and killing the desktop show as such from the job's first
        # moment to its last, with no "busy" in between.
        if isinstance(job, m.StartDesktop):
            return "ready" if running else "starting"
        if isinstance(job, m.KillDesktop):
            return "stopping" if running else "idle"
        if self._starting:
            return "starting"
        if job is not None:
            return "busy"
        return "ready" if running else "idle"

    def idle_seconds(self, now: float) -> float:
        """Seconds since the last client frame; 0 while a job runs."""
        if self._current is not None or self._pending:
            return 0.0
        return now - self._last_active

    def _idle_now(self) -> float:
        return round(self.idle_seconds(time.monotonic()), 1)

    def statistics(self, now: float) -> ActorStats:
        return ActorStats(
            session_id=self.info.session_id,
            username=self.info.username,
            state=self.state,
            mailbox_depth=self.mailbox_depth,
            jobs_waiting=len(self._pending),
            journal_size=len(self.journal),
            sockets=len(self._peers),
            idle_seconds=round(self.idle_seconds(now), 3),
            running_job=self._current.rid if self._current else None,
            sandbox_kind=self.sandbox.kind,
            sandbox_id=self.sandbox.sandbox_id,
            shares=self.shares.stats() if self.shares else (),
        )

    # ------------------------------------------------------------------
    # Events

    def emit(self, event: m.Event) -> None:
        """Journal *event* and send it to every socket of this session."""
        frame = self.journal.append(event)
        seq = self.journal.last_seq
        if self.store is not None:
            self._keep_event(seq, frame)
        for peer in tuple(self._peers):
            if not peer.notify(seq, frame):
                self._peers.discard(peer)

    def _publish_state(self, request_id: str | None = None) -> None:
        self._observe_desktop()
        job = self._current
        current, running_id = (jobs.describe(job.msg), job.rid) if job else (None, None)
        # An ended session has no stream, whatever its (closed) sandbox says.
        stream_url = None if self._ended is not None else self.sandbox.stream_url
        snapshot = (self.state, stream_url, current, running_id)
        if snapshot != self._published or request_id is not None:
            self._published = snapshot
            self.emit(
                m.State(
                    state=snapshot[0],
                    stream_url=stream_url,
                    current_command=current,
                    running_id=running_id,
                    id=request_id,
                    idle_timeout=self.config.idle_timeout,
                    idle_seconds=self._idle_now(),
                )
            )

    # ------------------------------------------------------------------
    # One incarnation

    async def run(self) -> None:
        """Handle messages until a ``Stop``; a crash propagates to the supervisor."""
        structlog.contextvars.bind_contextvars(session_id=self.info.session_id)
        self._current, self._pending, self._starting = None, deque(), False
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self.started.set()
                if self._desktop_seen:
                    # A desktop that outlived the last incarnation is watched
                    # again; one that died in between is reported now.
                    self._observe_desktop()
                    self._watch_desktop()
                try:
                    await self._loop()
                finally:
                    self._unwatch()
                    self._cancel_all(_ENDING.get(self.stop_reason or "", "the session is ending"))
        finally:
            # Finished tasks hold tracebacks whose frames hold this actor.
            self._tg, self._runner, self._watcher = None, None, None

    async def _loop(self) -> None:
        mailbox = self._mailbox
        while True:
            msg, origin = await mailbox.get()
            # Handle whatever else is already waiting before sleeping again:
            # one wake-up per burst instead of one per message.
            while True:
                if isinstance(msg, Stop):
                    logger.debug("actor.stopping", reason=msg.reason)
                    await self._acks_first()
                    return
                if isinstance(msg, _SETTLES_WAITING_JOBS):
                    await self._acks_first()
                self._handle(msg, origin)
                try:
                    msg, origin = mailbox.get_nowait()
                except asyncio.QueueEmpty:
                    break

    def _handle(self, msg: m.Request, origin: Peer | None) -> None:
        if isinstance(msg, m.Ping):
            if origin is not None:
                origin.deliver(codec.encode(m.Pong(id=msg.id)))
            return
        rid = msg.id
        assert rid is not None  # tell() gave every request but ping an id
        if isinstance(msg, m.Cancel):
            self._cancel(rid, msg.target, origin)
            return
        if origin is not None and isinstance(msg, m.GetState | m.ClearLogs):
            origin.deliver(codec.encode(m.Ack(id=rid)))
        match msg:
            case m.GetState():
                self._publish_state(request_id=rid)
            case m.ClearLogs():
                self.journal.clear()
                if self.store is not None:
                    self.store.clear_journal(self.info.session_id, self.journal.last_seq)
                self.emit(m.Result(id=rid, ok=True, data={}))
            case m.KillDesktop():
                self._cancel_all(f"cancelled by kill_desktop {rid}")
                self._ack_when_kept(self._enqueue(QueuedJob(msg=msg, rid=rid), first=True), origin)
            case _:
                self._ack_when_kept(self._enqueue(QueuedJob(msg=msg, rid=rid)), origin)

    # ------------------------------------------------------------------
    # The session's end (called by the supervisor, once)

    async def end(self, state: str, reason: str) -> None:
        """Mark the session ended, tell its sockets, and close them."""
        self._ended = state
        self._refuse_leftovers(reason)
        try:
            self.log.info("session.ended", reason=reason)
            self._publish_state()
        except Exception:
            # The sockets must still hear of the end.
            logger.exception("actor.end_failed", session_id=self.info.session_id)
        peers, self._peers = self._peers, set()
        # Ending the session voids its shares (the supervisor forgot their tokens).
        self.shares.clear()
        await self._close_peers(peers, f"session ended: {reason}")

    def _refuse_leftovers(
        self, reason: str, why: str = "the session ended before this request was handled"
    ) -> None:
        """Answer what the mailbox still holds: no incarnation will handle it now."""
        message = f"{why}: {reason}"
        while True:
            try:
                msg, origin = self._mailbox.get_nowait()
            except asyncio.QueueEmpty:
                return
            if isinstance(msg, Stop | m.Ping) or msg.id is None:
                continue
            if origin is None:
                # Told its id over HTTP (202): its result is owed.
                self.emit(jobs.cancelled(msg.id, message))
            else:
                origin.deliver(codec.encode(codec.error_for(SessionClosed(message, request_id=msg.id))))

    async def _close_peers(
        self, peers: Collection[Closable], reason: str, code: CloseCode = CloseCode.NOT_FOUND
    ) -> None:
        """Close every socket together under one deadline, not one deadline each."""
        if not peers:
            return
        try:
            async with asyncio.timeout(self.config.close_timeout), asyncio.TaskGroup() as tg:
                for peer in peers:
                    tg.create_task(_close_peer(peer, reason, code), name=f"close:{self.info.session_id}")
        except TimeoutError:
            logger.warning("actor.close_timeout", session_id=self.info.session_id, sockets=len(peers))


async def _close_peer(peer: Closable, reason: str, code: CloseCode) -> None:
    try:
        await peer.close(code, reason)
    except Exception:
        # A socket that broke while closing is closed enough; the others go on.
        logger.warning("actor.close_failed", peer=repr(peer), exc_info=True)
