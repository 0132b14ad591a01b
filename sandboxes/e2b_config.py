"""How the ``e2b`` backend reaches E2B: one config shared by every session."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from typing import Any

import attrs

from protocol.errors import NotConfigured
from sandboxes.e2b_sdk import Connection


@attrs.frozen(kw_only=True)
class E2BConfig:
    """How the ``e2b`` backend reaches E2B, shared by every session."""

    api_key: str | None = attrs.field(default=None, repr=False)
    #: E2B template; the ``desktop`` template has Xvfb, XFCE, x11vnc and noVNC.
    template: str = "desktop"
    resolution: tuple[int, int] = (1280, 800)
    #: Seconds E2B keeps a sandbox alive past its last use (the safety net).
    sandbox_timeout: int = 3600
    #: The most one ``set_timeout`` may ask: 3,600 s on E2B's Hobby plan, 86,400 s on Pro.
    max_sandbox_timeout: int = 3600
    #: Bound on one SDK call (a click, a screenshot, a kill).
    call_timeout: float = 60.0
    #: Bound on creating a sandbox and booting its desktop.
    create_timeout: float = 180.0
    #: Bound on each ``apt-get``/``pip`` step of ``setup``.
    setup_timeout: float = 900.0
    #: Tags this server's sandboxes; stable across restarts so a restarted
    #: server recognises (and sweeps) the ones its predecessor left.
    instance_id: str = attrs.field(factory=socket.gethostname)
    #: Other SDK connection options (``api_url``, ``sandbox_url``, ``domain``,
    #: ``http_version``, ``retries``, ``request_timeout``); the SDK also reads
    #: them from ``E2B_*`` variables.
    connection: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: Any) -> E2BConfig:
        """A config keyed by ``E2B_API_KEY``; raises ``NotConfigured`` without one."""
        config = cls(api_key=environ.get("E2B_API_KEY") or None, **overrides)
        config.require_key()
        return config

    def require_key(self) -> str:
        """The API key, or ``NotConfigured`` saying how to provide one."""
        if not self.api_key:
            raise NotConfigured(
                "the e2b sandbox needs an E2B API key: set E2B_API_KEY "
                "(see https://e2b.dev/dashboard) or choose another --sandbox"
            )
        return self.api_key

    def connect(self) -> Connection:
        return Connection(self.require_key(), self.connection)

    def lifetime(self, seconds: float) -> int:
        """The ``set_timeout`` that covers *seconds* from now, within the plan's cap."""
        return max(1, min(self.max_sandbox_timeout, math.ceil(seconds)))
