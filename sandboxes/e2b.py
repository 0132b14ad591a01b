"""The ``e2b`` backend: one E2B Desktop cloud sandbox per session.

The ``e2b-desktop`` SDK is synchronous, so every call goes through
``asyncio.to_thread`` under ``asyncio.timeout``. A worker thread cannot be
interrupted: when we stop waiting for it (timeout, cancellation) the thread
finishes on its own, and whatever it was creating or running is killed so
nothing is left billing in the cloud.

The sandbox is created lazily, on the first call that needs it, tagged with
metadata naming the deskhive session (see :func:`sandbox_metadata`) so a
server can find its own sandboxes later with ``Sandbox.list``.

E2B kills a sandbox when its timeout runs out, counted from the last
``set_timeout``. While the session uses it we push that deadline back (at
most once per half timeout, and far enough for a long command), so the
sandbox lives as long as the session's activity; the session's end kills it
explicitly, and the timeout is only the safety net if this process dies.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import attrs
import structlog

from protocol.errors import CommandTimeout, NotConfigured, SandboxBroken, SessionClosed
from sandboxes.base import OutputSink, SandboxFactory, SandboxSpec, ScrollDirection, StepReporter, Stream
from sandboxes.e2b_sdk import (
    CommandHandleSDK,
    CreateSandbox,
    DesktopSDK,
    OutputPump,
    PendingCreate,
    create_desktop,
    kill_quietly,
    map_sdk_errors,
    sdk_error,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Metadata key and value every deskhive sandbox carries.
METADATA_APP = "deskhive"
#: E2B keeps a sandbox alive at most this long after a ``set_timeout``.
MAX_SANDBOX_TIMEOUT = 86_400
#: Extra seconds of sandbox life asked for beyond a command's own timeout.
_KEEPALIVE_MARGIN = 120
#: Extra seconds the SDK's own command timeout runs past ours: ours fires
#: first and kills the command; the SDK's only ends a stream we lost.
_SDK_TIMEOUT_GRACE = 30
#: xdotool buttons for horizontal scrolling (the SDK scrolls only up/down).
_HSCROLL_BUTTONS = {"left": 6, "right": 7}


@attrs.frozen(kw_only=True)
class E2BConfig:
    """How the ``e2b`` backend reaches E2B, shared by every session."""

    api_key: str | None = attrs.field(default=None, repr=False)
    #: E2B template; ``None`` is the SDK's default ``desktop`` template.
    template: str | None = None
    resolution: tuple[int, int] = (1280, 800)
    #: Seconds E2B keeps an unused sandbox alive (the safety net above).
    sandbox_timeout: int = 3600
    #: Bound on one SDK call (a click, a screenshot, a kill).
    call_timeout: float = 60.0
    #: Bound on creating a sandbox (it boots Xvfb and XFCE first).
    create_timeout: float = 180.0
    #: Bound on each ``apt-get``/``pip`` step of ``setup``.
    setup_timeout: float = 900.0
    #: The SDK's ``Sandbox.create``; tests substitute a fake here.
    create: CreateSandbox = create_desktop

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: Any) -> E2BConfig:
        """A config keyed by ``E2B_API_KEY``; raises ``NotConfigured`` without one."""
        config = cls(api_key=environ.get("E2B_API_KEY") or None, **overrides)
        config.require_key()
        return config

    def require_key(self) -> str:
        """The API key, or ``NotConfigured`` saying how to provide one."""
        if not self.api_key:
            raise NotConfigured(
                "the e2b sandbox needs an E2B API key: set E2B_API_KEY "
                "(see https://e2b.dev/dashboard) or choose another --sandbox"
            )
        return self.api_key


def sandbox_metadata(spec: SandboxSpec) -> dict[str, str]:
    """The metadata a session's sandbox is created with (query it with ``Sandbox.list``)."""
    return {"app": METADATA_APP, "session_id": spec.session_id, "username": spec.username}


def e2b_factory(config: E2BConfig | None = None) -> SandboxFactory:
    """A factory of ``E2BSandbox`` sharing *config* (default: from the environment).

    Raises ``NotConfigured`` at once without an API key, so a server started
    with ``--sandbox e2b`` fails at start-up rather than at the first login.
    """
    shared = config if config is not None else E2BConfig.from_env()
    shared.require_key()
    return functools.partial(E2BSandbox, config=shared)


def _create_in_thread(config: E2BConfig, spec: SandboxSpec, pending: PendingCreate) -> DesktopSDK:
    sdk = config.create(
        api_key=config.api_key,
        template=config.template,
        resolution=config.resolution,
        timeout=config.sandbox_timeout,
        metadata=sandbox_metadata(spec),
    )
    if not pending.deliver(sdk):
        kill_quietly(sdk, "abandoned")
    return sdk


class E2BSandbox:
    """A session's E2B Desktop sandbox; implements :class:`sandboxes.base.Sandbox`."""

    kind = "e2b"

    def __init__(self, spec: SandboxSpec, config: E2BConfig) -> None:
        config.require_key()
        self._spec = spec
        self._config = config
        self._sdk: DesktopSDK | None = None
        self._pending: PendingCreate | None = None
        self._create_lock = asyncio.Lock()
        self._stream_url: str | None = None
        self._expires_at = 0.0
        self._closed = False

    @property
    def sandbox_id(self) -> str | None:
        return None if self._sdk is None else self._sdk.sandbox_id

    @property
    def stream_url(self) -> str | None:
        return self._stream_url

    @property
    def desktop_running(self) -> bool:
        return self._stream_url is not None

    # ----------------------------------------------------------------------
    # Lifecycle

    async def start_desktop(self) -> None:
        """Create the sandbox if needed and start its password-protected stream."""
        sdk = await self._ready()
        if self._stream_url is not None:
            return
        await self._call("stream.start", lambda: sdk.stream.start(require_auth=True))
        key = await self._call("stream.get_auth_key", sdk.stream.get_auth_key)
        self._stream_url = await self._call("stream.get_url", lambda: sdk.stream.get_url(auth_key=key))
        log.info("e2b.desktop_started", sandbox_id=sdk.sandbox_id)

    async def stop_desktop(self) -> None:
        """Kill the sandbox; the next call that needs one creates a fresh one."""
        # Killing the sandbox ends its stream with everything else, so the
        # stream is not stopped first: that would cost three more round trips
        # to a sandbox that may be the very thing that broke.
        sdk, self._sdk, self._stream_url = self._sdk, None, None
        if sdk is not None:
            await self._call("kill", sdk.kill)
            log.info("e2b.killed", sandbox_id=sdk.sandbox_id, reason="stop_desktop")

    async def close(self) -> None:
        """Kill the sandbox (and one still being created). Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._stream_url = None
        doomed = [self._sdk] if self._sdk is not None else []
        self._sdk = None
        if self._pending is not None:
            # Still being created: take it if it arrived, else its worker kills it.
            arrived = self._pending.abandon()
            doomed += [arrived] if arrived is not None else []
        for sdk in doomed:
            await self._kill_bounded(sdk, "close")

    async def _kill_bounded(self, sdk: DesktopSDK, reason: str) -> None:
        try:
            async with asyncio.timeout(self._config.call_timeout):
                await asyncio.to_thread(kill_quietly, sdk, reason)
        except TimeoutError:
            # The worker thread goes on and still kills it; we stop waiting.
            log.warning("e2b.kill_slow", sandbox_id=sdk.sandbox_id, reason=reason)

    async def _ready(self, busy_for: float = 0.0) -> DesktopSDK:
        """The session's sandbox, created on first need and kept alive."""
        if self._closed:
            raise SessionClosed(f"sandbox of session {self._spec.session_id} is closed")
        async with self._create_lock:
            if self._sdk is None:
                self._sdk = await self._create()
        await self._keep_alive(self._sdk, busy_for)
        return self._sdk

    async def _create(self) -> DesktopSDK:
        pending = self._pending = PendingCreate()
        try:
            with map_sdk_errors("create"):
                async with asyncio.timeout(self._config.create_timeout):
                    sdk = await asyncio.to_thread(_create_in_thread, self._config, self._spec, pending)
        except BaseException:
            # Timed out, cancelled or failed: whatever arrives must not live on.
            orphan = pending.abandon()
            if orphan is not None:
                await self._kill_bounded(orphan, "create_abandoned")
            raise
        finally:
            self._pending = None
        if self._closed:  # close() ran meanwhile and took care of the sandbox
            raise SessionClosed(f"sandbox of session {self._spec.session_id} is closed")
        self._expires_at = time.monotonic() + self._config.sandbox_timeout
        log.info("e2b.created", sandbox_id=sdk.sandbox_id, template=self._config.template)
        return sdk

    async def _keep_alive(self, sdk: DesktopSDK, busy_for: float) -> None:
        """Push E2B's kill deadline back when less than half of it remains."""
        wanted = min(
            MAX_SANDBOX_TIMEOUT,
            max(self._config.sandbox_timeout, math.ceil(busy_for) + _KEEPALIVE_MARGIN),
        )
        remaining = self._expires_at - time.monotonic()
        if remaining >= wanted / 2 and remaining >= busy_for + _KEEPALIVE_MARGIN / 2:
            return
        await self._call("set_timeout", lambda: sdk.set_timeout(wanted))
        self._expires_at = time.monotonic() + wanted
        log.debug("e2b.keepalive", sandbox_id=sdk.sandbox_id, seconds=wanted)

    async def _call(self, operation: str, fn: Callable[[], T], limit: float | None = None) -> T:
        """Run one blocking SDK call in a thread, bounded, errors mapped."""
        with map_sdk_errors(operation):
            async with asyncio.timeout(limit or self._config.call_timeout):
                return await asyncio.to_thread(fn)

    # ----------------------------------------------------------------------
    # Commands

    async def run(
        self,
        cmd: str,
        *,
        timeout: float,
        on_output: OutputSink,
    ) -> int:
        """Run *cmd* through bash in the sandbox, streaming its output."""
        return await self._run(cmd, limit=timeout, on_output=on_output)

    async def _run(self, cmd: str, *, limit: float, on_output: OutputSink, user: str | None = None) -> int:
        sdk = await self._ready(busy_for=limit)
        sdk_timeout = math.ceil(limit) + _SDK_TIMEOUT_GRACE
        handle: CommandHandleSDK = await self._call(
            "run", lambda: sdk.commands.run(cmd, background=True, timeout=sdk_timeout, user=user)
        )
        pump = OutputPump(asyncio.get_running_loop())
        waiter = asyncio.get_running_loop().run_in_executor(None, pump.wait, handle)
        try:
            async with asyncio.timeout(limit) as deadline:
                while (item := await pump.queue.get()) is not None:
                    await on_output(*item)
                outcome = await waiter
        except TimeoutError as exc:
            await self._kill_command(handle)
            if deadline.expired():
                raise CommandTimeout(f"command timed out after {limit:g} s") from exc
            raise
        except BaseException:
            # Cancelled, or the sink failed: the command must not run on.
            await self._kill_command(handle)
            raise
        if isinstance(outcome, Exception):
            raise sdk_error("run", outcome) from outcome
        return outcome

    async def _kill_command(self, handle: CommandHandleSDK) -> None:
        try:
            await self._call("command.kill", handle.kill)
        except SandboxBroken as exc:
            log.warning("e2b.command_kill_failed", error=exc.message)

    async def setup(self, packages: Sequence[str], report: StepReporter) -> None:
        """Install *packages* (``pip:NAME`` with pip, others with apt) and check the browser."""
        apt = [p for p in packages if not p.startswith("pip:")]
        pip = [p.removeprefix("pip:") for p in packages if p.startswith("pip:")]
        if apt:
            report("setup.apt_update")
            await self._setup_step("apt-get update", "apt-get -q update", user="root")
            report("setup.apt_install", packages=apt)
            await self._setup_step(
                "apt-get install",
                "DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "
                + shlex.join(apt),
                user="root",
            )
        if pip:
            report("setup.pip_install", packages=pip)
            await self._setup_step("pip install", "python3 -m pip install --user -q " + shlex.join(pip))
        report("setup.browser")
        browser = await self._setup_step(
            "browser check",
            # A template without a browser still works for commands: not fatal.
            "command -v firefox || command -v google-chrome || command -v chromium || true",
        )
        report("setup.done", browser=browser.strip().rsplit("/", 1)[-1] or None)

    async def _setup_step(self, name: str, cmd: str, user: str | None = None) -> str:
        """Run one setup command; its output, or ``SandboxBroken`` with its tail."""
        chunks: list[str] = []

        async def collect(_stream: Stream, data: str) -> None:
            chunks.append(data)

        code = await self._run(cmd, limit=self._config.setup_timeout, on_output=collect, user=user)
        output = "".join(chunks)
        if code != 0:
            raise SandboxBroken(f"e2b setup: {name} exited with {code}: {output[-500:]}")
        return output

    # ----------------------------------------------------------------------
    # Desktop input and screen

    async def screenshot(self) -> bytes:
        sdk = await self._ready()
        return bytes(await self._call("screenshot", lambda: sdk.screenshot(format="bytes")))

    async def left_click(self, x: int, y: int) -> None:
        sdk = await self._ready()
        await self._call("left_click", lambda: sdk.left_click(x, y))

    async def double_click(self, x: int, y: int) -> None:
        sdk = await self._ready()
        await self._call("double_click", lambda: sdk.double_click(x, y))

    async def right_click(self, x: int, y: int) -> None:
        sdk = await self._ready()
        await self._call("right_click", lambda: sdk.right_click(x, y))

    async def move_mouse(self, x: int, y: int) -> None:
        sdk = await self._ready()
        await self._call("move_mouse", lambda: sdk.move_mouse(x, y))

    async def scroll(self, direction: ScrollDirection = "down", amount: int = 1) -> None:
        sdk = await self._ready()
        if direction in ("up", "down"):
            vertical: Literal["up", "down"] = "up" if direction == "up" else "down"
            await self._call("scroll", lambda: sdk.scroll(vertical, amount))
            return
        button = _HSCROLL_BUTTONS[direction]
        await self._call("scroll", lambda: sdk.commands.run(f"xdotool click --repeat {int(amount)} {button}"))

    async def write(self, text: str) -> None:
        sdk = await self._ready()
        await self._call("write", lambda: sdk.write(text))

    async def press(self, keys: str | Sequence[str]) -> None:
        sdk = await self._ready()
        key: str | list[str] = keys if isinstance(keys, str) else list(keys)
        await self._call("press", lambda: sdk.press(key))

    async def open(self, url_or_file: str) -> None:
        sdk = await self._ready()
        # The SDK pastes its argument into a shell command unquoted.
        await self._call("open", lambda: sdk.open(shlex.quote(url_or_file)))

    async def launch(self, app: str) -> None:
        sdk = await self._ready()
        await self._call("launch", lambda: sdk.launch(shlex.quote(app)))
