"""Who may do what on a session: its owner, and guests through shares.

A share is a guest's way into one session, ``view`` or ``control``. The
session actor keeps its live shares here, with the sockets and desktop
streams joined through each, so that revoking a share closes exactly those.
What a role may send is decided in one place, :func:`check_allowed`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Literal, Protocol

import attrs

from protocol import messages as m
from protocol.errors import Forbidden, QuotaExceeded
from store.base import ShareRecord

Role = Literal["owner", "view", "control"]
ShareMode = Literal["view", "control"]
JoinKind = Literal["socket", "stream"]
SHARE_MODES: Final = ("view", "control")
#: Live shares one session may have at once: each costs memory and a store row.
SHARES_PER_SESSION: Final = 64


@attrs.frozen
class Grant:
    """The credential a socket or request came with: the owner's, or one share's."""

    role: Role
    share_id: str | None = None

    @classmethod
    def of(cls, share: ShareRecord) -> Grant:
        return cls("view" if share.mode == "view" else "control", share.share_id)


OWNER: Final = Grant("owner")

#: What a ``view`` guest may send: it watches, it does not act.
_VIEW_ALLOWED: Final = (m.Ping, m.GetState)


def check_allowed(role: Role, msg: m.Request) -> None:
    """Raise ``Forbidden`` unless *role* may send *msg*."""
    if role == "owner":
        return
    if role == "view" and not isinstance(msg, _VIEW_ALLOWED):
        raise Forbidden("a view share may send only ping and get_state", request_id=msg.id)
    if isinstance(msg, m.ClearLogs):
        raise Forbidden("only the session's owner may clear its logs", request_id=msg.id)


@attrs.frozen(kw_only=True)
class ShareStats:
    """One share of a session, as listed to its owner and in ``/status``."""

    share_id: str
    mode: str
    label: str | None
    created: float
    sockets: int
    streams: int


class Closable(Protocol):
    """A socket or desktop stream joined through a share."""

    async def close(self, code: int, reason: str) -> None: ...


class Shares:
    """A session's live shares and what is joined through each."""

    __slots__ = ("_joined", "_live")

    def __init__(self) -> None:
        self._live: dict[str, ShareRecord] = {}
        #: share id -> the sockets and desktop streams joined with it (each with its kind).
        self._joined: dict[str, dict[Closable, JoinKind]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[ShareRecord]:
        return iter(self._live.values())

    def check_room(self, session_id: str) -> None:
        """Raise ``QuotaExceeded`` when the session has as many shares as it may."""
        if len(self._live) >= SHARES_PER_SESSION:
            raise QuotaExceeded(
                f"session {session_id} already has {SHARES_PER_SESSION} shares, "
                "the limit per session; revoke one first"
            )

    def stats(self) -> tuple[ShareStats, ...]:
        return tuple(
            ShareStats(
                share_id=s.share_id,
                mode=s.mode,
                label=s.label,
                created=s.created,
                sockets=self.joined(s.share_id, "socket"),
                streams=self.joined(s.share_id, "stream"),
            )
            for s in self._live.values()
        )

    def add(self, share: ShareRecord) -> None:
        self._live[share.share_id] = share

    def get(self, share_id: str) -> ShareRecord | None:
        return self._live.get(share_id)

    def role(self, grant: Grant) -> Role | None:
        """*grant*'s role now, ``None`` once its share was revoked."""
        if grant.share_id is None:
            return grant.role
        return grant.role if grant.share_id in self._live else None

    def join(self, grant: Grant, member: Closable, kind: JoinKind) -> None:
        if grant.share_id is not None:
            self._joined.setdefault(grant.share_id, {})[member] = kind

    def leave(self, grant: Grant, member: Closable) -> None:
        if grant.share_id is not None and (members := self._joined.get(grant.share_id)) is not None:
            members.pop(member, None)
            if not members:
                del self._joined[grant.share_id]

    def joined(self, share_id: str, kind: JoinKind) -> int:
        """How many sockets (or desktop streams) are joined through the share."""
        return sum(1 for k in self._joined.get(share_id, {}).values() if k == kind)

    def revoke(self, share_id: str) -> tuple[ShareRecord | None, list[Closable]]:
        """Forget the share; return it and what was joined with it (to be closed)."""
        return self._live.pop(share_id, None), list(self._joined.pop(share_id, {}))

    def clear(self) -> list[ShareRecord]:
        """Forget every share (the session ended); return them."""
        shares = list(self._live.values())
        self._live.clear()
        self._joined.clear()
        return shares
