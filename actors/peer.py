"""What a session actor needs of a socket that watches it."""

from __future__ import annotations

from typing import Protocol


class Peer(Protocol):
    """One client socket bound to a session.

    ``deliver`` never suspends: the actor broadcasts an event to all its
    sockets in one step, so every socket sees every event once, in ``seq``
    order, and one slow reader cannot stall the session.
    """

    def deliver(self, frame: bytes) -> bool:
        """Queue one encoded frame; ``False`` when the socket is gone or too slow."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the socket with a WebSocket close *code* and *reason*."""
        ...
