"""Settings of the local sandbox backend, shared by every session it serves."""

from __future__ import annotations

from pathlib import Path

import attrs

from sandboxes.base import Limits
from sandboxes.local.quota import HomeQuota


@attrs.frozen(kw_only=True)
class LocalConfig:
    """How local sandboxes are built; one value serves every session."""

    #: Parent of the per-session folders (``<root>/<session_id>``); ``None``
    #: puts them in each session's own ``SandboxSpec.data_dir``.
    root: Path | None = None
    #: Resource limits of every command (CPU, memory, processes, file size).
    limits: Limits = attrs.field(factory=Limits)
    #: Give each jail an outbound-only network of its own (slirp4netns; see
    #: ``network``), never the host's; ``Limits.network`` also turns it on.
    network: bool = False
    #: Desktop size in pixels, and colour depth.
    screen: tuple[int, int] = (1280, 800)
    depth: int = 24
    #: When the server runs as root, sessions get uids from this range.
    uid_base: int = 200_000
    uid_count: int = 10_000
    #: Uids one username may hold at once (0: no bound): one per live session.
    uids_per_user: int = 16
    #: X display numbers are handed out from here up (``:100``, ``:101``...).
    display_base: int = 100
    display_count: int = 1000
    #: Light window manager started on each desktop.
    window_manager: tuple[str, ...] = ("openbox",)
    #: Browser used by ``open`` and by ``launch("browser")``.
    browser: str = "chromium"
    #: Size of each jail's private ``/tmp``, ``/dev/shm`` and ``/`` (tmpfs
    #: mounts: their pages also count toward the session's memory bound).
    tmp_bytes: int = 512 * 1024**2
    shm_bytes: int = 256 * 1024**2
    root_bytes: int = 16 * 1024**2
    #: Bounds on each session as a whole (all its processes together, in
    #: one cgroup): memory including its tmpfs, processes, and a CPU weight
    #: (cgroup v2's scale, equal for every session so each busy one gets the
    #: same share). ``cgroups=False`` keeps the per-process limits only.
    cgroups: bool = True
    session_memory_bytes: int = 4 * 1024**3
    session_processes: int = 512
    session_cpu_weight: int = 100
    #: Size and inodes of each home (an image of its own, see ``quota``);
    #: ``HomeQuota()`` (0 bytes) leaves homes unbounded.
    home_quota: HomeQuota = attrs.field(factory=HomeQuota)
    #: Bound on the desktop's start, from spawning Xvfb to x11vnc answering.
    start_timeout: float = 10.0
    #: Time a process gets between SIGTERM and SIGKILL.
    kill_grace: float = 0.5
    #: Bound on each desktop helper (screenshot, xdotool).
    tool_timeout: float = 15.0
    #: Bound on ``pip install`` during ``setup``.
    pip_timeout: float = 300.0

    @property
    def network_on(self) -> bool:
        return self.network or self.limits.network
