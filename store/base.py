"""What the store keeps, and the one interface every store implements.

The store is in domain terms: sessions (created, touched, given a sandbox,
ended with a tombstone), their shares, and each session's journal of
encoded events. Two kinds of call:

- *Announcing* writes (``create_session``, ``set_sandbox``, ``end_session``,
  ``create_share``, ``revoke_share``) are awaited: they are durable when
  they return, so the answer that announces what they wrote (a login's 201,
  ``start_desktop``'s result) is sent after them.
- *Streaming* writes (``append``, ``touch``, ``clear_journal``,
  ``reserve_seq``, ``sent_seq``, ``add_pending``, ``remove_pending``) return at
  once and are committed in batches soon after (group commit): the live
  path never waits for the disk.

``flush`` waits until everything submitted before it is committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import attrs

#: Ended sessions are remembered (404 rather than 401) for at least this long.
TOMBSTONE_SECONDS = 24 * 3600.0


@attrs.frozen(kw_only=True)
class ShareRecord:
    """A guest's way into a session: the hash of its token and what it may do."""

    share_id: str
    session_id: str
    token_hash: bytes
    mode: str
    label: str | None
    created: float


@attrs.frozen(kw_only=True)
class SessionRecord:
    """A session that has not ended, as kept across restarts."""

    session_id: str
    username: str
    token_hash: bytes
    created: float
    last_active: float
    aws_login: str | None = None
    customer_name: str | None = None
    sandbox_kind: str = "null"
    sandbox_id: str | None = None
    #: Every seq up to this one may have been sent: a restarted owner
    #: numbers new events above it.
    seq_reserved: int = 0
    shares: tuple[ShareRecord, ...] = ()
    #: Requests that were acknowledged and have no result yet (waiting or running jobs).
    pending: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class StoredJournal:
    """A session's kept events, oldest first, and the seq they run up to."""

    events: tuple[tuple[int, bytes], ...]
    #: Newest seq ever stored for the session (journal cleared or not).
    last_seq: int


class Store(Protocol):
    """Sessions, shares and journals; see the module docstring for the two kinds of write."""

    #: Whether sessions outlive the process (``memory``: no).
    durable: bool
    #: After ``open``: whether the previous server closed the store (False after a crash,
    #: when seqs up to each session's ``seq_reserved`` may have been sent).
    was_clean: bool

    async def open(self) -> None:
        """Create or migrate the schema; forget tombstones past their time."""
        ...

    async def aclose(self) -> None:
        """Commit everything submitted, then release the store."""
        ...

    async def flush(self) -> None:
        """Return once every write submitted before the call is committed."""
        ...

    def committed(self) -> asyncio.Future[None]:
        """A future done once every write submitted before the call is committed (done at once in memory).

        For callers that cannot wait themselves: the actor acknowledges a job
        once the store keeps it as pending.
        """
        ...

    # -- sessions ----------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None: ...

    async def live_sessions(self) -> Sequence[SessionRecord]:
        """Every session that has not ended, with its shares."""
        ...

    def touch(self, session_id: str, last_active: float) -> None:
        """The session's last activity (wall-clock seconds); batched."""
        ...

    async def set_sandbox(self, session_id: str, kind: str, sandbox_id: str | None) -> None: ...

    def reserve_seq(self, session_id: str, upto: int) -> None:
        """Record that seqs up to *upto* may be sent (a high-water mark, never lowered); batched."""
        ...

    def sent_seq(self, session_id: str, seq: int) -> None:
        """Every seq up to *seq* was used (kept or skipped): a clean restart numbers on after it; batched."""
        ...

    def add_pending(self, session_id: str, request_id: str) -> None:
        """A request was acknowledged and waits for its result; batched."""
        ...

    def remove_pending(self, session_id: str, request_id: str) -> None:
        """The request got its result; batched."""
        ...

    async def end_session(self, session_id: str, reason: str, at: float) -> None:
        """End the session: its journal and shares go, a tombstone stays."""
        ...

    async def ended_reason(self, token_hash: bytes) -> str | None:
        """Why the session (or share) whose token hashes to *token_hash* ended, if it did."""
        ...

    async def recent_tombstones(self, limit: int) -> Sequence[tuple[bytes, str]]:
        """The newest *limit* tombstones, ``(token_hash, reason)``, newest first."""
        ...

    # -- shares ------------------------------------------------------------

    async def create_share(self, share: ShareRecord) -> None: ...

    async def revoke_share(self, share_id: str) -> None: ...

    # -- journals ----------------------------------------------------------

    def append(self, session_id: str, seq: int, frame: bytes) -> None:
        """Keep one encoded event; the oldest beyond the journal bound go. Batched."""
        ...

    def clear_journal(self, session_id: str, upto_seq: int) -> None:
        """Forget the session's events up to *upto_seq*; batched."""
        ...

    async def load_journal(self, session_id: str) -> StoredJournal: ...
