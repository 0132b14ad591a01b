"""A session's job queue: jobs run one at a time, in order, and each gets its one result.

Each job runs in a task of the incarnation's TaskGroup; a cancel by request,
a ``kill_desktop`` or the incarnation's end cancels it, and the runner settles
its result however it ended (:meth:`JobQueue._settle`).

:class:`JobQueue` is a part of ``SessionActor`` (``actors.session``), for the
reason ``actors.durable`` gives.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from actors import jobs
from actors.basics import ActorConfig, QueuedJob, SessionInfo
from actors.durable import until_kept
from actors.peer import Peer
from protocol import codec
from protocol import messages as m
from protocol.errors import JobNotFound, SandboxBroken
from sandboxes.base import Sandbox
from store.base import Store


class JobQueue:
    """The session actor's waiting and running jobs (mixed into ``SessionActor``)."""

    info: SessionInfo
    sandbox: Sandbox
    config: ActorConfig
    store: Store | None
    jobs_run: int
    _tg: asyncio.TaskGroup | None
    _pending: deque[QueuedJob]
    _current: QueuedJob | None
    _runner: asyncio.Task[None] | None
    _last_active: float
    #: A workflow's desktop step is starting the desktop.
    _starting: bool

    if TYPE_CHECKING:
        # Defined by SessionActor, DurableSession and DesktopWatch.
        @property
        def log(self) -> Any: ...
        def emit(self, event: m.Event) -> None: ...
        def _publish_state(self, request_id: str | None = None) -> None: ...
        def _touch_store(self, now: float | None = None) -> None: ...
        async def _desktop_changed(self) -> None: ...

    def _cancel(self, rid: str, target: str, origin: Peer | None) -> None:
        job = self._current if self._current and self._current.rid == target else None
        waiting = next((j for j in self._pending if j.rid == target), None)
        if job is None and waiting is None:
            if origin is not None:
                err = JobNotFound(f"no running or waiting job {target!r}", request_id=rid)
                origin.deliver(codec.encode(codec.error_for(err)))
            return
        if origin is not None:
            origin.deliver(codec.encode(m.Ack(id=rid)))
        if job is not None and job.task is not None:
            job.cancelled_by = f"cancelled by request {rid}"
            job.task.cancel(job.cancelled_by)
        if waiting is not None:
            self._pending.remove(waiting)
            self._settle(waiting, f"cancelled by request {rid}")
        self.emit(m.Result(id=rid, ok=True, data={"target": target}))

    async def _acks_first(self) -> None:
        """Wait (bounded) until the store keeps every waiting job, before any of them is cancelled.

        A job is acknowledged once kept (``_ack_when_kept``); a cancel, a
        ``kill_desktop`` or the session's end settles waiting jobs at once, and
        without this wait a job's ``cancelled`` result could overtake its ack.
        """
        for kept in {job.kept for job in self._pending if job.kept is not None and not job.kept.done()}:
            await until_kept(kept)

    def _cancel_all(self, reason: str) -> None:
        while self._pending:
            self._settle(self._pending.popleft(), reason)
        job = self._current
        if job is not None and job.task is not None and job.cancelled_by is None:
            job.cancelled_by = reason
            job.task.cancel(reason)

    def _enqueue(self, job: QueuedJob, *, first: bool = False) -> QueuedJob:
        if self.store is not None:
            self.store.add_pending(self.info.session_id, job.rid)
        if first:
            self._pending.appendleft(job)
        else:
            self._pending.append(job)
        if self._runner is None or self._runner.done():
            assert self._tg is not None
            self._runner = self._tg.create_task(self._run_jobs(), name=f"jobs:{self.info.session_id}")
        return job

    async def _run_jobs(self) -> None:
        assert self._tg is not None
        while self._pending:
            head = self._pending[0]
            if head.kept is not None and not head.kept.done():
                # Still waiting, so still cancellable as a waiting job; then
                # look again: it may have been cancelled or overtaken.
                await until_kept(head.kept)
                continue
            job = self._current = self._pending.popleft()
            job.started_at = time.monotonic()
            self._touch_store()
            job.task = self._tg.create_task(self._execute(job), name=f"job:{self.info.session_id}:{job.rid}")
            self._publish_state()
            try:
                # wait() does not raise when the job is cancelled by request.
                await asyncio.wait([job.task])
            finally:
                # Whatever ended the wait, the job's end or the incarnation's
                # (the job may not even have started), its result is settled.
                self._current = None
                # A job is activity: idle time counts from its end, not from
                # the frame that asked for it (no reaping right after a long job).
                self._last_active = time.monotonic()
                self._settle(job, "cancelled")
            self._publish_state()

    async def _execute(self, job: QueuedJob) -> m.Result:
        self.jobs_run += 1
        self.log.info("job.started", id=job.rid, kind=type(job.msg).__name__)
        ctx = jobs.JobContext(
            request_id=job.rid,
            sandbox=self.sandbox,
            config=self.config.jobs,
            log=self.log,
            emit=self.emit,
            set_starting=self._set_starting,
            session_id=self.info.session_id,
            username=self.info.username,
            desktop_changed=self._desktop_changed,
        )
        return await jobs.run_to_result(job.msg, ctx)

    def _settle(self, job: QueuedJob, reason: str) -> None:
        """Emit *job*'s one result, from how its task ended (or that it never ran)."""
        if job.settled:
            return
        job.settled = True
        # Dropping the task breaks task -> traceback -> frame -> job -> task.
        task, job.task = job.task, None
        result = jobs.outcome(job.rid, task, job.cancelled_by or reason, job.lost)
        if task is not None:
            seconds = round(time.monotonic() - job.started_at, 3)
            self.log.info("job.finished", id=job.rid, ok=result.ok, seconds=seconds)
            self._measure(job, result, seconds)
        self.emit(result)
        if self.store is not None:
            self.store.remove_pending(self.info.session_id, job.rid)
            self._touch_store()

    def _measure(self, job: QueuedJob, result: m.Result, seconds: float) -> None:
        """The job's duration by kind, and a sandbox failure by backend, for ``/metrics``."""
        metrics = self.config.jobs.metrics
        if metrics is not None:
            metrics.job_duration.labels(jobs.kind_of(job.msg)).observe(seconds)
            if result.error_code == SandboxBroken.code:
                metrics.sandbox_failures[self.sandbox.kind] += 1

    def _set_starting(self, starting: bool) -> None:
        self._starting = starting
        self._publish_state()
