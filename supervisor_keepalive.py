"""Remote sandboxes (E2B) kept alive past their sessions' idle deadlines, at each sweep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Final, Protocol, runtime_checkable

import structlog

from actors.session import SessionActor
from supervisor_config import SupervisorConfig

logger = structlog.get_logger("deskhive.supervisor")

#: Bound on one sweep's keep-alive round (E2B sandboxes asked to live on).
_KEEP_ALIVE_TIMEOUT_S: Final = 30.0


@runtime_checkable
class KeptAlive(Protocol):
    """A sandbox that a remote service ends at its own deadline (E2B), unless kept alive.

    Its own calls extend that deadline; a session can be active without any
    (client frames, a user working in the service's own desktop stream), so
    each sweep keeps it past the session's idle deadline, and asks it about
    input on its desktop that never went through this server.
    """

    async def keep_alive(self, seconds: float) -> None: ...

    async def input_idle(self) -> float | None: ...


async def keep_alive(actors: Iterable[SessionActor], config: SupervisorConfig) -> None:
    """Before the sweep: keep each remote sandbox alive past its session's idle deadline.

    Input on the sandbox's own desktop stream counts as activity.
    """
    kept = [
        (actor, actor.sandbox)
        for actor in actors
        if isinstance(actor.sandbox, KeptAlive) and actor.stop_requested_at is None
    ]
    if not kept:
        return
    try:
        async with asyncio.timeout(_KEEP_ALIVE_TIMEOUT_S), asyncio.TaskGroup() as tg:
            for actor, sandbox in kept:
                tg.create_task(_keep_one(actor, sandbox, config), name=f"keep-alive:{actor.info.session_id}")
    except TimeoutError:
        logger.warning("supervisor.keep_alive_timeout", sandboxes=len(kept))


async def _keep_one(actor: SessionActor, sandbox: KeptAlive, config: SupervisorConfig) -> None:
    """E2B's deadline at or past the session's, until the next sweep; never raises."""
    interval = config.sweep_interval
    try:
        idle = actor.idle_seconds(time.monotonic())
        if idle >= interval / 2:
            # Only worth asking when nothing reached us since about the last sweep.
            seen = await sandbox.input_idle()
            if seen is not None and seen < idle:
                actor.touch()
                idle = 0.0
        # Activity before the next sweep moves the session's deadline by at
        # most one interval: E2B's is set past that.
        await sandbox.keep_alive(max(0.0, config.idle_timeout - idle) + interval)
    except Exception:
        logger.exception("sandbox.keep_alive_failed", session_id=actor.info.session_id)
