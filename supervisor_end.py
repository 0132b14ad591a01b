"""A session's end under supervision: its sandbox closed, its tombstone stored, its sockets told.

Runs once per session after its last incarnation, under its own bounds, and
never raises: one session's fault ends that session alone. A durable shutdown
suspends the session instead, for the next start.

:class:`Ending` is a part of ``Supervisor`` (``supervisor``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

import structlog

from actors.session import SessionActor
from metrics import Metrics, ended_reason
from sandboxes.base import Resumable
from store import Store
from supervisor_config import SupervisorConfig

logger = structlog.get_logger("deskhive.supervisor")

#: Bound on the store's answer when a session ends.
_STORE_TIMEOUT_S: Final = 10.0


class Ending:
    """How the supervisor frees a session (mixed into ``Supervisor``)."""

    config: SupervisorConfig
    store: Store
    metrics: Metrics
    #: A durable shutdown is under way: sessions stopped by it are kept, not ended.
    _suspending: bool
    _accepting: bool

    if TYPE_CHECKING:
        # Defined by Supervisor.
        def _unregister(self, actor: SessionActor, reason: str, *, ended: bool = True) -> None: ...

    async def _finish(self, actor: SessionActor, state: str, reason: str) -> None:
        """Free everything the session held; runs once per session, never raises."""
        if state == "closed":
            reason = actor.stop_reason or reason
        # From here on requests are refused at once, not left for nobody.
        actor.refuse_requests(reason)
        if self._suspending and state == "closed" and actor.stop_reason == "shutdown":
            await self._suspend(actor)
            return
        self._unregister(actor, reason)
        self.metrics.sessions_ended[ended_reason(state, reason, shutting_down=not self._accepting)] += 1
        await self._end_in_store(actor, reason)
        await self._close_sandbox(actor)
        try:
            await actor.end(state, reason)
        except Exception:
            logger.exception("actor.end_failed", session_id=actor.info.session_id)
        self._summary(actor, state, reason)

    async def _suspend(self, actor: SessionActor) -> None:
        """A durable shutdown: stop the session's processes, keep the session for the next start."""
        reason = "the server is shutting down; the session will be back when it restarts"
        self._unregister(actor, reason, ended=False)
        await self._close_sandbox(actor, keep=True)
        try:
            await actor.suspend(reason)
        except Exception:
            logger.exception("actor.suspend_failed", session_id=actor.info.session_id)
        self._summary(actor, "suspended", reason)

    async def _end_in_store(self, actor: SessionActor, reason: str) -> None:
        """The session's tombstone, so that it stays ended across a restart."""
        try:
            async with asyncio.timeout(_STORE_TIMEOUT_S):
                await self.store.end_session(actor.info.session_id, reason, time.time())
        except Exception:
            logger.exception("store.end_failed", session_id=actor.info.session_id)

    async def _close_sandbox(self, actor: SessionActor, *, keep: bool = False) -> None:
        sid, sandbox = actor.info.session_id, actor.sandbox
        try:
            async with asyncio.timeout(self.config.close_timeout):
                if keep and isinstance(sandbox, Resumable):
                    await sandbox.suspend()
                else:
                    await sandbox.close()
        except TimeoutError:
            logger.error("sandbox.close_timeout", session_id=sid, sandbox_id=sandbox.sandbox_id)  # noqa: TRY400 - a timeout, no traceback worth keeping
        except Exception:
            # Any error at all (RecursionError included): the session ends anyway.
            logger.exception("sandbox.close_failed", session_id=sid, sandbox_kind=sandbox.kind)
            self.metrics.sandbox_failures[sandbox.kind] += 1

    def _summary(self, actor: SessionActor, state: str, reason: str) -> None:
        info = actor.info
        logger.info(
            "session.summary",
            session_id=info.session_id,
            username=info.username,
            state=state,
            reason=reason,
            seconds=round(time.time() - info.created_at, 3),
            frames_in=actor.frames_in,
            jobs=actor.jobs_run,
            events=actor.journal.last_seq,
        )
