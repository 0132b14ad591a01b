"""The one interface every sandbox backend fulfils.

The session actor drives a sandbox through this Protocol alone, so it does
not care whether the desktop is a local Xvfb under bubblewrap, an E2B
Desktop in the cloud, or nothing at all. The desktop half mirrors the
``e2b-desktop`` SDK's own surface (screenshot, clicks, move, scroll, write,
press, open, launch, stream URL).

Failures are reported with the exceptions of :mod:`protocol.errors`:
``SandboxBroken`` when the backend fails, ``CommandTimeout`` when a command
outlives its timeout. Cancellation (``CancelledError``) of any call must end
what the call started (a command's whole process tree) before it propagates.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import attrs

from sandboxes.files import FileReader, Listing

Stream = Literal["stdout", "stderr"]
#: Called with each chunk of a command's output, as text, while it runs.
OutputSink = Callable[[Stream, str], Awaitable[None]]
#: Called with a dotted step name and details while ``setup`` works.
StepReporter = Callable[..., None]
ScrollDirection = Literal["up", "down", "left", "right"]


@attrs.frozen(kw_only=True)
class SandboxSpec:
    """What a backend is told about the session it serves."""

    session_id: str
    username: str
    #: A folder that belongs to this session alone (backends may ignore it).
    data_dir: Path
    #: Where the session's desktop is watched in a browser, when the backend
    #: streams through the server itself (the local backend); ``None`` else.
    stream_url: str | None = None
    #: Set when the session is restored after a server restart: the sandbox id
    #: the store kept (``""`` when it kept none). A backend that can find what
    #: it had (the local one its home folder and uid) takes it back.
    previous_id: str | None = None


@attrs.frozen(kw_only=True)
class Limits:
    """Per-command resource limits a backend applies where it can."""

    cpu_seconds: int = 600
    memory_bytes: int = 2 * 1024**3
    processes: int = 256
    file_bytes: int = 1024**3
    network: bool = False


class Sandbox(Protocol):
    """A session's sandbox: commands, a desktop and its stream."""

    #: ``"null"``, ``"local"`` or ``"e2b"``.
    kind: str

    @property
    def sandbox_id(self) -> str | None:
        """The backend's own id for this sandbox, once it exists."""
        ...

    @property
    def stream_url(self) -> str | None:
        """Where the running desktop is watched, or ``None`` without one."""
        ...

    @property
    def desktop_running(self) -> bool:
        """Whether ``start_desktop`` succeeded and nothing stopped it since."""
        ...

    async def start_desktop(self) -> None:
        """Start the desktop; return once it can be watched and driven."""
        ...

    async def stop_desktop(self) -> None:
        """Kill the desktop and every process the session started in it."""
        ...

    async def setup(self, packages: Sequence[str], report: StepReporter) -> None:
        """Prepare the sandbox (packages, a browser profile), step by step."""
        ...

    async def run(self, cmd: str, *, timeout: float, on_output: OutputSink) -> int:
        """Run *cmd* through a shell, stream its output, return its exit code."""
        ...

    async def screenshot(self) -> bytes:
        """A PNG of the desktop."""
        ...

    async def left_click(self, x: int, y: int) -> None: ...
    async def double_click(self, x: int, y: int) -> None: ...
    async def right_click(self, x: int, y: int) -> None: ...
    async def move_mouse(self, x: int, y: int) -> None: ...
    async def scroll(self, direction: ScrollDirection = "down", amount: int = 1) -> None: ...
    async def write(self, text: str) -> None: ...
    async def press(self, keys: str | Sequence[str]) -> None: ...
    async def open(self, url_or_file: str) -> None: ...
    async def launch(self, app: str) -> None: ...

    # Files of the session's home; *path* is relative to it (see sandboxes.files).
    # A bad path raises ``ProtocolError``, a missing one ``FileMissing``.

    async def list_files(self, path: str) -> Listing:
        """The entries of the home's folder *path* (``""``: the home itself)."""
        ...

    async def read_file(self, path: str) -> FileReader:
        """Open the home's file *path* for download."""
        ...

    async def write_file(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        """Write *chunks* to the home's file *path*, parents made; the bytes written.

        Owned by the uid the session's commands run as. Whatever ends the
        iteration early (an upload over its limit, a client gone) leaves the
        old file as it was and no partial one.
        """
        ...

    async def close(self) -> None:
        """Free everything the sandbox holds. Idempotent; never raises."""
        ...


@runtime_checkable
class StreamedSandbox(Protocol):
    """A sandbox whose desktop the server streams itself, through its VNC proxy.

    The local backend is one; E2B streams from its own servers and is not.
    Only these two members are checked (``isinstance`` reads each one), so
    the check never touches the rest of the sandbox.
    """

    @property
    def vnc_endpoint(self) -> str | None:
        """Where the desktop's VNC server listens (a unix socket path) while it runs."""
        ...

    @property
    def vnc_password(self) -> str | None:
        """The VNC password the proxy must give, if the server wants one."""
        ...


@runtime_checkable
class Resumable(Protocol):
    """A sandbox that outlives a server restart with its session (the local one).

    Backends without these are closed at a durable shutdown like at a
    session's end, and start afresh when the session comes back.
    """

    async def suspend(self) -> None:
        """Stop every process but keep what comes back (the home folder); never raises."""
        ...

    async def recover(self) -> None:
        """At restore: end whatever the previous server left running of this sandbox."""
        ...


@runtime_checkable
class LosesDesktop(Protocol):
    """A sandbox that can tell why its desktop died without ``stop_desktop``.

    ``lost_reason`` is set from the moment the backend knows (E2B: a call
    found the sandbox expired; local: a desktop program exited) until the
    next ``start_desktop``; a stop on purpose never sets it. The session
    reports a desktop that stopped running with a reason as ``desktop.lost``.
    """

    @property
    def lost_reason(self) -> str | None: ...


@runtime_checkable
class WatchedDesktop(LosesDesktop, Protocol):
    """A sandbox that notices at once when its desktop dies (the local one, by its processes)."""

    async def desktop_ended(self) -> str | None:
        """Wait for the running desktop's end: why it died, or ``None`` when stopped on purpose.

        Returns at once without a running desktop. A desktop that died is
        stopped whole (its other programs too) before this returns.
        """
        ...


SandboxFactory = Callable[[SandboxSpec], Sandbox]


@runtime_checkable
class OrphanSweeper(Protocol):
    """A factory that can find what an earlier server of this data folder left behind.

    The supervisor calls it once at start-up, after restoring the stored
    sessions and before serving: *live* maps each of them to its sandbox's
    id (``None`` when it had none). Whatever else the backend finds of ours
    (a local session folder, an E2B sandbox tagged with this instance) is
    ended.
    """

    async def sweep_orphans(self, live: Mapping[str, str | None]) -> None: ...


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height of a screenshot from its PNG header, or (0, 0) if it is not a PNG."""
    if len(png) < 24 or not png.startswith(b"\x89PNG\r\n\x1a\n"):
        return 0, 0
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)
