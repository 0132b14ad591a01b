"""A session's bounded journal of sequenced events.

Events get their ``seq`` here (per session, from 1, one more for every event
kept) and are stored already encoded, so a replay or a broadcast to several
sockets encodes nothing again. The journal is bounded both by count and by
bytes; the oldest events leave first.

Numbers can be skipped: a server restarted after a crash numbers new events
above every seq the dead one may have sent (:meth:`Journal.skip_to`). The
skipped numbers stay in the journal as a *hole*, so that every reader whose
replay reaches them, now or later, is told ``gap`` at that place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import islice

import attrs

from protocol import codec
from protocol.messages import Event


@attrs.frozen
class Batch:
    """The next part of a paced replay: a gap, then frames, from one ``seq`` on."""

    #: ``(from_seq, to_seq)`` of events that left the journal before they were
    #: read, or numbers that were skipped.
    gap: tuple[int, int] | None
    frames: list[bytes]
    #: The ``seq`` to read from next time (``last_seq + 1`` once caught up).
    next_seq: int


class Journal:
    """Sequenced, encoded events, oldest first, within two bounds."""

    __slots__ = ("_bytes", "_first", "_frames", "_holes", "_max_bytes", "_max_events", "last_seq")

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self._frames: deque[bytes] = deque()
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._bytes = 0
        #: seq of the oldest kept frame (meaningless while there is none).
        self._first = 1
        #: Skipped ranges ``(from, to)`` after the oldest kept frame, oldest first;
        #: rare (one per crash restart), so a list is searched.
        self._holes: list[tuple[int, int]] = []
        self.last_seq = 0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def first_seq(self) -> int:
        """The ``seq`` of the oldest kept event (``last_seq + 1`` if none)."""
        return self._first if self._frames else self.last_seq + 1

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def holes(self) -> tuple[tuple[int, int], ...]:
        """Skipped numbers still inside the kept range."""
        return tuple(self._holes)

    def append(self, event: Event) -> bytes:
        """Keep *event* under the next ``seq``; return its encoded frame."""
        frame = codec.encode_event(event, self.last_seq + 1)
        self._keep(self.last_seq + 1, frame)
        return frame

    def _keep(self, seq: int, frame: bytes) -> None:
        if not self._frames:
            self._first, self._holes = seq, []
        elif seq > self.last_seq + 1:
            self._holes.append((self.last_seq + 1, seq - 1))
        self.last_seq = seq
        self._frames.append(frame)
        self._bytes += len(frame)
        while len(self._frames) > self._max_events or (
            self._bytes > self._max_bytes and len(self._frames) > 1
        ):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self._bytes -= len(self._frames.popleft())
        self._first += 1
        if self._holes and self._holes[0][0] == self._first:
            self._first = self._holes.pop(0)[1] + 1

    def skip_to(self, seq: int) -> None:
        """Number the next event ``seq + 1``: the numbers in between are a hole."""
        if seq <= self.last_seq:
            return
        if self._frames:
            self._holes.append((self.last_seq + 1, seq))
        self.last_seq = seq

    def restore(self, events: Iterable[tuple[int, bytes]], last_seq: int) -> None:
        """Take back stored *events* (oldest first), then number on after *last_seq*."""
        for seq, frame in events:
            if seq > self.last_seq:
                self._keep(seq, frame)
        self.skip_to(last_seq)

    def clear(self) -> None:
        """Forget every event; ``seq`` keeps counting from where it was."""
        self._frames.clear()
        self._holes = []
        self._bytes = 0

    def read(self, next_seq: int, budget: int) -> Batch:
        """Kept events from *next_seq* on, about *budget* bytes of them (at least one).

        A socket that is behind calls this each time its transport drains, so
        a replay of the whole journal never sits in memory twice; events that
        left the journal meanwhile, or numbers skipped, come back as the
        batch's gap. A batch never reaches across a hole: the next one starts
        with its gap.
        """
        first = self.first_seq
        gap: tuple[int, int] | None = None
        pos = next_seq
        if pos < first:
            gap, pos = (pos, first - 1), first
        skipped = 0
        stop = self.last_seq
        for start, end in self._holes:
            if end < pos:
                skipped += end - start + 1
            elif start <= pos:
                gap = (gap[0] if gap else pos, end)
                skipped += end - start + 1
                pos = end + 1
            else:
                stop = start - 1
                break
        frames: list[bytes] = []
        size = 0
        index = pos - first - skipped
        for frame in islice(self._frames, index, index + max(0, stop - pos + 1)):
            if frames and size + len(frame) > budget:
                break
            frames.append(frame)
            size += len(frame)
        return Batch(gap=gap, frames=frames, next_seq=pos + len(frames))
