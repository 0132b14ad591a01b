"""The supervisor: spawns one actor per session, finds, reaps and restarts them.

It owns the only TaskGroup that session tasks live in (OTP's
``simple_one_for_one``): every session runs in ``_supervise``, which catches
a crash per child (a bare TaskGroup would cancel every sibling), restarts the
actor with its session, token and journal while the restart intensity allows
(3 in 60 s), and, once the session ends for good, closes its sandbox and its
sockets.

Stopping is two-phase, as in OTP and aiojobs: a ``Stop`` message first, so
the actor finishes what it was told before; an incarnation still running
after the grace period is cancelled. The cleanup that follows (sandbox,
sockets, summary line) is never cancelled that way: the supervisor runs it
after the incarnation is over, under its own bound, and no error in it
reaches the TaskGroup, so one session's fault ends that session alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any, Final

import attrs
import structlog

import auth
from actors.session import SEQ_BLOCK, SessionActor, SessionInfo
from actors.shares import OWNER, Grant
from limits import Limits
from metrics import Metrics
from protocol.errors import (
    Forbidden,
    GatewayError,
    SessionClosed,
    SessionNotFound,
    Unauthorized,
)
from sandboxes.base import Sandbox, SandboxFactory, SandboxSpec
from store import SessionRecord, Store, open_store
from supervisor_child import Child, Supervising
from supervisor_config import SupervisorConfig, Totals
from supervisor_counts import Census, add_limits
from supervisor_end import Ending
from supervisor_keepalive import KeptAlive, keep_alive
from supervisor_restore import TOMBSTONES, Restoring
from supervisor_shares import ShareStore, ShareTokens, Sharing

__all__ = ["KeptAlive", "Login", "ShareStore", "Supervisor", "SupervisorConfig", "Totals"]

logger = structlog.get_logger("deskhive.supervisor")

_SPAWN_TIMEOUT_S: Final = 5.0
#: Bound on start-up: opening the store and restoring its sessions.
_START_TIMEOUT_S: Final = 120.0


@attrs.frozen(kw_only=True)
class Login:
    """What a new session's owner is told, once."""

    actor: SessionActor
    token: str


class Supervisor(Restoring, Ending, Sharing, Supervising):
    """Spawns, finds, reaps, restarts and stops session actors."""

    def __init__(
        self,
        config: SupervisorConfig,
        sandbox_factory: SandboxFactory,
        *,
        stream_url: Any = None,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
        store: Store | None = None,
    ) -> None:
        self.totals = Totals()
        #: Sessions, shares and journals across restarts (shares are kept by their endpoints).
        self.store = store or open_store(config.store_url, journal_size=config.actor.journal_size)
        #: The records restored at start-up, by session id (their shares, for the share endpoints).
        self.restored: dict[str, SessionRecord] = {}
        #: A durable shutdown is under way: sessions stopped by it are kept, not ended.
        self._suspending = False
        self._start_error: BaseException | None = None
        self._sandbox_factory = sandbox_factory
        #: ``session_id -> stream URL`` for backends streamed by this server.
        self._stream_url = stream_url
        self._actors: dict[str, SessionActor] = {}
        self._children: dict[str, Child] = {}
        self._by_token: dict[bytes, SessionActor] = {}
        self._share_tokens = ShareTokens(TOMBSTONES)
        self._by_user: dict[str, set[str]] = {}
        self._ended: OrderedDict[bytes, str] = OrderedDict()
        self._tg: asyncio.TaskGroup | None = None
        self._running = asyncio.Event()
        self._stop = asyncio.Event()
        self._accepting = True
        self._sessions_dir = config.data_dir / "sessions"
        self.started_at = time.monotonic()
        self.limits = limits if limits is not None else Limits()
        self.metrics = metrics if metrics is not None else Metrics()
        self._census = Census(self._actors, self._by_user)
        self.desktops = add_limits(self.limits, config, self._census)
        # Every job of every session checks the same desktop limits and
        # reports to the same metrics.
        jobs = attrs.evolve(config.actor.jobs, desktops=self.desktops, metrics=self.metrics)
        self.config = attrs.evolve(config, actor=attrs.evolve(config.actor, jobs=jobs))

    # ------------------------------------------------------------------
    # Life of the supervisor

    async def run(self) -> None:
        """Own every session task; sweep for idle ones until ``aclose``.

        At start the store is opened and its sessions restored; at the end it
        is flushed and closed, after every session's own last write.
        """
        try:
            await self.store.open()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self._restore()
                await self._sweep_orphans()
                self._running.set()
                if self._actors:
                    # Sessions idle past the timeout while the server was down go now.
                    self.sweep()
                while not self._stop.is_set():
                    try:
                        async with asyncio.timeout(self.config.sweep_interval):
                            await self._stop.wait()
                    except TimeoutError:
                        await self._keep_alive()
                        self.sweep()
                await self._stop_all()
        except BaseException as exc:
            self._start_error = exc
            raise
        finally:
            self._tg = None
            self._running.set()  # a failed start wakes wait_running, which raises
            await self.store.aclose()

    @property
    def running(self) -> bool:
        """Whether sessions are served: ``run()``'s TaskGroup is alive and not stopping."""
        return self._tg is not None and not self._stop.is_set()

    async def wait_running(self) -> None:
        """Return once sessions are served (the store open, its sessions back)."""
        async with asyncio.timeout(_START_TIMEOUT_S):
            await self._running.wait()
        if not self.running:
            raise GatewayError(f"the supervisor did not start: {self._start_error!r}")

    async def aclose(self) -> None:
        """Stop accepting, stop every session (two phases), end ``run``."""
        self._accepting = False
        self._stop.set()

    async def _stop_all(self) -> None:
        # With a durable store the sessions outlive the server: their jobs are
        # cancelled and their sandboxes stopped, but they are not ended.
        self._suspending = self.store.durable
        for actor in list(self._actors.values()):
            actor.request_stop("shutdown")
        children = list(self._children.values())
        tasks = [child.task for child in children if child.task is not None]
        if not tasks:
            return
        await asyncio.wait(tasks, timeout=self.config.stop_grace)
        # The TaskGroup's exit then waits for the cleanups, each under its bound.
        for child in children:
            self._kill(child, "supervisor shutdown")

    # ------------------------------------------------------------------
    # Sessions

    async def spawn(
        self, username: str, *, aws_login: str | None = None, customer_name: str | None = None
    ) -> Login:
        """Create a session and its actor; return once the actor runs."""
        if not self._accepting or self._tg is None or not self.running:
            raise SessionClosed("the server is shutting down")
        most = self.limits["max_sessions"]
        if most.on and len(self._actors) >= most.value:
            raise most.refuse("try again later")
        owned = self._by_user.setdefault(username, set())
        if len(owned) >= self.config.sessions_per_user:
            raise self.limits["sessions_per_user"].refuse(
                f"user {username!r} has {len(owned)}; end one first"
            )
        token = auth.new_token()
        info = SessionInfo(
            session_id=auth.new_session_id(username),
            username=username,
            token_hash=auth.token_hash(token),
            created_at=time.time(),
            aws_login=aws_login,
            customer_name=customer_name,
        )
        sid = info.session_id
        sandbox = self._sandbox_factory(self._spec(sid, username))
        # The user's place is held while the store writes, so that two logins
        # at once cannot both take the last one.
        owned.add(sid)
        try:
            await self.store.create_session(_record(info, sandbox))
        except BaseException:
            owned.discard(sid)
            raise
        if self._stop.is_set():
            # The server began to stop while the store wrote.
            owned.discard(sid)
            await self.store.end_session(sid, "the server is shutting down", time.time())
            raise SessionClosed("the server is shutting down")
        actor = SessionActor(info, sandbox, self.config.actor, self.store)
        child = self._register(actor)
        self.totals.spawned += 1
        try:
            await self._until_started(actor)
        except BaseException:
            # Timed out or the caller went away: the session must not linger
            # holding one of the user's places.
            self._abandon(child, "the session did not start")
            raise
        return Login(actor=actor, token=token)

    def _spec(self, sid: str, username: str, previous_id: str | None = None) -> SandboxSpec:
        return SandboxSpec(
            session_id=sid,
            username=username,
            data_dir=self._sessions_dir / sid,
            stream_url=self._stream_url(sid) if self._stream_url else None,
            previous_id=previous_id,
        )

    def _register(self, actor: SessionActor, *, restored: bool = False) -> Child:
        """Put *actor* under supervision: its places in the registry, and its task."""
        assert self._tg is not None
        info = actor.info
        sid = info.session_id
        child = Child(actor, restored=restored)
        self._by_user.setdefault(info.username, set()).add(sid)
        self._actors[sid] = actor
        self._children[sid] = child
        self._by_token[info.token_hash] = actor
        child.task = self._tg.create_task(self._supervise(child), name=f"session:{sid}")
        return child

    async def _until_started(self, actor: SessionActor) -> None:
        # The new task's first step runs before we resume, so the timeout is
        # only armed when the actor did not start in that step.
        await asyncio.sleep(0)
        if actor.started.is_set():
            return
        try:
            async with asyncio.timeout(_SPAWN_TIMEOUT_S):
                await actor.started.wait()
        except TimeoutError:
            raise GatewayError(f"the session did not start within {_SPAWN_TIMEOUT_S:g} s") from None

    def _abandon(self, child: Child, reason: str) -> None:
        self._unregister(child.actor, reason)
        child.actor.refuse_requests(reason)
        self._kill(child, reason)

    def by_token(self, token: str) -> SessionActor:
        """The live session *token* belongs to.

        Raises ``SessionClosed`` for an ended session, ``Unauthorized`` else.
        """
        digest = auth.token_hash(token)
        actor = self._by_token.get(digest)
        if actor is not None:
            return actor
        reason = self._ended.get(digest)
        if reason is not None:
            raise SessionClosed(f"this session has ended: {reason}")
        raise Unauthorized("unknown or wrong token")

    def resolve(self, token: str) -> tuple[SessionActor, Grant]:
        """The live session *token* opens and as whom: its owner, or a share's guest.

        Raises ``Forbidden`` for a revoked share's token, ``SessionClosed`` for
        an ended session's (its shares' included), ``Unauthorized`` else.
        """
        guest = self._share_tokens.resolve(auth.token_hash(token))
        if guest is not None:
            return guest
        return self.by_token(token), OWNER

    def resolve_for(self, token: str, session_id: str) -> tuple[SessionActor, Grant]:
        """As ``resolve``, for a request about *session_id*: 404 if no such live session, 403 if another's."""
        actor, grant = self.resolve(token)
        if actor.info.session_id != session_id:
            if session_id not in self._actors:
                raise SessionNotFound(f"no session {session_id!r}")
            raise Forbidden(f"this token does not belong to session {session_id}")
        return actor, grant

    def get(self, session_id: str) -> SessionActor:
        try:
            return self._actors[session_id]
        except KeyError:
            raise SessionNotFound(f"no session {session_id!r}") from None

    def __len__(self) -> int:
        return len(self._actors)

    def sessions_of(self, username: str) -> list[SessionActor]:
        """Every live session of *username*."""
        return [self._actors[sid] for sid in self._by_user.get(username, ()) if sid in self._actors]

    async def stop(self, session_id: str, reason: str) -> None:
        """End a session: ``Stop`` first, then cancel the incarnation after the grace period.

        Returns once the session's cleanup is over (or past its bound).
        """
        actor = self.get(session_id)
        child = self._children[session_id]
        assert child.task is not None
        actor.request_stop(reason)
        _, late = await asyncio.wait([child.task], timeout=self.config.stop_grace)
        if late:
            self._kill(child, f"stop: {reason}")
            await asyncio.wait([child.task], timeout=self._cleanup_bound)

    @property
    def _cleanup_bound(self) -> float:
        return self.config.close_timeout + self.config.actor.close_timeout + 1.0

    async def _keep_alive(self) -> None:
        """Before the sweep: keep each remote sandbox alive past its session's idle deadline."""
        await keep_alive(self._actors.values(), self.config)

    def sweep(self) -> int:
        """Ask idle sessions to stop, cancel ones that ignored it; return how many."""
        now = time.monotonic()
        timeout, grace = self.config.idle_timeout, self.config.stop_grace
        reaped = 0
        for sid, actor in self._actors.items():
            if actor.stop_requested_at is not None:
                if now - actor.stop_requested_at > grace:
                    self._kill(self._children[sid], "did not stop in time")
            elif actor.idle_seconds(now) > timeout:
                actor.request_stop("idle", now)
                reaped += 1
        self.totals.reaped += reaped
        if reaped:
            logger.info("supervisor.swept", reaped=reaped, sessions=len(self._actors))
        return reaped

    def _unregister(self, actor: SessionActor, reason: str, *, ended: bool = True) -> None:
        """Forget the session: its token, its place in the user's quota (idempotent)."""
        info = actor.info
        sid = info.session_id
        if self._actors.pop(sid, None) is None:
            return
        self._children.pop(sid, None)
        self.restored.pop(sid, None)
        self._by_token.pop(info.token_hash, None)
        # The session's shares go with it; when it ends, their guests are told so.
        for share in actor.shares:
            self._share_tokens.forget(share.token_hash, revoked=False)
            if ended:
                self._ended[share.token_hash] = reason
        if ended:
            self._ended[info.token_hash] = reason
            while len(self._ended) > TOMBSTONES:
                self._ended.popitem(last=False)
            self.totals.ended += 1
        owned = self._by_user.get(info.username)
        if owned is not None:
            owned.discard(sid)
            if not owned:
                del self._by_user[info.username]

    # ------------------------------------------------------------------
    # Status

    def sessions_by_state(self) -> dict[str, int]:
        """Live sessions counted by state (``deskhive_sessions``)."""
        return self._census.by_state()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "uptime_seconds": round(now - self.started_at, 3),
            "totals": attrs.asdict(self.totals),
            "config": {
                "idle_timeout": self.config.idle_timeout,
                "sweep_interval": self.config.sweep_interval,
            },
            "sessions": [attrs.asdict(a.statistics(now)) for a in self._actors.values()],
            "limits": self.limits.status(),
        }


def _record(info: SessionInfo, sandbox: Sandbox) -> SessionRecord:
    """What the store keeps of a new session (its first seqs reserved)."""
    return SessionRecord(
        session_id=info.session_id,
        username=info.username,
        token_hash=info.token_hash,
        created=info.created_at,
        last_active=info.created_at,
        aws_login=info.aws_login,
        customer_name=info.customer_name,
        sandbox_kind=sandbox.kind,
        seq_reserved=SEQ_BLOCK,
    )
