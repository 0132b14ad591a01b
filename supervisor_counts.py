"""How much of each limit the supervisor's sessions use, and how many are in each state.

Read at ``/status`` and ``/metrics`` and when a limit refuses, not on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from actors.session import SOCKETS_PER_SESSION, SessionActor
from limits import DesktopGate, Limits
from supervisor_config import SupervisorConfig


class Census:
    """Counts over the supervisor's live sessions (its own registry, read, never changed)."""

    def __init__(self, actors: Mapping[str, SessionActor], by_user: Mapping[str, set[str]]) -> None:
        self._actors = actors
        self._by_user = by_user

    def sessions(self) -> int:
        return len(self._actors)

    def most_owned(self) -> int:
        return max(map(len, self._by_user.values()), default=0)

    def most_sockets(self) -> int:
        now = time.monotonic()
        return max((a.statistics(now).sockets for a in self._actors.values()), default=0)

    def deepest_mailbox(self) -> int:
        return max((a.mailbox_depth for a in self._actors.values()), default=0)

    def running_desktops(self, username: str | None) -> list[tuple[str, str]]:
        actors: Iterable[SessionActor]
        if username is None:
            actors = self._actors.values()
        else:
            actors = (self._actors[sid] for sid in self._by_user.get(username, ()) if sid in self._actors)
        return [(a.info.session_id, a.info.username) for a in actors if _desktop_up(a)]

    def by_state(self) -> dict[str, int]:
        """Live sessions counted by state (``deskhive_sessions``)."""
        counts: dict[str, int] = {}
        for actor in self._actors.values():
            try:
                state = actor.state
            except Exception:  # noqa: BLE001 - a broken backend must not break the scrape
                state = "failed"
            counts[state] = counts.get(state, 0) + 1
        return counts


def add_limits(limits: Limits, config: SupervisorConfig, census: Census) -> DesktopGate:
    """The limits the supervisor enforces, with how much of each is in use."""
    add = limits.add
    add(
        "sessions_per_user",
        config.sessions_per_user,
        "too many sessions for one username",
        census.most_owned,
    )
    add("max_sessions", config.max_sessions, "this server holds as many sessions as it may", census.sessions)
    add("sockets_per_session", SOCKETS_PER_SESSION, "too many sockets on one session", census.most_sockets)
    add("mailbox_size", config.actor.mailbox_size, "too many requests waiting", census.deepest_mailbox)
    total = add("max_desktops", config.max_desktops, "this server runs as many desktops as it may")
    per_user = add("desktops_per_user", config.desktops_per_user, "too many desktops for one username")
    return DesktopGate(total, per_user, census.running_desktops)


def _desktop_up(actor: SessionActor) -> bool:
    try:
        return actor.sandbox.desktop_running
    except Exception:  # noqa: BLE001 - a broken backend counts as no desktop, and status still answers
        return False
