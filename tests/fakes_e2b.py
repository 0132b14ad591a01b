"""A fake ``e2b_desktop.Sandbox`` for the ``e2b`` backend's tests.

It stands in at the one injection point, ``E2BConfig.create``. It runs in
the worker threads the backend calls it from, so it synchronises with
``threading`` primitives; everything that blocks gives up after a few
seconds so a failing test cannot hang the thread pool at loop shutdown.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import attrs
from e2b import CommandExitException, SandboxException

_BLOCK_LIMIT = 5.0
_ids = itertools.count(1)


@attrs.define
class Script:
    """What a fake command does: output chunks, then maybe a hang, then an exit."""

    output: list[tuple[str, str]] = attrs.Factory(list)
    exit_code: int = 0
    #: Block after the output until killed (or ``gate`` is set).
    hang: bool = False
    #: Set by the test to let a hanging command finish normally.
    gate: threading.Event = attrs.Factory(threading.Event)
    #: Raised from ``wait`` after the output, as a broken stream would.
    error: Exception | None = None


class FakeHandle:
    """A background command: ``wait`` streams its script, ``kill`` ends it."""

    def __init__(self, cmd: str, script: Script) -> None:
        self.cmd = cmd
        self.script = script
        self.killed = threading.Event()

    def wait(
        self,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
    ) -> object:
        for stream, data in self.script.output:
            sink = on_stdout if stream == "stdout" else on_stderr
            if sink is not None:
                sink(data)
        if self.script.hang:
            for _ in range(int(_BLOCK_LIMIT / 0.01)):
                if self.killed.is_set() or self.script.gate.is_set():
                    break
                self.killed.wait(0.01)
        if self.script.error is not None:
            raise self.script.error
        code = -9 if self.killed.is_set() else self.script.exit_code
        if code != 0:
            raise CommandExitException(stdout="", stderr="", exit_code=code, error=None)
        return object()

    def kill(self) -> bool:
        self.killed.set()
        return True


class FakeCommands:
    """``sandbox.commands``: scripts chosen by command text, handles recorded."""

    def __init__(self, desktop: FakeDesktop) -> None:
        self._desktop = desktop
        self.scripts: dict[str, Script] = {}
        self.handles: list[FakeHandle] = []

    def run(self, cmd: str, **kwargs: Any) -> FakeHandle:
        self._desktop.record("commands.run", cmd, **kwargs)
        handle = FakeHandle(cmd, self.scripts.get(cmd, Script()))
        self.handles.append(handle)
        return handle


class FakeStream:
    """``sandbox.stream``: a password-protected noVNC URL."""

    def __init__(self, desktop: FakeDesktop) -> None:
        self._desktop = desktop

    def start(self, *, require_auth: bool = False) -> None:
        self._desktop.record("stream.start", require_auth=require_auth)

    def get_auth_key(self) -> str:
        self._desktop.record("stream.get_auth_key")
        return "s3cret"

    def get_url(self, *, auth_key: str | None = None) -> str:
        self._desktop.record("stream.get_url", auth_key=auth_key)
        return f"https://6080-{self._desktop.sandbox_id}.e2b.app/vnc.html?password={auth_key}"


class FakeDesktop:
    """One fake E2B Desktop sandbox that records every call made on it."""

    def __init__(self, factory: FakeE2B) -> None:
        self._factory = factory
        self.sandbox_id = f"fake-sbx-{next(_ids)}"
        self.commands = FakeCommands(self)
        self.stream = FakeStream(self)
        self.kills = 0

    def record(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Log the call, then fail or hang if the test asked for that."""
        self._factory.calls.append((name, args, kwargs))
        self._factory.trip(name)

    def set_timeout(self, timeout: int) -> None:
        self.record("set_timeout", timeout)

    def kill(self) -> bool:
        self.kills += 1
        self._factory.killed.set()
        self.record("kill")
        return True

    def screenshot(self, format: str = "bytes") -> bytearray:
        self.record("screenshot", format=format)
        return bytearray(b"\x89PNG\r\n\x1a\nfake")

    def __getattr__(self, name: str) -> Callable[..., None]:
        # Input methods (left_click, write, press, ...) only need recording.
        if name not in _INPUT_METHODS:
            raise AttributeError(name)
        return lambda *args, **kwargs: self.record(name, *args, **kwargs)


_INPUT_METHODS = frozenset(
    {"left_click", "double_click", "right_click", "move_mouse", "scroll"}
    | {"write", "press", "open", "launch"}
)


class FakeE2B:
    """The fake ``Sandbox.create``: makes ``FakeDesktop``s and holds the test's knobs."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.created: list[FakeDesktop] = []
        self.create_kwargs: list[dict[str, Any]] = []
        #: Operation name -> exception its next calls raise.
        self.failures: dict[str, Exception] = {}
        #: Operation names whose calls block until ``release`` is set.
        self.hangs: set[str] = set()
        self.release = threading.Event()
        #: Set when a call starts hanging, so tests know the thread is in it.
        self.hanging = threading.Event()
        #: Set when any sandbox is killed, for tests waiting on a worker thread.
        self.killed = threading.Event()
        #: Scripts every new sandbox's ``commands`` starts with.
        self.scripts: dict[str, Script] = {}

    def __call__(self, **kwargs: Any) -> FakeDesktop:
        self.create_kwargs.append(kwargs)
        self.calls.append(("create", (), kwargs))
        self.trip("create")
        desktop = FakeDesktop(self)
        desktop.commands.scripts = self.scripts
        self.created.append(desktop)
        return desktop

    def trip(self, name: str) -> None:
        if name in self.hangs:
            self.hanging.set()
            self.release.wait(_BLOCK_LIMIT)
        if name in self.failures:
            raise self.failures[name]

    def names(self) -> list[str]:
        """The names of the calls made so far, in order."""
        return [name for name, _, _ in self.calls]

    def finish(self) -> None:
        """Let every blocked call and command end (test teardown)."""
        self.release.set()
        for desktop in self.created:
            for handle in desktop.commands.handles:
                handle.killed.set()


def sdk_failure(message: str = "boom") -> Exception:
    """An exception of the SDK's own kind."""
    return SandboxException(message)
