"""Every message of protocol version 1, as frozen attrs classes.

Serialization lives in :mod:`protocol.codec`, not here: these classes are
plain data. ``id`` is the client's request id (at most 64 characters); a
request without one is given one by the session actor.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

# --------------------------------------------------------------------------
# Client to server


@attrs.frozen(kw_only=True)
class Hello:
    """Binds a socket to the session its token names; must come first."""

    token: str
    last_seq: int | None = None


@attrs.frozen(kw_only=True)
class StartDesktop:
    """Starts the session's desktop."""

    id: str | None = None


@attrs.frozen(kw_only=True)
class SetupEnvironment:
    """Prepares the sandbox: the packages asked for, a browser profile."""

    id: str | None = None
    packages: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class RunCommand:
    """Runs *cmd* through a shell in the sandbox."""

    id: str | None = None
    cmd: str
    timeout: float | None = None


@attrs.frozen(kw_only=True)
class RunTask:
    """Runs the AI agent on the desktop for *query*."""

    id: str | None = None
    query: str


@attrs.frozen(kw_only=True)
class RunWorkflow:
    """Runs the named workflow (``default`` when none is named)."""

    id: str | None = None
    workflow: str | None = None
    query: str | None = None


@attrs.frozen(kw_only=True)
class Cancel:
    """Cancels the job whose request id is *target*."""

    id: str | None = None
    target: str


@attrs.frozen(kw_only=True)
class KillDesktop:
    """Cancels every job and kills the sandbox's desktop."""

    id: str | None = None


@attrs.frozen(kw_only=True)
class ClearLogs:
    """Empties this session's journal."""

    id: str | None = None


@attrs.frozen(kw_only=True)
class GetState:
    """Asks for a ``state`` event."""

    id: str | None = None


@attrs.frozen(kw_only=True)
class Screenshot:
    """Asks for a PNG of the desktop."""

    id: str | None = None


@attrs.frozen(kw_only=True)
class Launch:
    """Starts a program on the desktop (``terminal``, ``browser`` or a program name)."""

    id: str | None = None
    app: str
    #: Opened in the browser.
    url: str | None = None


@attrs.frozen(kw_only=True)
class Ping:
    """Asks the session's actor for a ``pong``."""

    id: str | None = None


Job = StartDesktop | SetupEnvironment | RunCommand | RunTask | RunWorkflow | Screenshot | Launch
Request = Job | Cancel | KillDesktop | ClearLogs | GetState | Ping
ClientMessage = Hello | Request

#: Requests that run one at a time per session, in order of arrival.
JOB_TYPES: tuple[type[Job], ...] = (
    StartDesktop,
    SetupEnvironment,
    RunCommand,
    RunTask,
    RunWorkflow,
    Screenshot,
    Launch,
)

# --------------------------------------------------------------------------
# Server to client

SessionState = Literal["idle", "starting", "ready", "busy", "stopping", "closed", "failed"]


@attrs.frozen(kw_only=True)
class Welcome:
    """Answers ``hello``: the socket now watches this session."""

    session_id: str
    username: str
    state: SessionState
    stream_url: str | None
    seq: int
    resumed: bool
    #: Whose credential the hello carried: ``owner``, or a share's ``view`` or ``control``.
    role: Literal["owner", "view", "control"] = "owner"
    #: Seconds without a client frame or job before the session is reaped.
    idle_timeout: float | None = None
    #: Seconds the session has been idle so far (0 while a job runs).
    idle_seconds: float | None = None


@attrs.frozen(kw_only=True)
class Ack:
    """The request *id* was taken from the mailbox."""

    id: str


@attrs.frozen(kw_only=True)
class Pong:
    """Answers ``ping``."""

    id: str | None


@attrs.frozen(kw_only=True)
class Gap:
    """Events *from_seq* to *to_seq* have left the journal."""

    from_seq: int
    to_seq: int


@attrs.frozen(kw_only=True)
class Error:
    """A request or frame that could not be accepted."""

    code: str
    message: str
    id: str | None = None


# Journal events: they get their ``seq`` when the journal keeps them.


@attrs.frozen(kw_only=True)
class Log:
    """One structured log event of the session."""

    ts: str
    level: str
    event: str
    fields: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Output:
    """A chunk of a job's output."""

    id: str
    stream: Literal["stdout", "stderr"]
    data: str


@attrs.frozen(kw_only=True)
class State:
    """The session's state changed (or ``get_state`` asked for it)."""

    state: SessionState
    stream_url: str | None
    current_command: str | None
    #: The request id of the job that runs, so clients need not match by text.
    running_id: str | None = None
    id: str | None = None
    #: As in ``Welcome``, when the event was emitted (a replay keeps them).
    idle_timeout: float | None = None
    idle_seconds: float | None = None


@attrs.frozen(kw_only=True)
class Result:
    """How request *id* ended."""

    id: str
    ok: bool
    exit_code: int | None = None
    data: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None


Event = Log | Output | State | Result
ServerMessage = Welcome | Ack | Pong | Gap | Error
