"""One session under supervision: its incarnations run, restarted after crashes, and killed.

Each session runs in ``_supervise``: it catches a crash per child (a bare
TaskGroup would cancel every sibling), restarts the actor while the restart
intensity allows (``restart_limit`` in ``restart_window``), and hands the
session to its end (``supervisor_end``) once it is over for good. A kill
(the second stop phase) cancels the incarnation, never the cleanup after it.

:class:`Supervising` is a part of ``Supervisor`` (``supervisor``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import attrs
import structlog

from actors.session import SessionActor
from metrics import Metrics
from supervisor_config import SupervisorConfig, Totals

logger = structlog.get_logger("deskhive.supervisor")


@attrs.define(eq=False)
class Child:
    """One session under supervision: its actor and the task that runs its life."""

    actor: SessionActor
    task: asyncio.Task[None] | None = None
    #: An incarnation (``actor.run()``) is under way: a kill cancels it.
    in_run: bool = False
    #: Why the session was killed (second stop phase); set once.
    killed: str | None = None
    #: Came back from the store at start-up: recovered before its first run.
    restored: bool = False

    def was_killed(self) -> bool:
        # A call, not the field: type checkers would take the field's value
        # as fixed across the await during which the kill lands.
        return self.killed is not None


class Supervising:
    """How the supervisor runs, restarts and kills one session (mixed into ``Supervisor``)."""

    config: SupervisorConfig
    totals: Totals
    metrics: Metrics

    if TYPE_CHECKING:
        # Defined by Restoring and Ending.
        async def _recover(self, actor: SessionActor) -> None: ...
        async def _finish(self, actor: SessionActor, state: str, reason: str) -> None: ...

    def _kill(self, child: Child, why: str) -> None:
        """Second stop phase: cancel the incarnation, never the cleanup after it."""
        if child.killed is not None or child.task is None or child.task.done():
            return
        child.killed = why
        if child.in_run:
            logger.warning("supervisor.stop_timeout", session_id=child.actor.info.session_id, reason=why)
            child.task.cancel(why)

    async def _supervise(self, child: Child) -> None:
        try:
            if child.restored:
                await self._recover(child.actor)
            state, reason = await self._incarnations(child)
        except asyncio.CancelledError:
            # The supervisor itself is torn down from outside: still free
            # the session (bounded), then go on being cancelled.
            await self._finish(child.actor, "closed", "the server stopped")
            raise
        await self._finish(child.actor, state, reason)

    async def _incarnations(self, child: Child) -> tuple[str, str]:
        """Run the actor, restarting it after crashes; return how the session ends."""
        actor = child.actor
        restarts: deque[float] = deque()
        while not child.was_killed():
            child.in_run = True
            try:
                await actor.run()
            except asyncio.CancelledError:
                if not child.was_killed() or self._absorb_kill():
                    raise
            except Exception as exc:
                if child.was_killed():
                    if self._absorb_kill():
                        raise asyncio.CancelledError from None
                    break
                self.totals.crashed += 1
                self.metrics.actor_crashes += 1
                logger.exception("actor.crashed", session_id=actor.info.session_id)
                if not self._may_restart(restarts):
                    return "failed", f"crashed too often: {exc!r}"
                self.totals.restarted += 1
                self.metrics.actor_restarts += 1
                actor.log.error("session.restarted", error=repr(exc), restarts=len(restarts))  # noqa: TRY400 - to the session
                continue
            finally:
                child.in_run = False
            break
        return "closed", actor.stop_reason or child.killed or "stopped"

    @staticmethod
    def _absorb_kill() -> bool:
        """Take back the kill's cancellation; ``True`` if another one is still pending."""
        task = asyncio.current_task()
        assert task is not None
        return task.uncancel() > 0

    def _may_restart(self, restarts: deque[float]) -> bool:
        now = time.monotonic()
        while restarts and now - restarts[0] > self.config.restart_window:
            restarts.popleft()
        if len(restarts) >= self.config.restart_limit:
            return False
        restarts.append(now)
        return True
