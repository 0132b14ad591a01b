"""What a local session holds on the host: a uid of its own and its folder.

``prepare`` takes the uid (a restored session's own again, whatever the dead
server left under it killed first) and makes the session's folder, and
``new_jail`` gives the session its cgroup; ``retake`` gets back a uid the idle
session gave up; ``kill_session`` ends every process of it. The blocking parts
run in a thread, by ``off_loop`` and ``in_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import signal
from collections.abc import Callable
from pathlib import Path

from protocol.errors import SandboxBroken
from sandboxes.base import SandboxSpec
from sandboxes.local import cgroups, portal, quota, uids
from sandboxes.local.config import LocalConfig
from sandboxes.local.folders import make_session_folder
from sandboxes.local.identity import Identity, kill_uid
from sandboxes.local.jail import Jail, session_pids


def previous_id(spec: SandboxSpec) -> str | None:
    """The restored sandbox's own id, if the store kept one of ours (it is the processes' marker)."""
    previous = spec.previous_id or ""
    tail = previous.removeprefix("local-")
    if previous.startswith("local-") and len(tail) == 12 and all(c in "0123456789abcdef" for c in tail):
        return previous
    return None


def prepare(base: Path, config: LocalConfig, owner: str, *, restored: bool) -> Identity:
    """Take a uid and make the session's folders (blocking)."""
    identity = _identity(base, config, owner, restored=restored)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        if config.root is not None:
            # Enterable, not listable: session ids are nobody else's to see.
            config.root.chmod(0o711)
        if identity.dropped:
            portal.ensure()  # jails reach the session's folder there, not by its path
        make_session_folder(base, identity.uid, identity.gid)
        if config.home_quota.bytes:
            quota.mount_home(base, identity.uid, identity.gid, config.home_quota)
    except BaseException as exc:
        identity.release()
        if not isinstance(exc, OSError):
            raise
        raise SandboxBroken(f"cannot create the sandbox folder {base}: {exc.strerror}") from exc
    return identity


def retake(previous: Identity, base: Path, config: LocalConfig, owner: str) -> Identity:
    """*previous*'s uid again, or a new one with the home handed over (blocking; see ``uids.retake``)."""
    return uids.retake(
        previous, base, uid_base=config.uid_base, uid_count=config.uid_count, owner=owner,
        cap=config.uids_per_user,
    )  # fmt: skip


def _identity(base: Path, config: LocalConfig, owner: str, *, restored: bool) -> Identity:
    """A uid for the session; a restored one takes back its home's owner (blocking)."""
    home_owner = _home_owner(base, config) if restored else None
    if home_owner is not None:
        # The dead server's processes of that uid go first; then it is ours
        # again, or the home moves to a new one.
        kill_uid(home_owner)
        return retake(Identity(uid=home_owner, gid=home_owner, dropped=True), base, config, owner)
    return Identity.acquire(config.uid_base, config.uid_count, owner=owner, cap=config.uids_per_user)


def _home_owner(base: Path, config: LocalConfig) -> int | None:
    """The uid the restored home belongs to, if it is one of this server's sandbox uids."""
    if os.geteuid() != 0:
        return None
    try:
        uid = (base / "home").stat().st_uid
    except OSError:
        return None
    first, count = config.uid_base, config.uid_count
    return uid if first <= uid < first + count else None


def new_jail(identity: Identity, config: LocalConfig, marker: str, username: str, base: Path) -> Jail:
    """The session's jail as *identity*, in a cgroup of its own; the uid given back if that fails."""
    try:
        cgroup = cgroups.for_session(config, marker)
    except BaseException:
        identity.release()
        raise
    return Jail(
        identity=identity, username=username, marker=marker, tmp_bytes=config.tmp_bytes,
        shm_bytes=config.shm_bytes, root_bytes=config.root_bytes, cgroup=cgroup, base=base,
    )  # fmt: skip


async def off_loop(take: Callable[[], Identity]) -> Identity:
    """The uid *take* gets in a thread (it starts processes).

    Shielded, so that a cancelled caller still gives back the uid the thread may take.
    """
    made = asyncio.get_running_loop().run_in_executor(None, take)
    try:
        return await asyncio.shield(made)
    except asyncio.CancelledError:
        made.add_done_callback(_release_identity)
        raise


def _release_identity(made: asyncio.Future[Identity]) -> None:
    if not made.cancelled() and made.exception() is None:
        made.result().release()


def in_thread(loop: asyncio.AbstractEventLoop, work: Callable[[], None]) -> asyncio.Future[None] | None:
    """*work* started in the loop's executor, or done right here when that is shut down."""
    try:
        return loop.run_in_executor(None, contextvars.copy_context().run, work)
    except RuntimeError:  # the loop is closing: better late on the loop than never
        work()
        return None


def kill_session(jail: Jail) -> None:
    """SIGKILL every process of the session (blocking)."""
    if jail.identity.dropped:
        jail.identity.kill_all()
        return
    # No uid of its own (a server not run as root): find them by marker.
    for pid in session_pids(jail):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
