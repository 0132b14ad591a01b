"""Every error deskhive raises on purpose, in one hierarchy.

Each class carries the protocol ``code`` a client sees and the HTTP
``status`` it maps to. This module imports nothing of ours.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error deskhive raises on purpose."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The ``id`` of the request that failed, when it is known.
        self.request_id = request_id


class ProtocolError(GatewayError, ValueError):
    """A frame or request body that does not follow the protocol."""

    code = "bad_message"
    status = 400


class BadJSON(ProtocolError):
    """A frame that is not valid JSON text."""

    code = "bad_json"


class UnknownType(ProtocolError):
    """A frame whose ``type`` names no message of the protocol."""

    code = "unknown_type"


class FrameTooLarge(ProtocolError):
    """A frame or body over the size limit."""

    code = "too_large"
    status = 413


class Unauthorized(GatewayError):
    """A missing, malformed or wrong token or password."""

    code = "unauthorized"
    status = 401


class Forbidden(GatewayError):
    """A valid credential asking for something it may not have."""

    code = "forbidden"
    status = 403


class SessionNotFound(GatewayError, LookupError):
    """A session id or token that names no live session."""

    code = "not_found"
    status = 404


class SessionClosed(SessionNotFound):
    """A session that we ended (logout, reaping, shutdown)."""


class FileMissing(GatewayError, LookupError):
    """A path in a session's home that names no file or folder."""

    code = "not_found"
    status = 404


class JobNotFound(GatewayError, LookupError):
    """A ``cancel`` whose target names no running or waiting job."""

    code = "not_found"
    status = 404


class MailboxFull(GatewayError):
    """A session's mailbox at its bound: the actor is behind."""

    code = "busy"
    status = 429


class QuotaExceeded(GatewayError):
    """A username already holding as many sessions as it may."""

    code = "rate_limited"
    status = 429


class TooManySockets(QuotaExceeded):
    """A ``hello`` for a session already watched by as many sockets as it may have."""


class CommandTimeout(GatewayError, TimeoutError):
    """A command or job that outlived its timeout."""

    code = "timeout"
    status = 504


class SandboxBroken(GatewayError):
    """The sandbox failed from outside: a process died, the cloud refused."""

    code = "sandbox_failed"
    status = 502


class NotConfigured(GatewayError):
    """A feature that needs configuration the server was not given."""

    code = "forbidden"
    status = 403


class Cancelled(GatewayError):
    """A job ended by ``cancel``, ``kill_desktop`` or the session's end."""

    code = "cancelled"
    status = 409


class StepFailed(GatewayError):
    """A workflow step that ran but did not succeed (a command's exit code)."""

    code = "step_failed"
    status = 422


class ModelFailed(GatewayError):
    """The agent's model endpoint failed or answered nonsense (not the sandbox)."""

    code = "internal"
    status = 502


def from_code(code: object, message: str) -> GatewayError:
    """The error a protocol *code* names (an ``error`` frame read back), with *message*."""

    def classes(root: type[GatewayError]) -> list[type[GatewayError]]:
        return [root, *(c for sub in root.__subclasses__() for c in classes(sub))]

    found = next((c for c in classes(GatewayError) if c.code == code), GatewayError)
    return found(message)
