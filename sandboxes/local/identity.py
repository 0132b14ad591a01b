"""Who a session's processes run as: its own uid, and the pools numbers come from.

When the server runs as root, each session gets an unprivileged uid of its
own, locked host-wide while the session holds it; ``kill_all`` ends every
process of it. The ranges uids come from are in ``uids``.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from protocol.errors import SandboxBroken

SETPRIV = "/usr/bin/setpriv"


class NumberPool:
    """Numbers (uids, X displays) handed out at most once in this process.

    They are host-wide resources, so one pool per process is the right scope.
    An owner (a username) may hold at most *cap* numbers at once, so that one
    user cannot drain the pool for everyone. Thread-safe: uids are taken in a
    thread, since checking that one is free scans the host's processes.
    """

    def __init__(self) -> None:
        self._taken: set[int] = set()
        self._owners: dict[int, str] = {}
        #: Where the next search of each range starts: right after the last number
        #: handed out, so a number given back is the last one handed out again
        #: (a session that gave its uid back while idle most likely gets it back).
        self._next: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def take(
        self, first: int, count: int, is_free: Callable[[int], bool], *, owner: str = "", cap: int = 0
    ) -> int:
        start = self._next.get((first, count), 0)
        for i in range(count):
            n = first + (start + i) % count
            if self.take_exact(n, is_free, owner=owner, cap=cap):
                self._next[(first, count)] = (n - first + 1) % count
                return n
        raise SandboxBroken(f"no free number left in {first}..{first + count - 1}")

    def take_exact(self, n: int, is_free: Callable[[int], bool], *, owner: str = "", cap: int = 0) -> bool:
        """Take *n* itself if it is free; ``SandboxBroken`` if *owner* holds *cap* already."""
        with self._lock:
            if cap and owner and sum(1 for o in self._owners.values() if o == owner) >= cap:
                raise SandboxBroken(f"user {owner!r} already holds {cap} sandbox uids, the most one user may")
            if n in self._taken:
                return False
            self._taken.add(n)
        if is_free(n):
            if owner:
                with self._lock:
                    self._owners[n] = owner
            return True
        self.give(n)
        return False

    def give(self, n: int) -> None:
        with self._lock:
            self._taken.discard(n)
            self._owners.pop(n, None)


UIDS = NumberPool()
DISPLAYS = NumberPool()
#: Signals every process the caller may signal (all of its uid's, since it has
#: no capability), itself excepted: ``kill(2)`` with pid -1. The shell is
#: Debian's dash, whose ``kill`` is built in. setpriv (util-linux) changes the
#: uid after exec, so the server starts it with vfork: a fork with a uid change
#: would copy the whole server's page tables, stalling its other threads.
_KILL_ALL = ("/bin/sh", "-c", "kill -s KILL -- -1", "kill-all")
_KILL_ALL_TIMEOUT = 5.0


def uids_in_use() -> set[int]:
    """The real uids of every live process on the host: one scan of /proc (blocking)."""
    return {uid for pid in host_pids() if (uid := real_uid(pid)) is not None}


def uid_is_free(uid: int, in_use: set[int]) -> bool:
    """A uid no account has and no process in *in_use* runs as."""
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return uid not in in_use
    return False


#: One lock file per uid in use by a session of any server on this host.
UID_LOCKS = Path("/run/deskhive/uids")
#: The descriptors holding this process's uid locks, by uid.
_UID_LOCK_FDS: dict[int, int] = {}


def lock_uid(uid: int) -> int | None:
    """Hold an flock on *uid*'s lock file; its descriptor, or ``None`` if another holds it.

    A uid is taken before any process runs as it, so the scan of /proc alone
    cannot keep two servers on one host from taking the same one. The kernel
    drops the lock when its holder dies, however it dies.
    """
    try:
        UID_LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(UID_LOCKS / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SandboxBroken(f"cannot lock uid {uid} in {UID_LOCKS}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def kill_uid(uid: int) -> None:
    """SIGKILL every process of *uid* with ``kill(-1)`` run as *uid* (blocking: a process start).

    No scan of /proc: the kernel finds them, in every namespace, since a
    process's uid is the same seen from any of them. (Its answer says
    nothing: ``kill(-1)`` succeeds whenever any other process exists.)
    """
    if uid == 0 or uid == os.getuid():
        raise ValueError(f"refusing to signal every process of uid {uid}")
    try:
        subprocess.run(
            [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *_KILL_ALL],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=_KILL_ALL_TIMEOUT, env={"PATH": "/usr/bin:/bin"}, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxBroken(f"cannot signal the processes of uid {uid}: {exc}") from exc


def _free_now() -> Callable[[int], bool]:
    """Whether a uid is free, from one scan of /proc for all candidates (in the caller's thread).

    A uid some process of the host runs as (another server's session, a
    container's mapped user) is never shared, and never killed by kill_all;
    a free one is locked host-wide as it is found.
    """
    in_use = uids_in_use()

    def free(n: int) -> bool:
        if not uid_is_free(n, in_use) or (fd := lock_uid(n)) is None:
            return False
        _UID_LOCK_FDS[n] = fd
        return True

    return free


@attrs.frozen(kw_only=True)
class Identity:
    """The host user a session's processes run as."""

    uid: int
    gid: int
    #: True when the server is root and this uid was taken from ``UIDS``.
    dropped: bool

    @classmethod
    def acquire(cls, uid_base: int, uid_count: int, *, owner: str = "", cap: int = 0) -> Identity:
        """A uid of the session's own (blocking when the server is root: run it in a thread).

        *owner* (the username) may hold *cap* uids at most (0: no bound).
        """
        if os.geteuid() != 0:
            return cls(uid=os.getuid(), gid=os.getgid(), dropped=False)
        uid = UIDS.take(uid_base, uid_count, _free_now(), owner=owner, cap=cap)
        return cls(uid=uid, gid=uid, dropped=True)

    @classmethod
    def claim(cls, uid: int, *, owner: str = "", cap: int = 0) -> Identity:
        """Take *uid* again (a restored session's, whose home it owns); ``SandboxBroken`` if it is not free.

        Free means what ``acquire`` means: no account has it, no process of the
        host runs as it, no server on the host holds its lock. Blocking.
        """
        if os.geteuid() != 0:
            return cls.acquire(0, 0)
        if not UIDS.take_exact(uid, _free_now(), owner=owner, cap=cap):
            raise SandboxBroken(f"uid {uid} is in use on this host; it cannot be taken again")
        return cls(uid=uid, gid=uid, dropped=True)

    def release(self) -> None:
        """Give the uid back, here and host-wide; a second call does nothing."""
        if not self.dropped:
            return
        fd = _UID_LOCK_FDS.pop(self.uid, None)
        if fd is not None:
            os.close(fd)
            UIDS.give(self.uid)

    def kill_all(self) -> None:
        """SIGKILL every process of this session's own uid (blocking).

        Only for a dropped identity: without one the uid is the server's.
        """
        if not self.dropped:
            raise ValueError("the session has no uid of its own")
        kill_uid(self.uid)

    def popen_kwargs(self) -> dict[str, Any]:
        """``Popen`` arguments that switch to this user before exec."""
        if not self.dropped:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def host_pids() -> Iterator[int]:
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                yield int(entry.name)


def real_uid(pid: int) -> int | None:
    """The real uid of a live process; ``None`` for zombies and the gone."""
    uid = None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"State:") and line.split()[1] in (b"Z", b"X"):
                    return None
                if line.startswith(b"Uid:"):
                    uid = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return uid


def wait_uid_gone(uid: int, timeout: float) -> bool:
    """Whether every process of *uid* is gone within *timeout* (blocking: scans of /proc, in a thread).

    SIGKILLed processes take a moment to exit (a jail's PID 1 takes its whole
    namespace with it), and a uid is given back only once none is left.
    """
    deadline = time.monotonic() + timeout
    while uid in uids_in_use():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)  # in a worker thread, never on the loop
    return True
