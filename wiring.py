"""From ``Settings`` to the objects the server runs: configs, the sandbox factory, the model.

Kept apart from the request handlers so that what an option does is read in
one place, and so that a test can build the same objects without a server.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import aiohttp
import attrs

import store
from actors.jobs import JobConfig
from actors.session import ActorConfig
from actors.workflows import Workflow
from config import Settings
from protocol.errors import NotConfigured, SandboxBroken
from sandboxes.base import Limits, SandboxFactory
from supervisor import SupervisorConfig

if TYPE_CHECKING:
    from agent import ModelConfig


def supervisor_config(
    settings: Settings, workflows: Mapping[str, Workflow], http: aiohttp.ClientSession
) -> SupervisorConfig:
    """The supervisor's, the actors' and the jobs' bounds, as the settings say."""
    return SupervisorConfig(
        idle_timeout=settings.idle_timeout,
        sweep_interval=settings.sweep_interval,
        sessions_per_user=settings.sessions_per_user,
        max_sessions=settings.max_sessions,
        max_desktops=settings.max_desktops,
        desktops_per_user=settings.desktops_per_user,
        data_dir=settings.data_dir,
        store_url=settings.store or store.default_url(settings.data_dir),
        actor=ActorConfig(
            mailbox_size=settings.mailbox_size,
            journal_size=settings.journal_size,
            idle_timeout=settings.idle_timeout,
            jobs=JobConfig(
                command_timeout=settings.command_timeout,
                output_limit=settings.output_limit,
                model=model_config(settings),
                workflows=workflows,
                http=http,
            ),
        ),
    )


def model_config(settings: Settings) -> ModelConfig | None:
    """The agent's model endpoint, or ``None``: ``run_task`` then says none is configured."""
    if not settings.model_url:
        return None
    from agent import ModelConfig  # the agent's modules load only when a model is configured

    return ModelConfig(
        url=settings.model_url,
        model=settings.model,
        api_key=settings.model_key,
        timeout=settings.model_timeout,
        max_steps=settings.agent_max_steps,
        task_timeout=settings.agent_timeout,
        retries=settings.model_retries,
        keep_images=settings.agent_images,
        image_width=settings.agent_image_width,
        image_height=settings.agent_image_height,
        image_format="png" if settings.agent_image_format == "png" else "jpeg",
        coordinate_grid=settings.agent_coordinate_grid,
    )


def sandbox_factory(settings: Settings) -> SandboxFactory:
    """The backend ``--sandbox`` names; imported only when chosen."""
    if settings.sandbox == "null":
        from sandboxes.null import NullSandbox

        return NullSandbox
    if settings.sandbox == "e2b":
        from sandboxes.e2b import E2BConfig, e2b_factory

        # E2B's own timeout, renewed by every call and each sweep, follows the
        # session's idle timeout: the sandbox outlives the session, never the other way.
        return e2b_factory(E2BConfig.from_env(sandbox_timeout=max(1, math.ceil(settings.idle_timeout))))
    from sandboxes.local import LocalConfig, local_factory, uids
    from sandboxes.local.quota import HomeQuota

    root = settings.data_dir / "sandboxes"
    # Enterable, not listable: session ids are nobody else's to see. Jails
    # reach their folders through a mount of their own (sandboxes.local.portal),
    # so the folders above need no right for the sessions' uids.
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)
    limits = Limits(
        cpu_seconds=settings.command_cpu_seconds,
        memory_bytes=settings.command_memory,
        processes=settings.command_processes,
        file_bytes=settings.command_file_size,
    )
    config = LocalConfig(
        root=root, limits=limits, network=settings.sandbox_network, uids_per_user=settings.sessions_per_user,
        home_quota=HomeQuota(*settings.home_quota),
    )  # fmt: skip
    if os.geteuid() == 0:
        # This instance's own uids: never another server's, never a container's.
        try:
            uid_range = uids.instance_range(root)
        except SandboxBroken as exc:
            raise NotConfigured(f"data folder {settings.data_dir}: {exc.message}") from None
        config = attrs.evolve(config, uid_base=uid_range.first, uid_count=uid_range.count)
    return local_factory(config)
