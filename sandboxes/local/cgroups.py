"""One control group per session: its processes bounded as a whole.

Memory (the session's tmpfs pages included: the kernel charges them to the
cgroup of whoever wrote them), the number of processes, and a CPU weight equal
for every session. Past the memory bound the kernel's OOM killer ends a
process of that session only; past the process bound ``fork`` fails with
``EAGAIN``; under CPU contention each busy session gets the same share,
however many processes it runs.

Session cgroups live under the server's own cgroup, in ``deskhive-<pid>``
(one per server instance), so they stay inside whatever bounds the host put
on the server itself and two servers never touch each other's:

- cgroup v2 (one hierarchy, ``/sys/fs/cgroup/cgroup.controllers`` exists):
  ``memory.max``, ``memory.swap.max``, ``pids.max``, ``cpu.weight``. A cgroup
  with processes cannot hand controllers to children, so the server first
  moves itself into a leaf ``deskhive-<pid>/server`` when it is not in the
  root cgroup.
- cgroup v1 (a mount per controller): ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes``, so swap does not extend it), ``pids.max``,
  ``cpu.shares``.

Where neither can be used (no root, no controllers) :func:`probe` logs
``sandbox.cgroups_unavailable`` once and sessions run with per-process limits
only. Processes join their session's cgroup before their first instruction:
see :func:`~sandboxes.local.jail.spawn`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from pathlib import Path

import attrs
import structlog

from protocol.errors import SandboxBroken
from sandboxes.local.config import LocalConfig

logger = structlog.get_logger()

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu")
#: Rounds of "read the members, SIGKILL them" before giving up on a cgroup
#: whose processes keep forking (the pid bound caps what each round meets).
KILL_ROUNDS = 20
#: Bound on waiting for a killed session's processes to be gone from its cgroup.
CLOSE_TIMEOUT = 2.0
POLL = 0.01


@attrs.frozen(kw_only=True)
class Bounds:
    """What one session may use in total."""

    memory_bytes: int
    processes: int
    #: cgroup v2's scale (1..10000, 100 is the kernel's default); v1 shares scale it by 10.24.
    cpu_weight: int


@attrs.frozen
class SessionCgroup:
    """A session's cgroup: one folder per hierarchy (v1) or one folder (v2)."""

    folders: tuple[Path, ...]
    #: The instance folder each one lives in, tidied when its last session goes.
    parents: tuple[Path, ...]

    def add(self, pid: int) -> None:
        """Move process *pid* (and its future children) into the session's cgroup."""
        for folder in self.folders:
            _write(folder / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        """Every process in the cgroup now; the kernel keeps this list, no /proc scan."""
        found: set[int] = set()
        for folder in self.folders:
            with contextlib.suppress(OSError, ValueError):
                found |= {int(line) for line in (folder / "cgroup.procs").read_text().split()}
        return found

    def kill(self) -> None:
        """SIGKILL every process of the session (``cgroup.kill`` where the kernel has it)."""
        killer = self.folders[0] / "cgroup.kill"
        if killer.exists():
            with contextlib.suppress(OSError):
                _write(killer, "1")
                return
        for _ in range(KILL_ROUNDS):
            members = self.pids() - {os.getpid()}
            if not members:
                return
            for pid in members:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove the folders (empty once the processes are reaped); whether all went."""
        gone = True
        for folder in self.folders:
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        for parent in self.parents:
            # Busy while other sessions of this server run: that is fine.
            with contextlib.suppress(OSError):
                parent.rmdir()
        return gone


@attrs.frozen
class CgroupHost:
    """Where this server makes its sessions' cgroups, and how to bound them."""

    version: int
    #: Per hierarchy: the server instance's folder, under the server's own cgroup.
    parents: tuple[Path, ...]

    def create(self, name: str, bounds: Bounds) -> SessionCgroup:
        """A new cgroup for one session, bounded; raises ``OSError`` if the host refuses."""
        folders = tuple(parent / name for parent in self.parents)
        made = SessionCgroup(folders, self.parents)
        try:
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
            if self.version == 2:
                _bound_v2(folders[0], bounds)
            else:
                _bound_v1(folders, bounds)
        except OSError:
            made.remove()
            raise
        return made


def for_session(config: LocalConfig, name: str) -> SessionCgroup | None:
    """A bounded cgroup for the session called *name*; ``None`` where the host has none for us."""
    host = shared() if config.cgroups else None
    if host is None:
        return None
    bounds = Bounds(
        memory_bytes=config.session_memory_bytes,
        processes=config.session_processes,
        cpu_weight=config.session_cpu_weight,
    )
    try:
        return host.create(name, bounds)
    except OSError as exc:
        raise SandboxBroken(f"cannot create the session's cgroup: {exc.strerror or exc}") from exc


async def close(cgroup: SessionCgroup) -> None:
    """Kill whatever still runs in *cgroup*, then remove it once the kernel has let go of it."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            while True:
                cgroup.kill()
                if cgroup.remove():
                    return
                await asyncio.sleep(POLL)
    except TimeoutError:
        logger.warning(
            "sandbox.cgroup_busy", folders=[str(f) for f in cgroup.folders], pids=sorted(cgroup.pids())
        )


def _bound_v2(folder: Path, bounds: Bounds) -> None:
    _write(folder / "memory.max", str(bounds.memory_bytes))
    with contextlib.suppress(FileNotFoundError):  # no swap accounting on this host
        _write(folder / "memory.swap.max", "0")
    _write(folder / "pids.max", str(bounds.processes))
    _write(folder / "cpu.weight", str(bounds.cpu_weight))


def _bound_v1(folders: tuple[Path, ...], bounds: Bounds) -> None:
    memory, pids, cpu = folders
    _write(memory / "memory.limit_in_bytes", str(bounds.memory_bytes))
    with contextlib.suppress(FileNotFoundError):
        _write(memory / "memory.memsw.limit_in_bytes", str(bounds.memory_bytes))
    _write(pids / "pids.max", str(bounds.processes))
    _write(cpu / "cpu.shares", str(max(2, bounds.cpu_weight * 1024 // 100)))


def _write(path: Path, text: str) -> None:
    # A cgroup file takes one write(2); open without O_CREAT, so a missing
    # controller file is an error instead of a new plain file.
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def own_cgroups(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; cgroup v2's line under ``""``."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        _id, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            found[name] = path
    return found


@functools.cache
def shared() -> CgroupHost | None:
    """This server's cgroups, probed once (a host-wide fact, like the uid range)."""
    host = probe()
    if host is not None:
        logger.info("sandbox.cgroups", version=host.version, parents=[str(p) for p in host.parents])
    return host


def probe(root: Path = CGROUP_ROOT, *, pid: int | None = None) -> CgroupHost | None:
    """This host's cgroups as this server can use them; ``None``, with a warning, if it cannot."""
    pid = os.getpid() if pid is None else pid
    try:
        own = own_cgroups(Path(f"/proc/{pid}/cgroup").read_text())
        host = (
            _probe_v2(root, own, pid) if (root / "cgroup.controllers").exists() else _probe_v1(root, own, pid)
        )
    except (OSError, ValueError) as exc:
        logger.warning(
            "sandbox.cgroups_unavailable",
            reason=str(exc),
            consequence="sessions are bounded per process only, not as a whole (memory, processes, CPU)",
        )
        return None
    return host


def _probe_v1(root: Path, own: dict[str, str], pid: int) -> CgroupHost:
    parents = []
    for name in CONTROLLERS:
        mount = root / name
        if name not in own or not (mount / "cgroup.procs").exists():
            raise ValueError(f"the cgroup v1 {name} controller is not mounted at {mount}")
        base = mount / own[name].lstrip("/")
        _tidy(base, pid)
        parents.append(base / f"deskhive-{pid}")
    # Fails here, at start-up, when the server may not make cgroups (not
    # root); made again by each session, removed with the last one.
    for parent in parents:
        parent.mkdir(exist_ok=True)
        parent.rmdir()
    return CgroupHost(1, tuple(parents))


def _probe_v2(root: Path, own: dict[str, str], pid: int) -> CgroupHost:
    base = root / own[""].lstrip("/")
    available = set((base / "cgroup.controllers").read_text().split())
    if missing := set(CONTROLLERS) - available:
        raise ValueError(f"cgroup v2 at {base} lacks the controllers {sorted(missing)}")
    _tidy(base, pid)
    parent = base / f"deskhive-{pid}"
    parent.mkdir(exist_ok=True)
    if base != root:
        # No processes in a cgroup that hands controllers down: the server
        # itself moves into a leaf of its own first.
        leaf = parent / "server"
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(pid))
    enable = " ".join(f"+{c}" for c in CONTROLLERS)
    for folder in (base, parent):
        _write(folder / "cgroup.subtree_control", enable)
    return CgroupHost(2, (parent,))


def _tidy(base: Path, pid: int) -> None:
    """Remove empty session cgroups left by servers of this host that are gone (SIGKILL)."""
    with contextlib.suppress(OSError):
        for folder in base.glob("deskhive-*"):
            other = folder.name.removeprefix("deskhive-")
            if not other.isdigit() or int(other) == pid or Path(f"/proc/{other}").exists():
                continue
            for child in folder.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                folder.rmdir()
