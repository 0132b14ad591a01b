"""The ``e2b`` backend: one E2B Desktop cloud sandbox per session.

Every call is a coroutine of ``e2b.AsyncSandbox`` under ``asyncio.timeout``
(see :mod:`sandboxes.e2b_sdk`): no thread is held by a running command, and
kills run as owned clean-ups that a cancelled caller cannot stop.

The sandbox is created lazily, on the first call that needs it, tagged with
metadata naming this server instance and the session, so a restarted server
finds its own with ``sweep_orphans`` and kills those no session owns.

E2B kills a sandbox when its timeout runs out, counted from the last
``set_timeout``. We keep that deadline at or beyond the session's own idle
deadline (``keep_alive``, called by the session on any activity) and beyond
a running command's timeout, renewing during long commands because a plan
may cap one ``set_timeout`` (Hobby: 3,600 s). The session's end kills the
sandbox explicitly; the timeout is only the safety net if this process dies.

A sandbox that E2B reports gone (expired, killed elsewhere) is forgotten at
once: ``desktop_running`` turns False, the call raises ``SandboxLost`` (a
``SandboxBroken``) saying so, ``lost_reason`` keeps why, and the next
``start_desktop`` creates a new one.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterable, Awaitable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import structlog
from e2b import AsyncSandbox, CommandExitException, SandboxNotFoundException, SandboxUnreachableException
from e2b.sandbox_async.commands.command_handle import AsyncCommandHandle

from protocol.errors import (
    CommandTimeout,
    GatewayError,
    ProtocolError,
    SandboxBroken,
    SessionClosed,
)
from sandboxes import e2b_desktop as desktop
from sandboxes import e2b_files, e2b_input
from sandboxes.base import OutputSink, SandboxFactory, SandboxSpec, ScrollDirection, StepReporter
from sandboxes.e2b_commands import Sink, install
from sandboxes.e2b_config import E2BConfig
from sandboxes.e2b_sdk import (
    Reaper,
    SandboxLost,
    kill_logged,
    map_sdk_errors,
    sandbox_metadata,
    sdk_error,
)
from sandboxes.e2b_sdk import sweep_orphans as sweep_tagged
from sandboxes.files import FileReader, Listing

__all__ = ["E2BConfig", "E2BSandbox", "e2b_factory", "sweep_orphans"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Extra seconds of sandbox life asked for beyond what is needed, so that
#: E2B's deadline is not renewed on every call.
_RENEW_SLACK = 300
#: A renewal that would gain less than this is skipped (the plan's cap reached).
_RENEW_MIN_GAIN = 30
#: Extra seconds the SDK's own command timeout runs past ours: ours fires
#: first and kills the command; the SDK's only ends a stream we lost.
_SDK_TIMEOUT_GRACE = 30


def e2b_factory(config: E2BConfig | None = None) -> SandboxFactory:
    """A factory of ``E2BSandbox`` sharing *config* (default: from the environment).

    Raises ``NotConfigured`` at once without an API key, so a server started
    with ``--sandbox e2b`` fails at start-up rather than at the first login.
    """
    shared = config if config is not None else E2BConfig.from_env()
    shared.require_key()
    return E2BFactory(shared)


class E2BFactory:
    """Makes one ``E2BSandbox`` per session, all sharing *config*."""

    def __init__(self, config: E2BConfig) -> None:
        self.config = config

    def __call__(self, spec: SandboxSpec) -> E2BSandbox:
        return E2BSandbox(spec, self.config)

    async def sweep_orphans(self, live: Mapping[str, str | None]) -> None:
        """Kill every sandbox tagged with this instance that no live session owns."""
        killed = await sweep_orphans(self.config, [sid for sid in live.values() if sid])
        if killed:
            log.info("e2b.orphans_killed", sandboxes=len(killed))


async def sweep_orphans(config: E2BConfig, live_ids: Collection[str]) -> list[str]:
    """At start-up: kill every sandbox of this instance that no live session owns; their ids."""
    return await sweep_tagged(config.connect(), config.instance_id, live_ids, limit=config.create_timeout)


class E2BSandbox:
    """A session's E2B Desktop sandbox; implements :class:`sandboxes.base.Sandbox`."""

    kind = "e2b"

    def __init__(self, spec: SandboxSpec, config: E2BConfig) -> None:
        self._spec = spec
        self._config = config
        self._conn = config.connect()
        self._sdk: AsyncSandbox | None = None
        self._display_up = False
        self._stream_url: str | None = None
        #: Set when the running desktop's stream ends, on purpose or lost.
        self._desktop_over = asyncio.Event()
        self._lost: str | None = None
        self._closed = False
        self._create_lock = asyncio.Lock()
        self._reaper = Reaper(config.call_timeout)
        #: When (monotonic) E2B will kill the sandbox unless told otherwise.
        self._e2b_deadline = 0.0

    @property
    def sandbox_id(self) -> str | None:
        return None if self._sdk is None else self._sdk.sandbox_id

    @property
    def stream_url(self) -> str | None:
        return self._stream_url

    @property
    def desktop_running(self) -> bool:
        return self._stream_url is not None

    @property
    def lost_reason(self) -> str | None:
        """Why the last sandbox was lost (E2B expired or killed it), until the next one starts."""
        return self._lost

    async def desktop_ended(self) -> str | None:
        """Wait for the running desktop's end: why it was lost, ``None`` when stopped on purpose.

        A loss is known when a call finds the sandbox gone, also one outside
        any job (``keep_alive``); the session then hears of it at once.
        """
        if self._stream_url is None:
            return None
        await self._desktop_over.wait()
        return self._lost

    # ----------------------------------------------------------------------
    # Lifecycle

    async def start_desktop(self) -> None:
        """Create the sandbox if needed and start its password-protected stream."""
        sdk = await self._ready()
        if self._stream_url is not None:
            return
        if not self._display_up:  # a reattached sandbox may have lost its display
            if not await self._call("display check", desktop.display_alive(sdk)):
                await self._call("display boot", desktop.boot_display(sdk, self._config.resolution))
            self._display_up = True
        url = await self._call("stream.start", desktop.start_stream(sdk, secrets.token_urlsafe(12)))
        # Input in E2B's own stream never reaches us: the sandbox notes it (see input_idle).
        await self._call("input watch", e2b_input.start_watch(sdk))
        self._stream_url, self._desktop_over = url, asyncio.Event()
        log.info("e2b.desktop_started", sandbox_id=sdk.sandbox_id)

    async def stop_desktop(self) -> None:
        """Kill the sandbox; the next call that needs one creates a fresh one.

        The sandbox is forgotten only once E2B confirmed the kill (or no longer
        knows it): a failed kill raises ``SandboxBroken`` and keeps it, so a
        retry or the session's end kills it rather than leaving it billing.
        """
        sdk = self._sdk
        self._stream_url = None
        self._desktop_over.set()
        if sdk is None:
            return
        with map_sdk_errors("kill", sdk.sandbox_id):
            async with asyncio.timeout(self._config.call_timeout):
                killed = await self._conn.kill(sdk.sandbox_id)
        log.info("e2b.killed" if killed else "e2b.already_gone", sandbox_id=sdk.sandbox_id, reason="stop")
        self._forget(sdk)

    async def reattach(self, sandbox_id: str) -> bool:
        """Take over the session's stored sandbox *sandbox_id* (after a restart).

        True when E2B still runs it: its programs and files are as they were,
        and ``start_desktop`` gives a fresh stream URL (a new password). False
        when it is gone: ``lost_reason`` says so, and the next use creates one.
        """
        try:
            with map_sdk_errors("connect", sandbox_id):
                async with asyncio.timeout(self._config.call_timeout):
                    lifetime = self._config.lifetime(self._config.sandbox_timeout)
                    sdk = await self._conn.connect(sandbox_id, timeout=lifetime)
        except SandboxLost as exc:
            self._lost = exc.message
            log.warning("e2b.reattach_lost", sandbox_id=sandbox_id)
            return False
        self._sdk, self._display_up, self._stream_url = sdk, False, None
        self._e2b_deadline = time.monotonic() + lifetime
        log.info("e2b.reattached", sandbox_id=sandbox_id)
        return True

    async def keep_alive(self, seconds: float) -> None:
        """Keep the sandbox alive at least *seconds* from now (the session's idle deadline).

        Cheap to call on every client frame: E2B is asked only when its
        deadline would fall short, with slack, so at most about once per
        ``_RENEW_SLACK`` seconds (or ``_RENEW_MIN_GAIN`` at the plan's cap).
        """
        if self._sdk is not None and not self._closed:
            await self._hold(self._sdk, seconds)

    async def release(self, keep_for: float) -> None:
        """Let go of the sandbox without killing it: E2B ends it *keep_for* seconds from now.

        For a shutdown that keeps sessions (a durable store): the restarted
        server reattaches it by id, or E2B's timeout ends it.
        """
        sdk, self._closed, self._stream_url = self._sdk, True, None
        self._desktop_over.set()
        self._sdk = None
        if sdk is not None:
            with map_sdk_errors("set_timeout", sdk.sandbox_id):
                async with asyncio.timeout(self._config.call_timeout):
                    await sdk.set_timeout(self._config.lifetime(keep_for))

    async def input_idle(self) -> float | None:
        """Seconds since the desktop last had keyboard or pointer input, E2B's own stream's included.

        ``None`` when unknown (no desktop, no reading yet, E2B not answering):
        unknown never counts as activity.
        """
        sdk = self._sdk
        if sdk is None or self._stream_url is None or self._closed:
            return None
        try:
            result = await self._call("input idle", sdk.commands.run(e2b_input.PROBE_COMMAND), sdk=sdk)
        except GatewayError as exc:
            log.info("e2b.input_idle_failed", sandbox_id=sdk.sandbox_id, error=exc.message)
            return None
        return e2b_input.idle_from(result.stdout or "")

    # ----------------------------------------------------------------------
    # Across a restart (sandboxes.base.Resumable)

    async def suspend(self) -> None:
        """A durable shutdown: keep a sandbox whose desktop runs for the restarted server; never raises.

        The store keeps a sandbox's id only while its desktop runs, so only
        such a sandbox can be found again: it is released with E2B's timeout
        cut to ``sandbox_timeout`` (the session's idle timeout), after which
        E2B ends it if no server reattached it. Any other sandbox is killed.
        """
        sdk = self._sdk
        if sdk is None or not self.desktop_running:
            await self.close()
            return
        try:
            await self.release(keep_for=self._config.sandbox_timeout)
        except GatewayError as exc:
            # Its old, longer timeout stands; the next start's sweep kills it if nobody takes it.
            log.warning("e2b.release_failed", sandbox_id=sdk.sandbox_id, error=exc.message)
        else:
            log.info("e2b.released", sandbox_id=sdk.sandbox_id, seconds=self._config.sandbox_timeout)

    async def recover(self) -> None:
        """At restore: reattach the stored sandbox and restart its stream; a gone one is noted lost.

        Never raises: a sandbox that cannot be reattached leaves the desktop
        stopped (``desktop_running`` False), which the session reports.
        """
        previous = self._spec.previous_id
        if not previous or self._sdk is not None or self._closed:
            return
        try:
            if await self.reattach(previous):
                await self.start_desktop()  # the old stream's password went with the old server
        except GatewayError as exc:
            log.warning("e2b.recover_failed", sandbox_id=previous, error=exc.message)

    async def close(self) -> None:
        """Kill the sandbox. Idempotent; never raises; the kill survives cancellation."""
        if self._closed:
            await self._reaper.drain()
            return
        self._closed = True
        self._stream_url = None
        self._desktop_over.set()
        sdk, self._sdk = self._sdk, None
        if sdk is not None:
            await self._reaper.run(kill_logged(self._conn, sdk.sandbox_id, "close"), "kill")
        # A sandbox still being created is killed by its creator, which sees
        # _closed; wait for kills that cancelled callers left running.
        await self._reaper.drain()

    def _forget(self, sdk: AsyncSandbox) -> None:
        if self._sdk is sdk:
            self._sdk, self._display_up, self._stream_url = None, False, None
            self._desktop_over.set()

    async def _ready(self, busy_for: float = 0.0) -> AsyncSandbox:
        """The session's sandbox, created on first need, alive for *busy_for* more seconds."""
        if self._closed:
            raise SessionClosed(f"sandbox of session {self._spec.session_id} is closed")
        async with self._create_lock:
            if self._sdk is None:
                self._sdk = await self._create()
        sdk = self._sdk
        await self._hold(sdk, max(self._config.sandbox_timeout, busy_for + _RENEW_SLACK))
        return sdk

    async def _create(self) -> AsyncSandbox:
        sdk: AsyncSandbox | None = None
        metadata = sandbox_metadata(self._config.instance_id, self._spec)
        lifetime = self._config.lifetime(self._config.sandbox_timeout + _RENEW_SLACK)
        try:
            with map_sdk_errors("create"):
                async with asyncio.timeout(self._config.create_timeout):
                    sdk = await self._conn.create(
                        template=self._config.template,
                        timeout=lifetime,
                        metadata=metadata,
                        envs={"DISPLAY": desktop.DISPLAY},
                    )
                    await desktop.boot_display(sdk, self._config.resolution)
        except BaseException:
            # Timed out, cancelled or failed: nothing created may live on. Without
            # an answer the sandbox may still exist, so it is found by its tags.
            await self._reaper.run(self._kill_abandoned(sdk, metadata), "create_abandoned")
            raise
        if self._closed:  # close() ran meanwhile; it left this one to us
            await self._reaper.run(kill_logged(self._conn, sdk.sandbox_id, "closed_while_creating"), "kill")
            raise SessionClosed(f"sandbox of session {self._spec.session_id} is closed")
        self._lost, self._display_up = None, True
        self._e2b_deadline = time.monotonic() + lifetime
        log.info("e2b.created", sandbox_id=sdk.sandbox_id, template=self._config.template)
        return sdk

    async def _kill_abandoned(self, sdk: AsyncSandbox | None, metadata: dict[str, str]) -> None:
        ids = [sdk.sandbox_id] if sdk is not None else await self._conn.list_ids(metadata)
        for sandbox_id in ids:
            await kill_logged(self._conn, sandbox_id, "create_abandoned")

    async def _hold(self, sdk: AsyncSandbox, seconds: float) -> None:
        """Push E2B's deadline to cover *seconds* from now, when it falls short."""
        now = time.monotonic()
        needed = now + min(seconds, self._config.max_sandbox_timeout)
        if self._e2b_deadline >= needed:
            return
        ask = self._config.lifetime(seconds + _RENEW_SLACK)
        if now + ask - self._e2b_deadline < min(_RENEW_MIN_GAIN, self._config.max_sandbox_timeout / 4):
            return
        await self._call("set_timeout", sdk.set_timeout(ask), sdk=sdk)
        self._e2b_deadline = now + ask
        log.debug("e2b.keepalive", sandbox_id=sdk.sandbox_id, seconds=ask)

    async def _call(
        self, operation: str, job: Awaitable[T], limit: float | None = None, sdk: AsyncSandbox | None = None
    ) -> T:
        """Await one SDK call, bounded, errors mapped; a lost sandbox is forgotten."""
        sdk = sdk or self._sdk
        try:
            async with asyncio.timeout(limit or self._config.call_timeout):
                return await job
        except GatewayError:
            raise
        except Exception as exc:
            raise await self._failure(operation, exc, sdk) from exc

    async def _failure(self, operation: str, exc: Exception, sdk: AsyncSandbox | None) -> SandboxBroken:
        """The ``SandboxBroken`` for *exc*; when E2B confirms the sandbox gone, it is forgotten."""
        error = sdk_error(operation, exc, None if sdk is None else sdk.sandbox_id)
        if sdk is None:
            return error
        if isinstance(exc, SandboxUnreachableException) and await self._confirmed_gone(sdk):
            error = SandboxLost(
                f"e2b sandbox {sdk.sandbox_id} is gone (E2B no longer knows it) during {operation}"
            )
        if isinstance(error, SandboxLost) and self._sdk is not sdk:
            # We stopped it ourselves (stop_desktop, close): not a loss to report.
            return SandboxBroken(f"e2b sandbox {sdk.sandbox_id} was stopped during {operation}")
        if isinstance(error, SandboxLost):
            log.warning("e2b.lost", sandbox_id=sdk.sandbox_id, reason=error.message)
            self._lost = error.message
            self._forget(sdk)
        return error

    async def _confirmed_gone(self, sdk: AsyncSandbox) -> bool:
        """Ask the control plane whether an unreachable sandbox still exists."""
        try:
            async with asyncio.timeout(self._config.call_timeout):
                await sdk.get_info()
        except SandboxNotFoundException:
            return True
        except Exception as exc:  # noqa: BLE001 - unknown stays "unreachable", not "lost"
            log.info("e2b.probe_failed", sandbox_id=sdk.sandbox_id, error=repr(exc))
        return False

    # ----------------------------------------------------------------------
    # Commands

    async def run(self, cmd: str, *, timeout: float, on_output: OutputSink) -> int:
        """Run *cmd* through bash in the sandbox, streaming its output."""
        return await self._run(cmd, limit=timeout, on_output=on_output)

    async def _run(
        self,
        cmd: str,
        *,
        limit: float,
        on_output: OutputSink,
        user: str | None = None,
    ) -> int:
        sdk = await self._ready(busy_for=limit)
        sink = Sink(on_output)
        handle: AsyncCommandHandle[None] = await self._call(
            "run",
            sdk.commands.run(
                cmd,
                background=True,
                user=user,
                timeout=math.ceil(limit) + _SDK_TIMEOUT_GRACE,
                on_stdout=sink.stdout,
                on_stderr=sink.stderr,
                retain_output=False,  # the output goes to the sink; keeping it costs memory
            ),
        )
        if limit + _RENEW_SLACK <= self._config.max_sandbox_timeout:
            return await self._wait(sdk, handle, limit, sink)
        # Owned here and ended here: renews E2B's deadline while the command runs.
        keeper = asyncio.get_running_loop().create_task(self._keep_up(sdk, limit), name="e2b-keep-up")
        try:
            return await self._wait(sdk, handle, limit, sink)
        finally:
            keeper.cancel()
            await asyncio.wait([keeper])

    async def _wait(
        self, sdk: AsyncSandbox, handle: AsyncCommandHandle[None], limit: float, sink: Sink
    ) -> int:
        try:
            async with asyncio.timeout(limit) as deadline:
                await handle.wait()
        except CommandExitException as exc:
            return exc.exit_code
        except TimeoutError as exc:
            await self._kill_command(handle, sdk)
            if deadline.expired():
                raise CommandTimeout(f"command timed out after {limit:g} s") from exc
            raise await self._failure("run", exc, sdk) from exc  # a transport's own timeout
        except BaseException as exc:
            # Cancelled, the sink failed or the stream broke: the command must not run on.
            await self._kill_command(handle, sdk)
            if isinstance(exc, Exception) and not isinstance(exc, GatewayError) and exc is not sink.failure:
                raise await self._failure("run", exc, sdk) from exc
            raise
        return 0

    async def _kill_command(self, handle: AsyncCommandHandle[None], sdk: AsyncSandbox) -> None:
        async def kill() -> None:
            with map_sdk_errors("command.kill", sdk.sandbox_id):
                await handle.kill()
            await handle.disconnect()

        await self._reaper.run(kill(), "command.kill")

    async def _keep_up(self, sdk: AsyncSandbox, limit: float) -> None:
        """During a command longer than the plan's cap, renew E2B's deadline as it nears."""
        end = time.monotonic() + limit
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(self._config.max_sandbox_timeout / 2)
            try:
                await self._hold(sdk, left + _RENEW_SLACK)
            except SandboxBroken as exc:  # the command's own stream reports a real loss
                log.warning("e2b.keepalive_failed", sandbox_id=sdk.sandbox_id, error=exc.message)

    async def setup(self, packages: Sequence[str], report: StepReporter) -> None:
        """Install *packages* (``pip:NAME`` with pip, others with apt) and check the browser."""

        async def step(cmd: str, on_output: OutputSink, user: str | None) -> int:
            return await self._run(cmd, limit=self._config.setup_timeout, on_output=on_output, user=user)

        await install(step, packages, report)

    # ----------------------------------------------------------------------
    # Files of the home (see sandboxes.e2b_files)

    async def list_files(self, path: str) -> Listing:
        sdk = await self._ready()
        return await self._call("files.list", e2b_files.listing(sdk, path))

    async def read_file(self, path: str) -> FileReader:
        sdk = await self._ready()
        return await self._call("files.read", e2b_files.open_download(sdk, path))

    async def write_file(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        sdk = await self._ready()
        limit = self._config.setup_timeout  # an upload may be long; a stalled one is cut
        return await self._call("files.write", e2b_files.upload(sdk, path, chunks), limit=limit)

    # ----------------------------------------------------------------------
    # Desktop input and screen

    async def _xdo(self, operation: str, cmd: str, *, limit: float | None = None, **kw: Any) -> str:
        """Run one desktop command, bounded; its stderr (xdotool reports some faults only there)."""
        sdk = await self._ready()
        timeout = math.ceil(limit or self._config.call_timeout)
        result = await self._call(operation, sdk.commands.run(cmd, timeout=timeout, **kw), limit=limit)
        return result.stderr or ""

    async def screenshot(self) -> bytes:
        sdk = await self._ready()
        return await self._call("screenshot", desktop.screenshot(sdk))

    async def left_click(self, x: int, y: int) -> None:
        await self._xdo("left_click", desktop.click_command(x, y, 1))

    async def double_click(self, x: int, y: int) -> None:
        await self._xdo("double_click", desktop.click_command(x, y, 1, repeat=2))

    async def right_click(self, x: int, y: int) -> None:
        await self._xdo("right_click", desktop.click_command(x, y, 3))

    async def move_mouse(self, x: int, y: int) -> None:
        await self._xdo("move_mouse", desktop.move_command(x, y))

    async def scroll(self, direction: ScrollDirection = "down", amount: int = 1) -> None:
        await self._xdo("scroll", desktop.scroll_command(direction, amount))

    async def write(self, text: str) -> None:
        """Type *text*, bounded by the call timeout plus twice the typing time it needs."""
        cmd, envs = desktop.write_command(text)
        limit = self._config.call_timeout + 2 * desktop.write_seconds(text)
        await self._xdo("write", cmd, limit=limit, envs=envs)

    async def press(self, keys: str | Sequence[str]) -> None:
        """Press a key or chord; a key name xdotool does not know is an error, not a no-op."""
        stderr = await self._xdo("press", desktop.press_command(keys))
        unknown = desktop.unknown_keys(stderr)
        if unknown:
            raise ProtocolError(f"unknown key name {', '.join(unknown)}: use X keysym names such as Return")

    async def open(self, url_or_file: str) -> None:
        await self._start_program("open", desktop.open_command(url_or_file))

    async def launch(self, app: str) -> None:
        await self._start_program("launch", desktop.launch_command(app))

    async def _start_program(self, operation: str, cmd: str) -> None:
        """Start a program on the desktop and return once it runs, not when it exits."""
        sdk = await self._ready()
        handle = await self._call(operation, sdk.commands.run(cmd, background=True, timeout=0))
        await self._call(operation, handle.disconnect())
