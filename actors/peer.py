"""What a session actor needs of a socket that watches it."""

from __future__ import annotations

from typing import Protocol

from actors.journal import Journal


class Peer(Protocol):
    """One client socket bound to a session.

    Nothing here suspends: the actor broadcasts an event to all its sockets
    in one step, so every socket sees every event once, in ``seq`` order, and
    one slow reader cannot stall the session. A socket that is behind (a
    replay under way) reads the journal itself as its transport drains.
    """

    def deliver(self, frame: bytes) -> bool:
        """Queue one frame kept outside the journal (welcome, ack, pong, error).

        ``False`` when the socket is gone or too slow: the actor forgets it.
        """
        ...

    def follow(self, journal: Journal, last_seq: int) -> None:
        """Send the gap and the events after *last_seq*, then every live event."""
        ...

    def notify(self, seq: int, frame: bytes) -> bool:
        """Event *seq* (encoded as *frame*) was journaled; ``False`` as for ``deliver``."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the socket with a WebSocket close *code* and *reason*, within a bound."""
        ...
