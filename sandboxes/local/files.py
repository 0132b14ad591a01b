"""The local backend's file operations on a session's home, done by a root server.

The session controls everything under its home and may plant symbolic links
there (``ln -s /etc ~/etc``) or swap a folder for one while we work. So no
path is ever resolved by the kernel from the top: each component is opened
with ``openat`` relative to the folder before it, with ``O_NOFOLLOW``, from a
descriptor of the home itself. A link anywhere on the path, even one that
stays inside the home, is refused (400), and so is anything but a regular
file or a folder (a FIFO would hang the reader). Uploads go to a hidden
file created beside the target and renamed over it once complete: a
rename replaces a planted link itself, never what it points at.

The functions block; :class:`LocalHome`, what the sandbox calls, runs them
in worker threads, a chunk at a time, so the event loop never waits on a disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import itertools
import os
import secrets
import stat
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final, TypeVar

from protocol.errors import FileMissing, ProtocolError
from sandboxes.files import CHUNK_BYTES, MAX_ENTRIES, FileEntry, FileReader, Listing, home_parts, shown

T = TypeVar("T")

#: Names one listing reads at most; a larger folder is listed from the first ones read.
MAX_SCANNED: Final = 100_000
#: Worker threads for every session's file operations, apart from the default
#: executor that sets sandboxes up and tears them down.
_WORKERS: Final = 4
#: A session's file operations in the workers at once: one session's many
#: requests cannot hold every worker.
_TURNS_PER_SESSION: Final = 2

#: Upload bytes gathered before one write in a worker thread.
_WRITE_BYTES: Final = 1024 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_NONBLOCK: opening a FIFO the session planted must not wait for a writer.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _refused(parts: tuple[str, ...], exc: OSError) -> Exception:
    if exc.errno == errno.ENOENT:
        return FileMissing(f"no {shown(parts)} in the home")
    if exc.errno in (errno.ELOOP, errno.EMLINK):
        return ProtocolError(f"{shown(parts)} is a symbolic link: links are not followed")
    if exc.errno == errno.ENOTDIR:
        return ProtocolError(f"{shown(parts)} is not a folder")
    if exc.errno == errno.EISDIR:
        return ProtocolError(f"{shown(parts)} is a folder")
    if exc.errno == errno.ENAMETOOLONG:
        return ProtocolError(f"a name in {shown(parts)[:200]} is too long for a file name")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ProtocolError("the home is full")
    return exc


@contextlib.contextmanager
def _folder(home: Path, parts: tuple[str, ...], owner: tuple[int, int] | None = None) -> Iterator[int]:
    """A descriptor of the home's folder *parts*, each step taken without following links.

    With *owner*, missing folders are made, owned by it.
    """
    fd = os.open(home, _DIR_FLAGS)
    try:
        for depth, name in enumerate(parts, 1):
            try:
                next_fd = _step(fd, name, owner)
            except OSError as exc:
                raise _refused(parts[:depth], exc) from None
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def _step(fd: int, name: str, owner: tuple[int, int] | None) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if owner is None:
            raise
    with contextlib.suppress(FileExistsError):  # made meanwhile: opened below like any other
        os.mkdir(name, 0o755, dir_fd=fd)
        os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
    return os.open(name, _DIR_FLAGS, dir_fd=fd)


def list_folder(home: Path, parts: tuple[str, ...]) -> Listing:
    """The folder's first :data:`MAX_ENTRIES` entries by name.

    Names are read first and only those shown are looked at: a folder of
    hundreds of thousands of files (the inode quota allows it) costs a scan
    of at most :data:`MAX_SCANNED` names, not a stat of each.
    """
    with _folder(home, parts) as fd:
        with os.scandir(fd) as found:
            names = [entry.name for entry in itertools.islice(found, MAX_SCANNED + 1)]
        truncated = len(names) > MAX_SCANNED
        entries: list[FileEntry] = []
        for name in sorted(names[:MAX_SCANNED]):
            if len(entries) == MAX_ENTRIES:
                truncated = True
                break
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we read the folder
            entries.append(
                FileEntry(
                    name=name,
                    size=info.st_size if stat.S_ISREG(info.st_mode) else 0,
                    dir=stat.S_ISDIR(info.st_mode),
                    mtime=info.st_mtime,
                    link=stat.S_ISLNK(info.st_mode),
                )
            )
    return Listing(entries=tuple(entries), truncated=truncated)


def open_file(home: Path, parts: tuple[str, ...]) -> tuple[int, int]:
    """A descriptor of the regular file *parts* and its size."""
    with _folder(home, parts[:-1]) as folder:
        try:
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=folder)
        except OSError as exc:
            raise _refused(parts, exc) from None
    try:
        size = _regular_size(fd, parts)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def _regular_size(fd: int, parts: tuple[str, ...]) -> int:
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise ProtocolError(f"{shown(parts)} is a folder: list it instead")
    if not stat.S_ISREG(info.st_mode):
        raise ProtocolError(f"{shown(parts)} is not a regular file")
    return info.st_size


def _check_target(folder: int, parts: tuple[str, ...]) -> None:
    """Refuse to replace a link or a folder (the rename would replace a link, not follow it)."""
    try:
        info = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise ProtocolError(f"{shown(parts)} is a symbolic link: links are not followed")
    if stat.S_ISDIR(info.st_mode):
        raise ProtocolError(f"{shown(parts)} is a folder")


class Upload:
    """A file being uploaded: a hidden file beside the target until :meth:`commit`."""

    def __init__(self, home: Path, parts: tuple[str, ...], owner: tuple[int, int] | None) -> None:
        self._parts = parts
        self._temp = f".upload-{secrets.token_hex(8)}"
        with _folder(home, parts[:-1], owner or (os.getuid(), os.getgid())) as folder:
            self._folder = os.dup(folder)
        try:
            _check_target(self._folder, parts)
            self.fd = os.open(self._temp, _NEW_FLAGS, 0o644, dir_fd=self._folder)
            if owner is not None:
                os.fchown(self.fd, *owner)
        except BaseException as exc:
            os.close(self._folder)
            if isinstance(exc, OSError):
                raise _refused(parts, exc) from None
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise _refused(self._parts, exc) from None

    def commit(self) -> None:
        """Put the file in place of the target (a file or a link, never a folder)."""
        try:
            os.close(self.fd)
            self.fd = -1
            os.rename(self._temp, self._parts[-1], src_dir_fd=self._folder, dst_dir_fd=self._folder)
            self._temp = ""  # in place: nothing of ours is left to remove
        except OSError as exc:
            raise _refused(self._parts, exc) from None
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the hidden file (if it is still there) and let go. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._folder >= 0:
            if self._temp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._temp, dir_fd=self._folder)
            os.close(self._folder)
            self._folder = -1


class LocalHome:
    """The file operations of one session's home, off the event loop.

    *owner* is the session's (uid, gid) when the server runs as root: what it
    writes is the session's, as if its commands had written it. Every
    blocking call runs in the file workers, at most two of this home's at once.
    """

    def __init__(self, home: Path, owner: tuple[int, int] | None) -> None:
        self._home, self._owner = home, owner
        self._turns = asyncio.Semaphore(_TURNS_PER_SESSION)

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        async with self._turns:
            return await asyncio.get_running_loop().run_in_executor(_workers(), functools.partial(fn, *args))

    async def list_files(self, path: str) -> Listing:
        return await self._off_loop(list_folder, self._home, home_parts(path, folder=True))

    async def read_file(self, path: str) -> FileReader:
        fd, size = await self._off_loop(open_file, self._home, home_parts(path))
        return _FdReader(fd, size, self._off_loop)

    async def write_file(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        upload = await self._off_loop(Upload, self._home, home_parts(path), self._owner)
        written, pending = 0, bytearray()
        try:
            async for chunk in chunks:
                pending += chunk
                if len(pending) >= _WRITE_BYTES:
                    await self._off_loop(upload.write, bytes(pending))
                    written, pending = written + len(pending), bytearray()
            await self._off_loop(upload.write, bytes(pending))
            await self._off_loop(upload.commit)
        except BaseException:
            # Cancelled too (a client gone): no partial file stays behind.
            upload.abort()
            raise
        return written + len(pending)


@functools.cache
def _workers() -> concurrent.futures.ThreadPoolExecutor:
    """The file workers, made on first use (their threads end with the process)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="deskhive-files")


class _FdReader:
    """A download from an open descriptor, read a chunk at a time in a worker thread."""

    def __init__(self, fd: int, size: int, off_loop: Callable[..., Awaitable[bytes]]) -> None:
        self._fd, self._size, self._off_loop = fd, size, off_loop

    @property
    def size(self) -> int:
        return self._size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self._fd >= 0 and (chunk := await self._off_loop(os.read, self._fd, CHUNK_BYTES)):
            yield chunk

    async def aclose(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
