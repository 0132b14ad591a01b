"""A session's bounded journal of sequenced events.

Events get their ``seq`` here (per session, from 1, one more for every event
kept) and are stored already encoded, so a replay or a broadcast to several
sockets encodes nothing again. The journal is bounded both by count and by
bytes; the oldest events leave first.
"""

from __future__ import annotations

from collections import deque
from itertools import islice

import attrs

from protocol import codec
from protocol.messages import Event


@attrs.frozen
class Batch:
    """The next part of a paced replay: a gap, then frames, from one ``seq`` on."""

    #: ``(from_seq, to_seq)`` of events that left the journal before they were read.
    gap: tuple[int, int] | None
    frames: list[bytes]
    #: The ``seq`` to read from next time (``last_seq + 1`` once caught up).
    next_seq: int


class Journal:
    """Sequenced, encoded events, oldest first, within two bounds."""

    __slots__ = ("_bytes", "_frames", "_max_bytes", "_max_events", "last_seq")

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self._frames: deque[bytes] = deque()
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._bytes = 0
        self.last_seq = 0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def first_seq(self) -> int:
        """The ``seq`` of the oldest kept event (``last_seq + 1`` if none)."""
        return self.last_seq - len(self._frames) + 1

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def append(self, event: Event) -> bytes:
        """Keep *event* under the next ``seq``; return its encoded frame."""
        self.last_seq += 1
        frame = codec.encode_event(event, self.last_seq)
        self._frames.append(frame)
        self._bytes += len(frame)
        while len(self._frames) > self._max_events or (
            self._bytes > self._max_bytes and len(self._frames) > 1
        ):
            self._bytes -= len(self._frames.popleft())
        return frame

    def clear(self) -> None:
        """Forget every event; ``seq`` keeps counting from where it was."""
        self._frames.clear()
        self._bytes = 0

    def read(self, next_seq: int, budget: int) -> Batch:
        """Kept events from *next_seq* on, about *budget* bytes of them (at least one).

        A socket that is behind calls this each time its transport drains, so
        a replay of the whole journal never sits in memory twice; events that
        left the journal meanwhile come back as the batch's gap.
        """
        first = self.first_seq
        gap = (next_seq, first - 1) if next_seq < first else None
        frames: list[bytes] = []
        size = 0
        for frame in islice(self._frames, max(0, next_seq - first), None):
            if frames and size + len(frame) > budget:
                break
            frames.append(frame)
            size += len(frame)
        return Batch(gap=gap, frames=frames, next_seq=max(next_seq, first) + len(frames))
