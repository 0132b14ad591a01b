"""Files of a session's home, as every backend offers them.

A client names a file by a path relative to the session's home
(``notes/todo.txt``). :func:`home_parts` is the one reading of such a path:
it refuses an absolute path, ``..`` and anything a file name cannot hold
before a backend touches anything. Following symbolic links is each
backend's affair (the local one follows none, see ``sandboxes.local.files``).

:class:`MemoryFiles` is a home held in memory, for the ``null`` backend and
the tests' fake.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final, Protocol

import attrs

from protocol.errors import FileMissing, ProtocolError

#: Entries one listing returns at most; a larger folder is cut (``truncated``).
MAX_ENTRIES: Final = 10_000
#: Bytes a download reads from its backend at a time.
CHUNK_BYTES: Final = 256 * 1024
_MAX_PATH_CHARS: Final = 4096


@attrs.frozen(kw_only=True)
class FileEntry:
    """One entry of a folder listing."""

    name: str
    size: int
    dir: bool
    #: Seconds since the epoch.
    mtime: float
    #: A symbolic link (never followed by the file endpoints of the local backend).
    link: bool = False


@attrs.frozen(kw_only=True)
class Listing:
    entries: tuple[FileEntry, ...]
    #: The folder holds more than :data:`MAX_ENTRIES` entries; the first ones by name are given.
    truncated: bool = False


class FileReader(Protocol):
    """A file opened for download: its size, then its bytes in chunks."""

    @property
    def size(self) -> int | None: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None:
        """Free what the reader holds. Idempotent."""
        ...


def home_parts(path: str | None, *, folder: bool = False) -> tuple[str, ...]:
    """The components of *path*, relative to the home; ``ProtocolError`` when it is not one.

    ``""``, ``"."`` and ``None`` name the home itself, which only a *folder* may be.
    """
    path = path or ""
    if len(path) > _MAX_PATH_CHARS:
        raise ProtocolError(f"path is over {_MAX_PATH_CHARS} characters")
    if "\x00" in path or any(0xD800 <= ord(ch) <= 0xDFFF for ch in path):
        raise ProtocolError("path holds a character no file name can hold")
    if path.startswith(("/", "\\")):
        raise ProtocolError(f"path {path[:200]!r} is absolute: paths are relative to the home")
    parts = tuple(part for part in path.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ProtocolError(f"path {path[:200]!r} has '..': paths stay inside the home")
    if not parts and not folder:
        raise ProtocolError("a file path is needed, relative to the home")
    return parts


def shown(parts: tuple[str, ...]) -> str:
    """A path as the client wrote it, for messages."""
    return "/".join(parts) or "."


class BytesReader:
    """A :class:`FileReader` over bytes already in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._data), CHUNK_BYTES):
            yield self._data[start : start + CHUNK_BYTES]

    async def aclose(self) -> None:
        pass


class MemoryFiles:
    """A home held in memory: files by path, folders implied or made by writes."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, ...], tuple[bytes, float]] = {}
        self._dirs: dict[tuple[str, ...], float] = {(): time.time()}

    async def list_files(self, path: str) -> Listing:
        parts = home_parts(path, folder=True)
        if parts in self._files:
            raise ProtocolError(f"{shown(parts)} is a file, not a folder")
        if parts not in self._dirs:
            raise FileMissing(f"no folder {shown(parts)} in the home")
        depth = len(parts)
        entries = [
            FileEntry(name=p[-1], size=len(data), dir=False, mtime=mtime)
            for p, (data, mtime) in self._files.items()
            if len(p) == depth + 1 and p[:depth] == parts
        ]
        entries += [
            FileEntry(name=p[-1], size=0, dir=True, mtime=mtime)
            for p, mtime in self._dirs.items()
            if len(p) == depth + 1 and p[:depth] == parts
        ]
        entries.sort(key=lambda e: e.name)
        return Listing(entries=tuple(entries[:MAX_ENTRIES]), truncated=len(entries) > MAX_ENTRIES)

    async def read_file(self, path: str) -> FileReader:
        parts = home_parts(path)
        if parts in self._dirs:
            raise ProtocolError(f"{shown(parts)} is a folder: list it instead")
        if parts not in self._files:
            raise FileMissing(f"no file {shown(parts)} in the home")
        return BytesReader(self._files[parts][0])

    async def write_file(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        parts = home_parts(path)
        if parts in self._dirs:
            raise ProtocolError(f"{shown(parts)} is a folder")
        for depth in range(len(parts)):
            if parts[:depth] in self._files:
                raise ProtocolError(f"{shown(parts[:depth])} is a file, not a folder")
        data = bytearray()
        async for chunk in chunks:
            data += chunk
        now = time.time()
        for depth in range(len(parts)):
            self._dirs.setdefault(parts[:depth], now)
        self._files[parts] = (bytes(data), now)
        return len(data)
