"""Shares under supervision: made, stored and revoked, and which token hash opens which.

A revoked share's token is remembered (up to a bound) so that its guests are
told "revoked" (403, 4403) rather than "wrong token".

:class:`Sharing` is a part of ``Supervisor`` (``supervisor``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

import auth
from actors.session import SessionActor
from actors.shares import Grant
from protocol.errors import Forbidden, SessionClosed
from store.base import ShareRecord


class ShareStore(Protocol):
    """The part of the store (``store.base.Store``) that keeps shares."""

    async def create_share(self, share: ShareRecord) -> None: ...

    async def revoke_share(self, share_id: str) -> None: ...


class ShareTokens:
    """Live shares by their token's hash, and the hashes of revoked ones."""

    def __init__(self, most_revoked: int) -> None:
        #: A share token's hash -> its session and share id.
        self._by_token: dict[bytes, tuple[SessionActor, str]] = {}
        #: Hashes of revoked share tokens, so their guests are told "revoked" (403, 4403).
        self._revoked: OrderedDict[bytes, None] = OrderedDict()
        self._most_revoked = most_revoked

    def add(self, actor: SessionActor, share: ShareRecord) -> None:
        """Let *share*'s token open *actor*'s session."""
        self._by_token[share.token_hash] = (actor, share.share_id)

    def resolve(self, digest: bytes) -> tuple[SessionActor, Grant] | None:
        """The session a share token's *digest* opens, and as whom; ``None`` if it is no share's.

        Raises ``Forbidden`` for a revoked share's token.
        """
        shared = self._by_token.get(digest)
        if shared is not None:
            actor, share_id = shared
            share = actor.shares.get(share_id)
            if share is not None:
                return actor, Grant.of(share)
        if digest in self._revoked:
            raise Forbidden("this share was revoked")
        return None

    def forget(self, token_hash: bytes, *, revoked: bool) -> None:
        self._by_token.pop(token_hash, None)
        if revoked:
            self._revoked[token_hash] = None
            while len(self._revoked) > self._most_revoked:
                self._revoked.popitem(last=False)


class Sharing:
    """How the supervisor makes and revokes a session's shares (mixed into ``Supervisor``)."""

    _actors: dict[str, SessionActor]
    _share_tokens: ShareTokens

    async def create_share(
        self, actor: SessionActor, mode: str, label: str | None
    ) -> tuple[ShareRecord, str]:
        """A new share of *actor*'s session, stored before it is returned with its token (shown once)."""
        token = auth.new_token()
        share = ShareRecord(
            share_id=auth.new_share_id(),
            session_id=actor.info.session_id,
            token_hash=auth.token_hash(token),
            mode=mode,
            label=label,
            created=round(time.time(), 3),
        )
        self._check_live(actor)
        actor.check_shareable(mode)
        if (store := self._share_store()) is not None:
            await store.create_share(share)
            self._check_live(actor)  # it may have ended while the store wrote
        self.add_share(actor, share)
        return share, token

    def _check_live(self, actor: SessionActor) -> None:
        sid = actor.info.session_id
        if self._actors.get(sid) is not actor or actor.stop_requested_at is not None:
            raise SessionClosed(f"session {sid} is closed")

    def _share_store(self) -> ShareStore | None:
        # The durable store, once the supervisor has one (``self.store``).
        store: ShareStore | None = getattr(self, "store", None)
        return store

    def add_share(self, actor: SessionActor, share: ShareRecord, *, announce: bool = True) -> None:
        """Let *share*'s token open *actor*'s session (``announce=False``: restored, not new)."""
        actor.add_share(share, announce=announce)
        self._share_tokens.add(actor, share)

    async def revoke_share(self, actor: SessionActor, share_id: str) -> ShareRecord | None:
        """Void the share's token and close what it opened; ``None`` if there is no such share."""
        share = actor.shares.get(share_id)
        if share is None:
            return None
        self._share_tokens.forget(share.token_hash, revoked=True)
        if (store := self._share_store()) is not None:
            await store.revoke_share(share_id)
        return await actor.revoke_share(share_id)
