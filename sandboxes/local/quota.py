"""A disk and inode bound on a session's home: a filesystem image of its own.

The data folder's filesystem is the host's (ext4 without project quotas on
the machines we know), so a home written without bound filled the host's
disk. Instead, with a quota each home is an ext4 image (``home.img`` in the
session's folder, root's 0600, sparse: it takes only what is written)
loop-mounted on ``home/`` with ``nosuid,nodev``. Past its size or its inode
count the session's own writes fail with ``ENOSPC``; the host's disk is not
touched further. A restart finds the home still mounted, or mounts its
image again; removing a session's folder unmounts whatever is mounted under
it first (``unmount_under``).

Where the image cannot be made or mounted (a server not run as root, no
loop device the host lets us use), the home is a plain folder and ``sandbox.home_quota_unenforced``
says so, at start-up and for each session it concerns.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import subprocess
from pathlib import Path

import attrs
import structlog

from protocol.errors import SandboxBroken

logger = structlog.get_logger()

MKFS = "/usr/sbin/mkfs.ext4"
MOUNT = "/usr/bin/mount"
UMOUNT = "/usr/bin/umount"
IMAGE = "home.img"
_TIMEOUT = 30.0
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


@attrs.frozen
class HomeQuota:
    """Bounds on one home: bytes and files (inodes); 0 bytes means none."""

    bytes: int = 0
    inodes: int = 0


def unavailable() -> str | None:
    """Why home images cannot be used on this host; ``None`` when they can."""
    if os.geteuid() != 0:
        return "the server does not run as root (mounting a home's image needs it)"
    if not os.path.exists("/dev/loop-control"):
        return "this host has no loop devices (/dev/loop-control)"
    for program in (MKFS, MOUNT, UMOUNT):
        if not os.path.exists(program):
            return f"{program} is missing"
    return None


def mount_home(base: Path, uid: int, gid: int, quota: HomeQuota) -> bool:
    """Mount the session's image (made on first use) on ``base/home``; whether the home is bounded (blocking).

    A home that already holds files but has no image (made before quotas)
    is left as it is, with a warning.
    """
    home, image = base / "home", base / IMAGE
    if os.path.ismount(home):
        return True
    reason = unavailable()
    if reason is None and not image.exists() and any(os.scandir(home)):
        reason = "the home was made before its quota and holds files"
    if reason is None:
        try:
            if not image.exists():
                _make_image(image, uid, gid, quota)
            _free_loop_node()
            _run(MOUNT, "-t", "ext4", "-o", "loop,nosuid,nodev", "--", os.fspath(image), os.fspath(home))
        except SandboxBroken as exc:
            reason = str(exc)
    if reason is not None:
        logger.warning("sandbox.home_quota_unenforced", home=str(home), reason=reason)
        return False
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
        with contextlib.suppress(OSError):
            os.rmdir("lost+found", dir_fd=fd)  # mkfs's; the home is the session's alone
    finally:
        os.close(fd)
    return True


LOOP_CTL_GET_FREE = 0x4C82
LOOP_MAJOR = 7


def _free_loop_node() -> None:
    """Make sure the next free loop device has its node: a container's /dev may hold only loop0..7.

    The kernel makes loop devices on demand (``LOOP_CTL_GET_FREE``, which
    mount's ``-o loop`` asks for too), but a /dev without udev gets no node.
    """
    with contextlib.suppress(OSError):
        fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            n = fcntl.ioctl(fd, LOOP_CTL_GET_FREE)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.mknod(f"/dev/loop{n}", 0o660 | stat.S_IFBLK, os.makedev(LOOP_MAJOR, n))


def _make_image(image: Path, uid: int, gid: int, quota: HomeQuota) -> None:
    tmp = image.with_name(IMAGE + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, quota.bytes)  # sparse
    finally:
        os.close(fd)
    options = f"root_owner={uid}:{gid},lazy_itable_init=1,lazy_journal_init=1"
    # Not more inodes than the bound (mkfs rounds up to a whole group's worth).
    inodes = ["-N", str(quota.inodes)] if quota.inodes else []
    _run(MKFS, "-q", "-F", "-m", "0", *inodes, "-E", options, "--", os.fspath(tmp))
    os.replace(tmp, image)


def _run(*argv: str) -> None:
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=_TIMEOUT, env=_ENV, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxBroken(f"{argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip()[-200:]
        raise SandboxBroken(f"{os.path.basename(argv[0])} failed with exit code {done.returncode}: {detail}")


def mounts_under(path: Path) -> list[str]:
    """Mount points strictly under *path*, deepest first (from /proc/self/mountinfo)."""
    top = os.fspath(path).rstrip("/") + "/"
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                point = _unescape(fields[4])
                if point.startswith(top):
                    found.append(point)
    return sorted(found, key=len, reverse=True)


def _unescape(raw: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    text = os.fsdecode(raw)
    for code in ("040", "011", "012", "134"):
        text = text.replace("\\" + code, chr(int(code, 8)))
    return text


def unmount_under(path: Path) -> None:
    """Detach every mount under *path* (its processes are gone); blocking, never raises."""
    for point in mounts_under(path):
        try:
            _run(UMOUNT, "--lazy", "--", point)
        except SandboxBroken as exc:
            logger.warning("sandbox.unmount_failed", path=point, reason=str(exc))
