"""The local backend's factory: one ``LocalSandbox`` per session, and the start-up checks.

``local_factory`` says at start-up what the host cannot enforce (a home
quota) and probes the cgroups the sandboxes share; the factory's
``sweep_orphans`` removes the session folders a killed server left behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog

from sandboxes.base import SandboxSpec
from sandboxes.local import cgroups, quota
from sandboxes.local.config import LocalConfig
from sandboxes.local.folders import sweep_orphans
from sandboxes.local.sandbox import LocalSandbox

logger = structlog.get_logger()


class LocalFactory:
    """Makes one ``LocalSandbox`` per session, all sharing *config*; see ``local_factory``."""

    def __init__(self, config: LocalConfig) -> None:
        self.config = config

    def __call__(self, spec: SandboxSpec) -> LocalSandbox:
        return LocalSandbox(spec, self.config)

    async def sweep_orphans(self, live: Mapping[str, str | None]) -> None:
        """Remove the session folders a server killed without its cleanup left, but the live ones'."""
        if self.config.root is not None:
            await asyncio.to_thread(sweep_orphans, self.config.root, frozenset(live))


def local_factory(config: LocalConfig) -> LocalFactory:
    """The local backend's factory; what the host cannot enforce is said now, at start-up."""
    if config.home_quota.bytes and (reason := quota.unavailable()) is not None:
        logger.warning("sandbox.home_quota_unenforced", reason=reason)
    if config.cgroups:
        cgroups.shared()
    return LocalFactory(config)
