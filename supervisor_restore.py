"""Start-up with a durable store: the sessions it kept come back, and what no session owns is ended.

:class:`Restoring` is a part of ``Supervisor`` (``supervisor``): it registers
the actors it restores through the supervisor's own registry.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

import structlog

from actors.session import SessionActor, SessionInfo
from sandboxes.base import OrphanSweeper, SandboxFactory, SandboxSpec
from store import SessionRecord, Store, StoredJournal
from store.base import ShareRecord
from supervisor_config import SupervisorConfig, Totals

logger = structlog.get_logger("deskhive.supervisor")

#: Bound on a restored session's recovery (what the old server left running, or
#: reattaching its E2B sandbox and restarting the stream: a few calls to E2B).
_RECOVER_TIMEOUT_S: Final = 60.0
#: Bound on finding and ending what an earlier server left behind, at start-up.
_SWEEP_ORPHANS_TIMEOUT_S: Final = 60.0
#: Sessions restored between two yields to the loop.
_RESTORE_STEP: Final = 200
#: How many ended sessions' token hashes are remembered, so that a client of
#: an ended session is told "ended" (404, 4404) rather than "wrong token".
TOMBSTONES: Final = 10_000


class Restoring:
    """The supervisor's start-up from its store (mixed into ``Supervisor``)."""

    config: SupervisorConfig
    store: Store
    totals: Totals
    restored: dict[str, SessionRecord]
    _actors: dict[str, SessionActor]
    _ended: OrderedDict[bytes, str]
    _sandbox_factory: SandboxFactory

    if TYPE_CHECKING:
        # Defined by Supervisor.
        def _spec(self, sid: str, username: str, previous_id: str | None = None) -> SandboxSpec: ...
        def _register(self, actor: SessionActor, *, restored: bool = False) -> Any: ...
        def add_share(self, actor: SessionActor, share: ShareRecord, *, announce: bool = True) -> None: ...

    async def _restore(self) -> None:
        """Bring back every session the store kept, and the tombstones of ended ones."""
        started = time.monotonic()
        for digest, reason in reversed(await self.store.recent_tombstones(TOMBSTONES)):
            self._ended[digest] = reason
        records = await self.store.live_sessions()
        if not records:
            return
        # All at once: the store answers them in a few transactions.
        journals = await asyncio.gather(*(self.store.load_journal(r.session_id) for r in records))
        for n, (record, stored) in enumerate(zip(records, journals, strict=True), 1):
            try:
                self._restore_one(record, stored)
            except Exception:
                logger.exception("session.restore_failed", session_id=record.session_id)
            if n % _RESTORE_STEP == 0:
                await asyncio.sleep(0)  # ten thousand sessions must not hold the loop for one call
        # The new reservations are on disk before any client can see a seq they cover.
        await self.store.flush()
        logger.info(
            "supervisor.restored",
            sessions=len(self._actors),
            clean=self.store.was_clean,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _sweep_orphans(self) -> None:
        """End what an earlier server left that no restored session owns (folders, E2B sandboxes)."""
        factory: object = self._sandbox_factory
        if not isinstance(factory, OrphanSweeper):
            return
        # A restored session may not have reattached its sandbox yet (that runs
        # in its own task): the id its record kept counts as live all the same.
        live = {
            sid: actor.sandbox.sandbox_id or self._stored_sandbox(sid) for sid, actor in self._actors.items()
        }
        try:
            async with asyncio.timeout(_SWEEP_ORPHANS_TIMEOUT_S):
                await factory.sweep_orphans(live)
        except Exception:
            # Leftovers cost space or money, but must not keep the server from serving.
            logger.exception("supervisor.orphan_sweep_failed")

    def _stored_sandbox(self, session_id: str) -> str | None:
        record = self.restored.get(session_id)
        return None if record is None else record.sandbox_id

    def _restore_one(self, record: SessionRecord, stored: StoredJournal) -> None:
        info = SessionInfo(
            session_id=record.session_id,
            username=record.username,
            token_hash=record.token_hash,
            created_at=record.created,
            aws_login=record.aws_login,
            customer_name=record.customer_name,
        )
        spec = self._spec(record.session_id, record.username, record.sandbox_id or "")
        actor = SessionActor(info, self._sandbox_factory(spec), self.config.actor, self.store)
        actor.restore(record, stored, clean=self.store.was_clean)
        self.restored[record.session_id] = record
        self._register(actor, restored=True)
        for share in record.shares:
            self.add_share(actor, share, announce=False)
        self.totals.restored += 1

    async def _recover(self, actor: SessionActor) -> None:
        try:
            async with asyncio.timeout(_RECOVER_TIMEOUT_S):
                await actor.recover()
        except Exception:
            logger.exception("session.recover_failed", session_id=actor.info.session_id)
