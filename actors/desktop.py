"""A session's desktop: each one that starts is numbered, and one that dies by itself is reported.

A backend that can tell at once (``WatchedDesktop``) is watched by a task of
the incarnation; any other is observed whenever the state is published. A
desktop that stopped running without being stopped on purpose is reported
once as ``desktop.lost``, the job that needed it fails, and the store forgets
it (or a restart would report it lost again).

:class:`DesktopWatch` is a part of ``SessionActor`` (``actors.session``), for
the reason ``actors.durable`` gives.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from actors import jobs
from actors.basics import ActorConfig, QueuedJob, SessionInfo
from sandboxes.base import LosesDesktop, Sandbox, WatchedDesktop
from store.base import Store

logger = structlog.get_logger("deskhive.actor")


class DesktopWatch:
    """The session actor's side that follows its desktop (mixed into ``SessionActor``)."""

    info: SessionInfo
    sandbox: Sandbox
    config: ActorConfig
    store: Store | None
    _tg: asyncio.TaskGroup | None
    _current: QueuedJob | None
    #: Numbers each desktop this session has seen start: stream tokens name one.
    _desktop_run: int
    _desktop_seen: bool
    #: Awaits the running desktop's end (backends that can tell at once).
    _watcher: asyncio.Task[None] | None

    if TYPE_CHECKING:
        # Defined by SessionActor and DurableSession.
        @property
        def log(self) -> Any: ...
        def _publish_state(self, request_id: str | None = None) -> None: ...
        async def _store_desktop(self) -> None: ...

    @property
    def desktop_run(self) -> int:
        """The number of the desktop running now (a new one each start), 0 without one."""
        self._observe_desktop()
        return self._desktop_run if self._desktop_seen else 0

    def _observe_desktop(self) -> None:
        running = self.sandbox.desktop_running
        if running and not self._desktop_seen:
            self._desktop_run += 1
        elif self._desktop_seen and not running:
            self._report_lost()
        self._desktop_seen = running

    def _report_lost(self) -> None:
        """A desktop stopped running: say so once, with why, unless it was stopped on purpose."""
        sandbox = self.sandbox
        reason = sandbox.lost_reason if isinstance(sandbox, LosesDesktop) else None
        if reason is None:
            return
        self.log.warning("desktop.lost", reason=reason)
        if self.store is not None and self._tg is not None:
            # The store forgets the desktop, or a restart would report it lost again.
            self._tg.create_task(self._forget_desktop(), name=f"desktop-store:{self.info.session_id}")

    async def _forget_desktop(self) -> None:
        try:
            await self._store_desktop()
        except Exception:
            # Outside any job: a failed write must not end the incarnation.
            logger.exception("actor.store_failed", session_id=self.info.session_id)

    def _watch_desktop(self) -> None:
        """Await the running desktop's end in the incarnation (one watcher per desktop)."""
        self._unwatch()
        sandbox = self.sandbox
        # No read of desktop_running here: desktop_ended returns at once without one.
        if self._tg is not None and isinstance(sandbox, WatchedDesktop):
            name = f"desktop-watch:{self.info.session_id}"
            self._watcher = self._tg.create_task(self._watch(sandbox), name=name)

    def _unwatch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel("the desktop watch is over")

    async def _watch(self, sandbox: WatchedDesktop) -> None:
        try:
            reason = await sandbox.desktop_ended()
        except Exception:
            # A watch that broke is no loss of the desktop; the next call says how it is.
            logger.exception("actor.desktop_watch_failed", session_id=self.info.session_id)
            return
        if reason is not None:
            self._desktop_died(reason)

    def _desktop_died(self, reason: str) -> None:
        """The desktop died by itself: a job that needs it fails, the state follows."""
        job = self._current
        workflows = self.config.jobs.workflows
        if job and job.task and job.lost is None and jobs.needs_desktop(job.msg, workflows):
            job.lost = reason
            if job.cancelled_by is None:
                job.cancelled_by = f"the desktop was lost: {reason}"
                job.task.cancel(job.cancelled_by)
        self._publish_state()

    async def _desktop_changed(self) -> None:
        """A job started or killed the desktop: watch the new one, and store it."""
        self._watch_desktop()
        await self._store_desktop()
