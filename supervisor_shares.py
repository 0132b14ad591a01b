"""Share tokens: which hash opens which live share, and which were revoked.

A revoked share's token is remembered (up to a bound) so that its guests are
told "revoked" (403, 4403) rather than "wrong token".
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from actors.session import SessionActor
from actors.shares import Grant
from protocol.errors import Forbidden
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
