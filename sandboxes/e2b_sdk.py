"""The boundary with the ``e2b-desktop`` SDK, kept apart from the backend's logic.

What lives here: structural types for the part of the SDK deskhive uses (so
tests can pass a fake object), the one place SDK exceptions become
``SandboxBroken``, and the hand-offs between the SDK's blocking calls in
worker threads and the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import structlog
from e2b import CommandExitException

from protocol.errors import GatewayError, SandboxBroken
from sandboxes.base import Stream

log = structlog.get_logger("sandboxes.e2b")

# --------------------------------------------------------------------------
# The part of the SDK we use, as structural types (tests pass a fake).


class CommandHandleSDK(Protocol):
    """A background command started by ``commands.run(..., background=True)``."""

    def wait(
        self,
        on_stdout: Callable[[str], None] | None = ...,
        on_stderr: Callable[[str], None] | None = ...,
    ) -> Any: ...

    def kill(self) -> bool: ...


class CommandsSDK(Protocol):
    """``sandbox.commands``."""

    def run(self, cmd: str, **kwargs: Any) -> Any: ...


class StreamSDK(Protocol):
    """``sandbox.stream``: the noVNC server inside the sandbox."""

    def start(self, *, require_auth: bool = ...) -> None: ...
    def get_auth_key(self) -> str: ...
    def get_url(self, *, auth_key: str | None = ...) -> str: ...


class DesktopSDK(Protocol):
    """An ``e2b_desktop.Sandbox``, as far as deskhive uses it."""

    @property
    def sandbox_id(self) -> str: ...
    @property
    def commands(self) -> CommandsSDK: ...
    @property
    def stream(self) -> StreamSDK: ...

    def set_timeout(self, timeout: int) -> None: ...
    def kill(self) -> bool: ...
    def screenshot(self, format: Literal["bytes"]) -> bytes | bytearray: ...
    def left_click(self, x: int, y: int) -> None: ...
    def double_click(self, x: int, y: int) -> None: ...
    def right_click(self, x: int, y: int) -> None: ...
    def move_mouse(self, x: int, y: int) -> None: ...
    def scroll(self, direction: Literal["up", "down"], amount: int) -> None: ...
    def write(self, text: str) -> None: ...
    def press(self, key: str | list[str]) -> None: ...
    def open(self, file_or_url: str) -> None: ...
    def launch(self, application: str) -> None: ...


#: Called with ``api_key, template, resolution, timeout, metadata`` keywords.
CreateSandbox = Callable[..., DesktopSDK]


def create_desktop(**kwargs: Any) -> DesktopSDK:
    """Create a real E2B Desktop sandbox (imported late: it is heavy)."""
    from e2b_desktop import Sandbox as DesktopSandbox

    sandbox: DesktopSDK = DesktopSandbox.create(**kwargs)
    return sandbox


def sdk_error(operation: str, exc: Exception) -> SandboxBroken:
    """The ``SandboxBroken`` that stands for *exc*, raised by the SDK during *operation*."""
    if isinstance(exc, TimeoutError):
        return SandboxBroken(f"e2b {operation} did not finish in time")
    detail = f"{type(exc).__name__}: {exc}"[:300]
    return SandboxBroken(f"e2b {operation} failed: {detail}")


@contextlib.contextmanager
def map_sdk_errors(operation: str) -> Iterator[None]:
    """Turn whatever the SDK raises during *operation* into ``SandboxBroken``."""
    try:
        yield
    except GatewayError:
        raise
    except Exception as exc:
        # The SDK raises its own classes, but also RuntimeError, ValueError and
        # bare Exception; all of them mean the sandbox failed from outside.
        raise sdk_error(operation, exc) from exc


def kill_quietly(sdk: DesktopSDK, reason: str) -> None:
    """Kill *sdk* from a worker thread, logging instead of raising."""
    try:
        sdk.kill()
    except Exception as exc:  # noqa: BLE001 - cleanup must not raise; it logs
        log.warning("e2b.kill_failed", sandbox_id=sdk.sandbox_id, reason=reason, error=repr(exc))
    else:
        log.info("e2b.killed", sandbox_id=sdk.sandbox_id, reason=reason)


class PendingCreate:
    """A sandbox being created in a worker thread that we may stop waiting for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._sdk: DesktopSDK | None = None

    def deliver(self, sdk: DesktopSDK) -> bool:
        """Worker thread: keep *sdk* unless abandoned (then the worker kills it)."""
        with self._lock:
            if self._abandoned:
                return False
            self._sdk = sdk
            return True

    def abandon(self) -> DesktopSDK | None:
        """Stop waiting; return the sandbox if it already arrived, for the caller to kill."""
        with self._lock:
            self._abandoned = True
            sdk, self._sdk = self._sdk, None
            return sdk


class OutputPump:
    """Carries SDK output callbacks from the worker thread to the loop, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[tuple[Stream, str] | None] = asyncio.Queue()

    def _put(self, item: tuple[Stream, str] | None) -> None:
        # The loop may be gone when an abandoned worker thread finally ends.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def stdout(self, data: str) -> None:
        self._put(("stdout", data))

    def stderr(self, data: str) -> None:
        self._put(("stderr", data))

    def wait(self, handle: CommandHandleSDK) -> int | Exception:
        """Worker thread: the command's exit code, or what broke; never raises."""
        try:
            handle.wait(on_stdout=self.stdout, on_stderr=self.stderr)
        except CommandExitException as exc:
            return exc.exit_code
        except Exception as exc:  # noqa: BLE001 - handed to the loop, which maps it
            return exc
        else:
            return 0
        finally:
            self._put(None)
