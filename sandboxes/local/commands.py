"""A session's commands: its long-lived command jail, and jails of their own for the others.

Commands with the session's usual network setting run in one long-lived
jail (see ``cmdjail``), started at the first and again after one ends;
cancelling or timing out one kills its process group. The others (``pip``
during setup, which alone gets a network) get a jail of their own, killed
whole when they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import structlog

from protocol.errors import CommandTimeout, SandboxBroken
from sandboxes.base import OutputSink, Stream
from sandboxes.local.cmdjail import CommandJail
from sandboxes.local.config import LocalConfig
from sandboxes.local.jail import HOME, X11_DIR, Jail, Mount, spawn
from sandboxes.local.procs import exit_code, kill_now, pump_both, reap
from sandboxes.local.xauth import AUTH_DIR

logger = structlog.get_logger()


class Commands:
    """The command jail and the lone command jails of one session."""

    def __init__(self, sandbox_id: str, config: LocalConfig, base: Path) -> None:
        self._id, self._config, self._base = sandbox_id, config, base
        #: The jail the session's commands run in, started at the first one.
        self.jail: CommandJail | None = None
        #: Outer processes of commands running in a jail of their own.
        self.alone: set[asyncio.subprocess.Process] = set()
        self._lock = asyncio.Lock()
        #: Set when the session closes: no command jail starts after it.
        self.closed = False

    def pids(self) -> set[int]:
        """Host pids of the command jail itself (bwrap, spawner)."""
        cmd_jail = self.jail
        return cmd_jail.pids() if cmd_jail is not None and cmd_jail.ended is None else set()

    def take(self) -> CommandJail | None:
        """The command jail, which the caller now ends; the next command starts another."""
        cmd_jail, self.jail = self.jail, None
        return cmd_jail

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """No command jail starts inside (while the session's uid is being swept)."""
        async with self._lock:
            yield

    def abort(self) -> None:
        """Kill every command now, without waiting (for paths that cannot await)."""
        for proc in self.alone:
            kill_now(proc)
        cmd_jail = self.take()
        if cmd_jail is not None:
            cmd_jail.abort()

    async def run(
        self, jail: Jail, argv: Sequence[str], *, display: int | None, timeout: float, on_output: OutputSink
    ) -> int:
        """Run *argv* in the session's command jail; its exit code."""
        cmd_jail = await self._command_jail(jail)
        env = jail.env(display)
        return await cmd_jail.run(argv, env=env, cwd=HOME, timeout=timeout, on_output=on_output)

    async def _command_jail(self, jail: Jail) -> CommandJail:
        """The session's command jail, started (again) when there is none alive."""
        try:
            async with asyncio.timeout(self._config.start_timeout * 2), self._lock:
                return await self._start(jail)
        except TimeoutError:
            raise SandboxBroken("the sandbox's command jail did not become ready in time") from None

    async def _start(self, jail: Jail) -> CommandJail:
        """The live command jail, or a new one in place of a dead one (under the lock)."""
        old = self.jail
        if old is not None and old.ended is None:
            return old
        if old is not None:
            await old.close()
            logger.warning("sandbox.command_jail_restarted", sandbox_id=self._id, reason=old.ended)
        # The X socket folder read-only: the display's socket can be used
        # (connect needs no write on the mount) but not replaced.
        # And the auth folder, where each desktop run's cookie appears.
        mounts = [
            Mount(self._base / "home", HOME, writable=True),
            Mount(self._base / "x11", X11_DIR),
            Mount(self._base / "auth", AUTH_DIR),
        ]
        started = time.monotonic()
        new = await CommandJail.start(
            jail,
            mounts=mounts,
            network=self._config.network_on,
            limits=self._config.limits,
            timeout=self._config.start_timeout,
        )
        if self.closed:
            await new.close()
            raise SandboxBroken(f"sandbox {self._id} is closed")
        self.jail = new
        seconds = round(time.monotonic() - started, 3)
        logger.info("sandbox.command_jail_started", sandbox_id=self._id, pid=new.proc.pid, seconds=seconds)
        return new

    async def run_alone(
        self,
        jail: Jail,
        argv: Sequence[str],
        *,
        mounts: Sequence[Mount],
        display: int | None,
        network: bool,
        timeout: float,
        on_output: OutputSink,
    ) -> int:
        """Run *argv* in a jail of its own, killed whole when it ends, is cancelled or times out."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            try:
                proc = await spawn(
                    jail, argv, mounts=mounts, display=display, network=network, limits=self._config.limits,
                    stdout=out_w, stderr=err_w,
                )  # fmt: skip
            finally:
                os.close(out_w)
                os.close(err_w)
            self.alone.add(proc)
            try:
                return await _wait(proc, ((out_r, "stdout"), (err_r, "stderr")), timeout, on_output)
            finally:
                self.alone.discard(proc)
                await reap(proc)
        finally:
            for fd in (out_r, err_r):
                os.close(fd)


async def _wait(
    proc: asyncio.subprocess.Process,
    pipes: Sequence[tuple[int, Stream]],
    timeout: float,
    on_output: OutputSink,
) -> int:
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            await pump_both(pipes, on_output)
            return exit_code(await proc.wait())
    except TimeoutError:
        if not deadline.expired():
            raise
        raise CommandTimeout(f"command timed out after {timeout:g} s") from None
