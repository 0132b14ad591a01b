"""The supervisor: spawns one actor per session, finds, reaps and restarts them.

It owns the only TaskGroup that session tasks live in (OTP's
``simple_one_for_one``): every session runs in ``_supervise``, which catches
a crash per child (a bare TaskGroup would cancel every sibling), restarts the
actor with its session, token and journal while the restart intensity allows
(3 in 60 s), and, once the session ends for good, closes its sandbox and its
sockets.

Stopping is two-phase, as in OTP and aiojobs: a ``Stop`` message first, so
the actor finishes what it was told before; whatever still runs after the
grace period is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Final

import attrs
import structlog

import auth
from actors.session import ActorConfig, SessionActor, SessionInfo
from protocol.errors import QuotaExceeded, SessionClosed, SessionNotFound, Unauthorized
from sandboxes.base import SandboxFactory, SandboxSpec

logger = structlog.get_logger("deskhive.supervisor")

_SPAWN_TIMEOUT_S: Final = 5.0
_SANDBOX_CLOSE_TIMEOUT_S: Final = 15.0
#: How many ended sessions' token hashes are remembered, so that a client of
#: an ended session is told "ended" (404, 4404) rather than "wrong token".
_TOMBSTONES: Final = 10_000


@attrs.frozen(kw_only=True)
class SupervisorConfig:
    idle_timeout: float = 3600.0
    sweep_interval: float = 300.0
    sessions_per_user: int = 3
    restart_limit: int = 3
    restart_window: float = 60.0
    stop_grace: float = 10.0
    data_dir: Path = Path("var")
    actor: ActorConfig = attrs.field(factory=ActorConfig)


@attrs.define
class Totals:
    spawned: int = 0
    reaped: int = 0
    crashed: int = 0
    restarted: int = 0
    ended: int = 0


@attrs.frozen(kw_only=True)
class Login:
    """What a new session's owner is told, once."""

    actor: SessionActor
    token: str


class Supervisor:
    """Spawns, finds, reaps, restarts and stops session actors."""

    def __init__(
        self,
        config: SupervisorConfig,
        sandbox_factory: SandboxFactory,
        *,
        stream_url: Any = None,
    ) -> None:
        self.config = config
        self.totals = Totals()
        self._sandbox_factory = sandbox_factory
        #: ``session_id -> stream URL`` for backends streamed by this server.
        self._stream_url = stream_url
        self._actors: dict[str, SessionActor] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._by_token: dict[bytes, SessionActor] = {}
        self._by_user: dict[str, set[str]] = {}
        self._ended: OrderedDict[bytes, str] = OrderedDict()
        self._tg: asyncio.TaskGroup | None = None
        self._running = asyncio.Event()
        self._stop = asyncio.Event()
        self._accepting = True
        self._sessions_dir = config.data_dir / "sessions"
        self.started_at = time.monotonic()

    # ------------------------------------------------------------------
    # Life of the supervisor

    async def run(self) -> None:
        """Own every session task; sweep for idle ones until ``aclose``."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._running.set()
            while not self._stop.is_set():
                try:
                    async with asyncio.timeout(self.config.sweep_interval):
                        await self._stop.wait()
                except TimeoutError:
                    self.sweep()
            await self._stop_all()
        self._tg = None

    async def wait_running(self) -> None:
        async with asyncio.timeout(_SPAWN_TIMEOUT_S):
            await self._running.wait()

    async def aclose(self) -> None:
        """Stop accepting, stop every session (two phases), end ``run``."""
        self._accepting = False
        self._stop.set()

    async def _stop_all(self) -> None:
        for actor in list(self._actors.values()):
            actor.request_stop("shutdown")
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self.config.stop_grace)
        for task in late:
            logger.warning("supervisor.stop_timeout", task=task.get_name())
            task.cancel("supervisor shutdown")

    # ------------------------------------------------------------------
    # Sessions

    async def spawn(
        self, username: str, *, aws_login: str | None = None, customer_name: str | None = None
    ) -> Login:
        """Create a session and its actor; return once the actor runs."""
        if not self._accepting or self._tg is None:
            raise SessionClosed("the server is shutting down")
        owned = self._by_user.setdefault(username, set())
        if len(owned) >= self.config.sessions_per_user:
            raise QuotaExceeded(
                f"user {username!r} already has {len(owned)} sessions "
                f"(at most {self.config.sessions_per_user}); end one first"
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
        spec = SandboxSpec(
            session_id=sid,
            username=username,
            data_dir=self._sessions_dir / sid,
            stream_url=self._stream_url(sid) if self._stream_url else None,
        )
        actor = SessionActor(info, self._sandbox_factory(spec), self.config.actor)
        owned.add(sid)
        self._actors[sid] = actor
        self._by_token[info.token_hash] = actor
        self._tasks[sid] = self._tg.create_task(self._supervise(actor), name=f"session:{sid}")
        self.totals.spawned += 1
        # The new task's first step runs before we resume, so the timeout is
        # only armed when the actor did not start in that step.
        await asyncio.sleep(0)
        if not actor.started.is_set():
            async with asyncio.timeout(_SPAWN_TIMEOUT_S):
                await actor.started.wait()
        return Login(actor=actor, token=token)

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

    def get(self, session_id: str) -> SessionActor:
        try:
            return self._actors[session_id]
        except KeyError:
            raise SessionNotFound(f"no session {session_id!r}") from None

    def __len__(self) -> int:
        return len(self._actors)

    async def stop(self, session_id: str, reason: str) -> None:
        """End a session: ``Stop`` first, then cancel after the grace period."""
        actor = self.get(session_id)
        task = self._tasks[session_id]
        actor.request_stop(reason)
        _, late = await asyncio.wait([task], timeout=self.config.stop_grace)
        if late:
            logger.warning("supervisor.stop_timeout", session_id=session_id)
            task.cancel(f"stop: {reason}")
            await asyncio.wait([task], timeout=_SANDBOX_CLOSE_TIMEOUT_S)

    def sweep(self) -> int:
        """Ask idle sessions to stop, cancel ones that ignored it; return how many."""
        now = time.monotonic()
        timeout, grace = self.config.idle_timeout, self.config.stop_grace
        reaped = 0
        for sid, actor in self._actors.items():
            if actor.stop_requested_at is not None:
                if now - actor.stop_requested_at > grace:
                    self._tasks[sid].cancel("did not stop in time")
            elif actor.idle_seconds(now) > timeout:
                actor.request_stop("idle", now)
                reaped += 1
        self.totals.reaped += reaped
        if reaped:
            logger.info("supervisor.swept", reaped=reaped, sessions=len(self._actors))
        return reaped

    # ------------------------------------------------------------------
    # One child

    async def _supervise(self, actor: SessionActor) -> None:
        restarts: deque[float] = deque()
        final_state, reason = "closed", "stopped"
        try:
            while True:
                try:
                    await actor.run()
                except Exception as exc:
                    self.totals.crashed += 1
                    logger.exception("actor.crashed", session_id=actor.info.session_id)
                    if not self._may_restart(restarts):
                        final_state, reason = "failed", f"crashed too often: {exc!r}"
                        return
                    self.totals.restarted += 1
                    actor.log.error("session.restarted", error=repr(exc), restarts=len(restarts))  # noqa: TRY400 - to the session
                    continue
                return
        finally:
            await self._finish(actor, final_state, reason)

    def _may_restart(self, restarts: deque[float]) -> bool:
        now = time.monotonic()
        while restarts and now - restarts[0] > self.config.restart_window:
            restarts.popleft()
        if len(restarts) >= self.config.restart_limit:
            return False
        restarts.append(now)
        return True

    async def _finish(self, actor: SessionActor, state: str, reason: str) -> None:
        """Free everything the session held; runs once per session."""
        info = actor.info
        sid = info.session_id
        if state == "closed":
            reason = actor.stop_reason or reason
        self._actors.pop(sid, None)
        self._tasks.pop(sid, None)
        self._by_token.pop(info.token_hash, None)
        self._ended[info.token_hash] = reason
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        owned = self._by_user.get(info.username)
        if owned is not None:
            owned.discard(sid)
            if not owned:
                del self._by_user[info.username]
        self.totals.ended += 1
        try:
            async with asyncio.timeout(_SANDBOX_CLOSE_TIMEOUT_S):
                await actor.sandbox.close()
        except TimeoutError:
            logger.error(  # noqa: TRY400 - a timeout, no traceback worth keeping
                "sandbox.close_timeout", session_id=sid, sandbox_id=actor.sandbox.sandbox_id
            )
        await actor.end(state, reason)
        logger.info(
            "session.summary",
            session_id=sid,
            username=info.username,
            state=state,
            reason=reason,
            seconds=round(time.time() - info.created_at, 3),
            frames_in=actor.frames_in,
            jobs=actor.jobs_run,
            events=actor.journal.last_seq,
        )

    # ------------------------------------------------------------------
    # Status

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
        }
