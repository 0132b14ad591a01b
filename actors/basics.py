"""What a session actor is made of and reports: its bounds, its owner, its stats, its job queue's entries."""

from __future__ import annotations

import asyncio

import attrs

from actors import jobs
from actors.shares import ShareStats
from protocol import messages as m


@attrs.frozen(kw_only=True)
class ActorConfig:
    """Bounds of one session actor."""

    mailbox_size: int = 1000
    journal_size: int = 1000
    journal_bytes: int = 16 * 1024 * 1024
    #: One deadline for closing all of an ended session's sockets together.
    close_timeout: float = 2.0
    #: The supervisor's idle timeout, told to clients so they can show the time left.
    idle_timeout: float = 3600.0
    jobs: jobs.JobConfig = attrs.field(factory=jobs.JobConfig)


@attrs.frozen(kw_only=True)
class SessionInfo:
    """Who the session belongs to; fixed for its whole life."""

    session_id: str
    username: str
    token_hash: bytes
    created_at: float
    aws_login: str | None = None
    customer_name: str | None = None


@attrs.frozen(kw_only=True)
class ActorStats:
    """A snapshot of one actor, for the status endpoint."""

    session_id: str
    username: str
    state: str
    #: Requests received and not yet answered (waiting jobs included, the
    #: running one not): what ``mailbox_size`` bounds.
    mailbox_depth: int
    jobs_waiting: int
    journal_size: int
    sockets: int
    idle_seconds: float
    running_job: str | None
    sandbox_kind: str
    sandbox_id: str | None
    #: Each live share (never its token) and what is joined through it.
    shares: tuple[ShareStats, ...] = ()


@attrs.frozen
class Stop:
    """Poison pill: finish what came before, cancel jobs, end the incarnation."""

    reason: str


@attrs.define(slots=True, eq=False)
class QueuedJob:
    """A job in the queue: its request, its task once it runs, and how it ended."""

    msg: m.Job | m.KillDesktop
    rid: str
    task: asyncio.Task[m.Result] | None = None
    started_at: float = 0.0
    #: Set when a request, not the actor's end, cancelled the job.
    cancelled_by: str | None = None
    #: Why the desktop it needed died while it ran (its result is then sandbox_failed).
    lost: str | None = None
    settled: bool = False
    #: Done once the store keeps the job as pending (its ack goes out then).
    kept: asyncio.Future[None] | None = None
