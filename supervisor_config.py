"""The supervisor's settings and its running totals."""

from __future__ import annotations

from pathlib import Path

import attrs

from actors.session import ActorConfig


@attrs.frozen(kw_only=True)
class SupervisorConfig:
    idle_timeout: float = 3600.0
    sweep_interval: float = 300.0
    sessions_per_user: int = 3
    #: Sessions on this server, desktops on it and per username (0: no limit).
    max_sessions: int = 50_000
    max_desktops: int = 16
    desktops_per_user: int = 3
    restart_limit: int = 3
    restart_window: float = 60.0
    stop_grace: float = 10.0
    #: Bound on closing one session's sandbox at its end.
    close_timeout: float = 15.0
    data_dir: Path = Path("var")
    #: Where sessions are kept (``store.open_store``): ``memory`` or ``sqlite://PATH``.
    store_url: str = "memory"
    actor: ActorConfig = attrs.field(factory=ActorConfig)


@attrs.define
class Totals:
    spawned: int = 0
    reaped: int = 0
    crashed: int = 0
    restarted: int = 0
    ended: int = 0
    #: Sessions brought back from the store at start-up.
    restored: int = 0
