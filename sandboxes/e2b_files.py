"""Files of an E2B sandbox's home, through the SDK's ``files`` calls.

The whole sandbox is the session's own machine in E2B's cloud, not a part of
our host, so the paths are only checked as written (relative, no ``..``,
see :func:`sandboxes.files.home_parts`) and then handed to envd, which runs
as the sandbox's user and writes files as that user.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

from e2b import AsyncSandbox, FileNotFoundException, FileType

from protocol.errors import FileMissing
from sandboxes.files import MAX_ENTRIES, FileEntry, Listing, home_parts, shown

#: Where the sandbox's user lives: the home that client paths are relative to.
HOME: Final = "/home/user"


def _where(parts: tuple[str, ...]) -> str:
    return "/".join((HOME, *parts))


async def listing(sdk: AsyncSandbox, path: str) -> Listing:
    parts = home_parts(path, folder=True)
    try:
        found = await sdk.files.list(_where(parts), depth=1)
    except FileNotFoundException:
        raise FileMissing(f"no folder {shown(parts)} in the home") from None
    entries = sorted(
        (
            FileEntry(
                name=e.name,
                size=e.size if e.type == FileType.FILE else 0,
                dir=e.type == FileType.DIR,
                mtime=e.modified_time.timestamp(),
                link=e.symlink_target is not None,
            )
            for e in found
        ),
        key=lambda e: e.name,
    )
    return Listing(entries=tuple(entries[:MAX_ENTRIES]), truncated=len(entries) > MAX_ENTRIES)


class StreamReader:
    """A download streamed from envd; the size is not known ahead."""

    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream: AsyncIterable[bytes] | None = stream

    @property
    def size(self) -> int | None:
        return None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._stream is not None:
            async for chunk in self._stream:
                yield bytes(chunk)

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def open_download(sdk: AsyncSandbox, path: str) -> StreamReader:
    parts = home_parts(path)
    try:
        stream = await sdk.files.read(_where(parts), format="stream")
    except FileNotFoundException:
        raise FileMissing(f"no file {shown(parts)} in the home") from None
    return StreamReader(stream)


async def upload(sdk: AsyncSandbox, path: str, chunks: AsyncIterable[bytes]) -> int:
    """Stream *chunks* to the file (envd makes the parents); the bytes sent."""
    parts = home_parts(path)
    sent = 0
    failure: Exception | None = None

    async def counted() -> AsyncIterator[bytes]:
        nonlocal sent, failure
        try:
            async for chunk in chunks:
                sent += len(chunk)
                yield chunk
        except Exception as exc:
            failure = exc
            raise

    try:
        await sdk.files.write(_where(parts), counted(), use_octet_stream=True)
    except Exception:
        # The SDK wraps what our body raised (an upload over its limit, a
        # client gone) in its own error: the cause is ours, not E2B's.
        if failure is not None:
            raise failure from None
        raise
    return sent
