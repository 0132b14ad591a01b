"""Each server instance's own range of session uids on this host.

Two servers on one host that shared a range took each other's uids and, on
a logout, killed each other's sessions (``kill(-1)`` as a uid ends every
process of it). So each instance gets a range of its own, derived from its
data folder (the same folder gets the same range after a restart, so a
restored session finds its home's owner again), and at start-up:

- a range that overlaps ``/etc/subuid`` or ``/etc/subgid`` (the ranges the
  host gave to containers and user namespaces) is never used;
- a range is held by an flock on ``/run/deskhive/ranges/<first uid>`` for
  the server's whole life, the data folder written in it: another instance
  holding it (another folder that hashed alike) makes this one probe the next
  range; the kernel drops the lock when the server dies, however it dies.

The range chosen is written into the sandboxes folder (``uid-range``), so a
restart keeps it even if an instance that started meanwhile took the slot
the hash names (this one then refuses to start, naming it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import time
from pathlib import Path

import attrs

from protocol.errors import SandboxBroken
from sandboxes.local.folders import make_session_folder
from sandboxes.local.identity import Identity

#: Ranges live in [SPACE_BASE, SPACE_BASE + SLOTS * RANGE_SIZE): above the
#: uids of accounts and of Debian's default subuid ranges (100000 + 65536 n).
SPACE_BASE = 1_000_000_000
RANGE_SIZE = 65_536
SLOTS = 16_000
RANGE_LOCKS = Path("/run/deskhive/ranges")
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
RECORD = "uid-range"
CHOWN = "/usr/bin/chown"
#: Seconds a session waits for its idle uid to be free again before it moves to another.
RETAKE_WAIT = 1.0
#: The descriptors holding this process's range locks, by first uid.
_HELD: dict[int, int] = {}


@attrs.frozen
class UidRange:
    """``count`` uids from ``first``, this instance's alone while it runs."""

    first: int
    count: int

    def overlaps(self, first: int, count: int) -> bool:
        return first < self.first + self.count and self.first < first + count


def subid_ranges(files: tuple[Path, ...] = SUBID_FILES) -> list[UidRange]:
    """The ranges ``/etc/subuid`` and ``/etc/subgid`` hand out (``name:first:count`` lines)."""
    found = []
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    found.append(UidRange(int(parts[1]), int(parts[2])))
    return found


def instance_range(
    root: Path, *, locks: Path = RANGE_LOCKS, subids: list[UidRange] | None = None
) -> UidRange:
    """This instance's range for the sandboxes folder *root*, locked for the life of the process (blocking).

    Raises ``SandboxBroken`` naming the reason when the recorded range cannot
    be used (now in a subuid range, or held by another running instance).
    """
    subids = subid_ranges() if subids is None else subids
    folder = os.fspath(root.resolve())
    recorded = _read_record(root)
    if recorded is not None:
        if any(recorded.overlaps(s.first, s.count) for s in subids):
            raise SandboxBroken(
                f"uids {_span(recorded)} recorded in {root / RECORD} overlap /etc/subuid or /etc/subgid"
            )
        if not _lock(recorded, folder, locks):
            raise SandboxBroken(
                f"uids {_span(recorded)} of {folder} are held by another deskhive server on this host "
                f"({_holder(recorded, locks)}): one data folder serves one server"
            )
        return recorded
    slot = int.from_bytes(hashlib.sha256(folder.encode()).digest()[:8], "big") % SLOTS
    for step in range(SLOTS):
        candidate = UidRange(SPACE_BASE + ((slot + step) % SLOTS) * RANGE_SIZE, RANGE_SIZE)
        if any(candidate.overlaps(s.first, s.count) for s in subids):
            continue
        if _lock(candidate, folder, locks):
            _write_record(root, candidate)
            return candidate
    raise SandboxBroken("no uid range is free on this host")


def _span(r: UidRange) -> str:
    return f"{r.first}..{r.first + r.count - 1}"


def _read_record(root: Path) -> UidRange | None:
    try:
        first, count = (int(word) for word in (root / RECORD).read_text().split())
    except (OSError, ValueError):
        return None
    return UidRange(first, count)


def _write_record(root: Path, r: UidRange) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{RECORD}.new"
    tmp.write_text(f"{r.first} {r.count}\n")
    os.replace(tmp, root / RECORD)


def _lock(r: UidRange, folder: str, locks: Path) -> bool:
    """Hold *r*'s lock file (writing *folder* in it); False if another process holds it."""
    if r.first in _HELD:
        return True  # this process holds it already (a second factory on the same folder)
    locks.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(locks / str(r.first), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{folder}\n".encode(), 0)
    _HELD[r.first] = fd
    return True


def _holder(r: UidRange, locks: Path) -> str:
    try:
        return "data folder " + (locks / str(r.first)).read_text().strip()
    except OSError:
        return "unknown"


def release_range(r: UidRange) -> None:
    """Give the range's lock back (tests; a server keeps it until it exits)."""
    fd = _HELD.pop(r.first, None)
    if fd is not None:
        os.close(fd)


def retake(
    identity: Identity, base: Path, *, uid_base: int, uid_count: int, owner: str, cap: int
) -> Identity:
    """The uid a session gave back while idle; or a new one, the session's files handed to it (blocking).

    The home's files are owned by the old uid, so that one is claimed first;
    only if something else took it meanwhile does the session move to a new
    uid, and then its home is chowned (links themselves, never followed).
    """
    # Processes SIGKILLed as the uid a moment ago may not be gone yet: a short, bounded wait.
    deadline = time.monotonic() + RETAKE_WAIT
    while True:
        try:
            return Identity.claim(identity.uid, owner=owner, cap=cap)
        except SandboxBroken:
            if time.monotonic() >= deadline:
                break
        time.sleep(0.05)  # in a worker thread, never on the loop
    new = Identity.acquire(uid_base, uid_count, owner=owner, cap=cap)
    try:
        make_session_folder(base, new.uid, new.gid)
        _chown_tree(base / "home", new.uid, new.gid)
    except BaseException:
        new.release()
        raise
    return new


def _chown_tree(home: Path, uid: int, gid: int) -> None:
    # GNU chown -R walks physically (-P, the default): no link is followed,
    # and -h changes links themselves. Nothing of the session runs meanwhile.
    done = subprocess.run(
        [CHOWN, "-R", "-P", "-h", "--", f"{uid}:{gid}", os.fspath(home)],
        stdin=subprocess.DEVNULL, capture_output=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip()[-200:]
        raise SandboxBroken(f"cannot hand the home {home} to uid {uid}: {detail}")
