"""A store in this process's memory: the same interface, nothing outlives the process.

For tests and benchmarks (``--store memory``). Writes take effect at once,
so ``flush`` has nothing to wait for.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

import attrs

from store.base import TOMBSTONE_SECONDS, SessionRecord, ShareRecord, StoredJournal


@attrs.define(slots=True)
class _Journal:
    events: deque[tuple[int, bytes]]
    last_seq: int = 0


class MemoryStore:
    """Sessions, shares and journals in dictionaries."""

    durable = False
    was_clean = True

    def __init__(self, journal_size: int = 1000) -> None:
        self._journal_size = journal_size
        self._sessions: dict[str, SessionRecord] = {}
        self._journals: dict[str, _Journal] = {}
        #: token hash (session's or share's) -> (reason, when it ended)
        self._tombstones: dict[bytes, tuple[str, float]] = {}

    async def open(self) -> None:
        cutoff = time.time() - TOMBSTONE_SECONDS
        self._tombstones = {h: t for h, t in self._tombstones.items() if t[1] >= cutoff}

    async def aclose(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    def committed(self) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def create_session(self, record: SessionRecord) -> None:
        self._sessions[record.session_id] = record

    async def live_sessions(self) -> Sequence[SessionRecord]:
        return list(self._sessions.values())

    def touch(self, session_id: str, last_active: float) -> None:
        self._update(session_id, last_active=last_active)

    async def set_sandbox(self, session_id: str, kind: str, sandbox_id: str | None) -> None:
        self._update(session_id, sandbox_kind=kind, sandbox_id=sandbox_id)

    def reserve_seq(self, session_id: str, upto: int) -> None:
        record = self._sessions.get(session_id)
        if record is not None and upto > record.seq_reserved:
            self._update(session_id, seq_reserved=upto)

    def sent_seq(self, session_id: str, seq: int) -> None:
        if session_id in self._sessions:
            journal = self._journals.get(session_id)
            if journal is None:
                journal = self._journals[session_id] = _Journal(deque(maxlen=self._journal_size))
            journal.last_seq = max(journal.last_seq, seq)

    def add_pending(self, session_id: str, request_id: str) -> None:
        record = self._sessions.get(session_id)
        if record is not None and request_id not in record.pending:
            self._update(session_id, pending=(*record.pending, request_id))

    def remove_pending(self, session_id: str, request_id: str) -> None:
        record = self._sessions.get(session_id)
        if record is not None and request_id in record.pending:
            self._update(session_id, pending=tuple(r for r in record.pending if r != request_id))

    async def end_session(self, session_id: str, reason: str, at: float) -> None:
        record = self._sessions.pop(session_id, None)
        self._journals.pop(session_id, None)
        if record is None:
            return
        self._tombstones[record.token_hash] = (reason, at)
        for share in record.shares:
            self._tombstones[share.token_hash] = (reason, at)

    async def ended_reason(self, token_hash: bytes) -> str | None:
        found = self._tombstones.get(token_hash)
        return found[0] if found else None

    async def recent_tombstones(self, limit: int) -> Sequence[tuple[bytes, str]]:
        newest = sorted(self._tombstones.items(), key=lambda item: item[1][1], reverse=True)[:limit]
        return [(h, reason) for h, (reason, _) in newest]

    async def create_share(self, share: ShareRecord) -> None:
        record = self._sessions.get(share.session_id)
        if record is not None:
            self._sessions[share.session_id] = attrs.evolve(record, shares=(*record.shares, share))

    async def revoke_share(self, share_id: str) -> None:
        for sid, record in self._sessions.items():
            kept = tuple(s for s in record.shares if s.share_id != share_id)
            if len(kept) != len(record.shares):
                self._sessions[sid] = attrs.evolve(record, shares=kept)
                for share in record.shares:
                    if share.share_id == share_id:
                        self._tombstones[share.token_hash] = ("the share was revoked", time.time())
                return

    def append(self, session_id: str, seq: int, frame: bytes) -> None:
        journal = self._journals.get(session_id)
        if journal is None:
            journal = self._journals[session_id] = _Journal(deque(maxlen=self._journal_size))
        journal.events.append((seq, frame))
        journal.last_seq = max(journal.last_seq, seq)

    def clear_journal(self, session_id: str, upto_seq: int) -> None:
        journal = self._journals.get(session_id)
        if journal is not None:
            while journal.events and journal.events[0][0] <= upto_seq:
                journal.events.popleft()

    async def load_journal(self, session_id: str) -> StoredJournal:
        journal = self._journals.get(session_id)
        if journal is None:
            return StoredJournal(events=(), last_seq=0)
        return StoredJournal(events=tuple(journal.events), last_seq=journal.last_seq)

    def _update(self, session_id: str, **changes: object) -> None:
        record = self._sessions.get(session_id)
        if record is not None:
            self._sessions[session_id] = attrs.evolve(record, **changes)  # type: ignore[arg-type]
