"""Every WebSocket close code deskhive sends or documents, defined once.

RFC 6455 §7.4 reserves 1000-2999 for the protocol itself; 4000-4999 are the
application's own, and deskhive's follow the HTTP status they stand for. This
module imports nothing of ours.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Why the server closed a socket; clients branch on these numbers."""

    #: The server is shutting down.
    GOING_AWAY = 1001
    #: The socket fell more than the unsent-data bound behind; resume from ``last_seq``.
    POLICY_VIOLATION = 1008
    #: A frame over the hard frame limit (sent by aiohttp's reader).
    MESSAGE_TOO_BIG = 1009
    #: No valid ``hello`` (missing, late, or a wrong token).
    UNAUTHORIZED = 4401
    #: The credential no longer grants this socket (a revoked share).
    FORBIDDEN = 4403
    #: The session ended (logout, reaping, failure).
    NOT_FOUND = 4404
    #: The session already has as many sockets as it may.
    RATE_LIMITED = 4429
