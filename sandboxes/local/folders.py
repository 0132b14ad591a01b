"""The local sandbox's folders on the host: checking, removing, sweeping.

A session's home is the session's to fill: it may hold hundreds of thousands
of entries, folders nested thousands deep, and symlinks to anywhere. So
removing one never recurses in Python (``shutil.rmtree`` does, one frame per
level, and raises ``RecursionError`` at about a thousand), never follows a
link, and keeps a bounded number of descriptors open whatever the depth. It
is blocking work: callers run it in a thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import subprocess
from pathlib import Path

import attrs
import structlog

from sandboxes.local.quota import unmount_under

logger = structlog.get_logger()

#: The names session folders have (``{username}_{unix seconds}_{16 hex}``).
SESSION_FOLDER = re.compile(r"[A-Za-z0-9._-]{1,32}_[0-9]+_[0-9a-f]{16}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RM = "/usr/bin/rm"
#: Errors named in the log line of one removal (their count is always given).
_ERRORS_KEPT = 5


#: The session's folders its uid owns, right under the session's folder, and
#: root's read-only ones (see ``hostpaths`` on why nothing deeper is theirs).
SESSION_OWNED = ("home", "x11", "vnc")
ROOT_OWNED = ("auth",)


def make_session_folder(base: Path, uid: int, gid: int) -> None:
    """Create (or tighten) a session's folder: root's, 0710 with the session's group; nothing followed.

    No other host account may enter it: not to list sessions, not to reach
    the desktop's socket, not to read the home. The session's own uid must
    pass through it (group x): bwrap, running as that uid, resolves every
    bind source by path (see ``portal``). An existing entry that is a link
    is refused.
    """
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    top = os.open(base, _DIR_FLAGS)
    try:
        os.fchown(top, os.geteuid(), gid)
        os.fchmod(top, 0o710)
        for name in SESSION_OWNED + ROOT_OWNED:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=top)
            fd = os.open(name, _DIR_FLAGS, dir_fd=top)
            try:
                if name in SESSION_OWNED:
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, 0o700)
                else:
                    os.fchown(fd, os.geteuid(), os.getegid())
                    os.fchmod(fd, 0o755)  # its cookie is the session's to read, in its jails
            finally:
                os.close(fd)
    finally:
        os.close(top)


@attrs.define
class _Level:
    """One folder on the way down: its name in its parent, its identity, what is left in it."""

    name: str
    ident: tuple[int, int]
    subfolders: list[str]


@attrs.define
class Removal:
    """What one ``remove_tree`` did: entries removed, and the errors it went past."""

    removed: int = 0
    failed: int = 0
    errors: list[str] = attrs.field(factory=list)

    def note(self, path: str, exc: OSError) -> None:
        self.failed += 1
        if len(self.errors) < _ERRORS_KEPT:
            self.errors.append(f"{path}: {exc.strerror or exc}")


def remove_tree(path: Path) -> Removal:
    """Remove *path* and everything under it, without recursion or following links; never raises.

    The walk holds one folder's descriptor at a time: going down opens a
    child by name relative to its parent (``O_NOFOLLOW``), going up opens
    ``..`` and checks it is the folder it came from (device and inode), so a
    folder moved meanwhile stops the walk instead of leading it elsewhere.
    """
    done = Removal()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return done
    except OSError as exc:
        done.note(str(path), exc)
        return done
    if not stat.S_ISDIR(st.st_mode):
        _unlink(os.fspath(path), None, done)
        return done
    try:
        _remove_folder(path, done)
    except OSError as exc:
        done.note(str(path), exc)
    return done


def _remove_folder(path: Path, done: Removal) -> None:
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent_ident = _ident(parent)
        fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
    finally:
        os.close(parent)
    stack: list[_Level] = []
    where = _Where(path, stack)
    stack.append(_Level(path.name, _ident(fd), _empty(fd, where, done)))
    try:
        while stack:
            level = stack[-1]
            if level.subfolders:
                name = level.subfolders.pop()
                child = _open_child(fd, name, where, done)
                if child is not None:
                    os.close(fd)
                    fd = child
                    stack.append(_Level(name, _ident(fd), []))
                    stack[-1].subfolders = _empty(fd, where, done)
                continue
            stack.pop()
            above = stack[-1].ident if stack else parent_ident
            up = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = up
            if _ident(fd) != above:
                raise OSError(0, f"a folder under {path} moved during its removal; stopped")
            try:
                os.rmdir(level.name, dir_fd=fd)
                done.removed += 1
            except OSError as exc:
                done.note(where(level.name), exc)
    finally:
        os.close(fd)


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@attrs.frozen
class _Where:
    """Paths for error messages, built only when one is needed (the walk may be very deep)."""

    top: Path
    stack: list[_Level]

    def __call__(self, name: str = "") -> str:
        return os.path.join(self.top, *(level.name for level in self.stack[1:]), name)


def _open_child(fd: int, name: str, where: _Where, done: Removal) -> int | None:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # it became a link: remove the link alone
            _unlink(name, fd, done, where)
        else:
            done.note(where(name), exc)
        return None


def _empty(fd: int, where: _Where, done: Removal) -> list[str]:
    """Remove every non-folder in the folder open at *fd*; the names of its subfolders."""
    subfolders = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    subfolders.append(entry.name)
                else:
                    _unlink(entry.name, fd, done, where)
    except OSError as exc:
        done.note(where(), exc)
    return subfolders


def _unlink(name: str, dir_fd: int | None, done: Removal, where: _Where | None = None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
        done.removed += 1
    except FileNotFoundError:
        pass
    except OSError as exc:
        done.note(where(name) if where is not None else name, exc)


def remove_logged(path: Path, **context: object) -> None:
    """Remove *path* with GNU ``rm``, then ``remove_tree`` on what is left; one log line on failure.

    Blocking (run it in a thread); never raises. ``rm -rf`` walks without
    recursion or following links, like ``remove_tree``, but in a process of
    its own: a removal of hundreds of thousands of entries then takes no
    share of the server's interpreter lock from the event loop's thread.
    """
    try:
        # A home's image mounted on it (see ``quota``) goes first: rm stays on
        # one filesystem, and the image is removed whole with the folder.
        unmount_under(path)
        _rm(path)
        done = remove_tree(path)
    except Exception:  # a bug here must not end a session's teardown
        logger.exception("sandbox.remove_failed", path=str(path), **context)
        return
    if done.failed:
        logger.warning(
            "sandbox.remove_failed", path=str(path), failed=done.failed, errors=done.errors, **context
        )


def _rm(path: Path) -> None:
    if not os.path.lexists(path) or not os.path.exists(RM):
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        # No timeout: a huge home takes as long as it takes, in this thread.
        subprocess.run(
            [RM, "-rf", "--one-file-system", "--", os.fspath(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )  # fmt: skip


def sweep_orphans(root: Path, keep: frozenset[str] = frozenset()) -> int:
    """Remove every session folder under *root* not named in *keep*; how many were removed.

    A server killed with SIGKILL leaves its sessions' folders behind (their
    processes die with it: every jail has ``--die-with-parent``). Only
    folders named like sessions are touched, never a link.
    """
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        with contextlib.suppress(OSError):
            if not SESSION_FOLDER.fullmatch(entry.name) or entry.name in keep:
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            remove_logged(Path(entry.path), reason="orphan")
            removed += 1
    if removed:
        logger.info("sandbox.orphans_removed", root=str(root), folders=removed)
    return removed
