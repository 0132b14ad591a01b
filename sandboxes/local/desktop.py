"""A session's desktop: Xvfb, a window manager and x11vnc, each in a jail.

Xvfb runs in its own jail with the session's private X socket folder mounted
at ``/tmp/.X11-unix``; with its own network namespace its abstract socket is
out of everybody's reach, so the socket file is the only way in, and only
jails that mount it can draw, and only with the desktop's cookie (Xvfb runs
with ``-auth``; see ``xauth``). MIT-SHM is off because the jails do not share
an IPC namespace. x11vnc listens on a unix socket in a folder that no
sandboxed program of the session can see; only the server connects to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

import attrs
import structlog

from protocol.errors import SandboxBroken
from sandboxes.local import xauth
from sandboxes.local.config import LocalConfig
from sandboxes.local.jail import DISPLAYS, X11_DIR, Jail, Mount, spawn
from sandboxes.local.procs import exit_code, reap
from sandboxes.local.sockets import connectable

logger = structlog.get_logger()

VNC_DIR = "/run/vnc"
POLL = 0.005
#: How long Xvfb may take to be seen dead once one of its clients exited (seconds).
CAUSE_GRACE = 0.5
OWN_HOME = {"HOME": "/tmp"}


def display_is_free(n: int) -> bool:
    """No host X server uses display *n* (ours never do, but keep clear of them)."""
    return not any(os.path.lexists(p) for p in (f"{X11_DIR}/X{n}", f"/tmp/.X{n}-lock"))


@attrs.define
class Desktop:
    """One running desktop; ``start`` returns it ready, ``stop`` ends it."""

    jail: Jail
    display: int
    x11_dir: Path
    vnc_dir: Path
    auth_dir: Path
    procs: list[asyncio.subprocess.Process] = attrs.field(factory=list)
    #: The program each process runs, by pid (for messages).
    names: dict[int, str] = attrs.field(factory=dict)
    #: What the start waits for, and why it is not there yet (for the error).
    waiting: str = ""
    last_error: str = ""

    @property
    def x_socket(self) -> Path:
        return self.x11_dir / f"X{self.display}"

    @property
    def vnc_socket(self) -> Path:
        return self.vnc_dir / "sock"

    def x_mounts(self) -> list[Mount]:
        """The display's socket alone and its cookie, for jails that draw on it."""
        return [Mount(self.x_socket, f"{X11_DIR}/X{self.display}", writable=True), self.auth_mount()]

    def auth_mount(self) -> Mount:
        return Mount(self.auth_dir, xauth.AUTH_DIR)

    @classmethod
    async def start(cls, jail: Jail, config: LocalConfig, base: Path) -> Desktop:
        """A ready desktop with its folders under the session's folder *base*."""
        display = DISPLAYS.take(config.display_base, config.display_count, display_is_free)
        desktop = cls(
            jail=jail, display=display, x11_dir=base / "x11", vnc_dir=base / "vnc", auth_dir=base / "auth"
        )
        try:
            try:
                async with asyncio.timeout(config.start_timeout):
                    await desktop._start_x(config)
                    await desktop._start_clients(config)
            except TimeoutError:
                raise SandboxBroken(
                    f"the desktop did not start within {config.start_timeout:g} s: still waiting for "
                    f"{desktop.waiting} ({desktop.last_error or 'no answer'})"
                ) from None
        except BaseException as exc:
            if isinstance(exc, SandboxBroken):
                # The reason says it all; a traceback would add nothing.
                logger.error("sandbox.desktop_failed", display=display, reason=str(exc))  # noqa: TRY400
            await desktop.stop_processes()
            desktop.release()
            raise
        return desktop

    async def _start_x(self, config: LocalConfig) -> None:
        for stale in (self.x_socket, self.vnc_socket):
            stale.unlink(missing_ok=True)
        width, height = config.screen
        xauth.write(self.auth_dir, self.display)
        xvfb = ["Xvfb", f":{self.display}", "-screen", "0", f"{width}x{height}x{config.depth}"]
        xvfb += ["-nolisten", "tcp", "-extension", "MIT-SHM", "-noreset", "-auth", xauth.XAUTHORITY]
        mounts = [Mount(self.x11_dir, X11_DIR, writable=True), self.auth_mount()]
        self._add(await spawn(self.jail, xvfb, mounts=mounts), "Xvfb")
        await self._until_accepting(self.x_socket, "Xvfb")

    async def _start_clients(self, config: LocalConfig) -> None:
        x = self.x_mounts()
        # The desktop's own programs get a HOME on their private /tmp: no
        # access to the session's files, and a writable HOME (openbox stalls
        # for seconds at start without one).
        wm = await spawn(self.jail, config.window_manager, mounts=x, display=self.display, extra_env=OWN_HOME)
        self._add(wm, config.window_manager[0])
        vnc = ["x11vnc", "-display", f":{self.display}", "-rfbport", "0", "-unixsock", f"{VNC_DIR}/sock"]
        vnc += ["-forever", "-shared", "-nopw", "-norc", "-noshm", "-nocmds", "-noremote", "-quiet"]
        vnc_mounts = [*x, Mount(self.vnc_dir, VNC_DIR, writable=True)]
        # x11vnc rarely dies of an X I/O error right at start; one retry covers it.
        for attempt in (1, 2):
            proc = await spawn(self.jail, vnc, mounts=vnc_mounts, display=self.display, extra_env=OWN_HOME)
            self._add(proc, "x11vnc")
            try:
                await self._until_accepting(self.vnc_socket, "x11vnc")
            except SandboxBroken:
                if attempt == 2 or proc.returncode is None:
                    raise
                self.procs.remove(proc)
                logger.warning("sandbox.x11vnc_retry", display=self.display, exit_code=proc.returncode)
            else:
                return

    async def _until_accepting(self, path: Path, what: str) -> None:
        """Poll until *path* accepts a connection; fail, naming it, if a desktop program exited."""
        started = time.monotonic()
        self.waiting, self.last_error = f"{what} at {path}", ""
        while (error := _connect_error(path)) is not None:
            self.last_error = error
            for proc in self.procs:
                if proc.returncode is not None:
                    name = self.names.get(proc.pid, "a desktop program")
                    raise SandboxBroken(
                        f"{name} exited with code {proc.returncode} while the desktop started "
                        f"(waiting for {what}: {error})"
                    )
            await asyncio.sleep(POLL)
        logger.debug("sandbox.desktop_piece_ready", piece=what, seconds=round(time.monotonic() - started, 3))

    def _add(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.procs.append(proc)
        self.names[proc.pid] = name

    async def stop_processes(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for proc in self.procs:
                tg.create_task(reap(proc))
        self.procs.clear()

    def release(self) -> None:
        """Give back the display number and remove the sockets."""
        DISPLAYS.give(self.display)
        xauth.remove(self.auth_dir)
        for path in (self.x_socket, self.vnc_socket):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def alive(self) -> bool:
        return all(p.returncode is None for p in self.procs)

    def exited(self) -> str | None:
        """Which desktop program exited and with what code, or ``None`` while all run."""
        for proc in self.procs:
            if proc.returncode is not None:
                name = self.names.get(proc.pid, "a desktop program")
                return f"{name} exited with code {exit_code(proc.returncode)}"
        return None

    async def first_exit(self) -> str:
        """Wait, without polling, until one of the desktop's programs exits; which one, and its code.

        When a client (the window manager, x11vnc) goes first, Xvfb is given
        :data:`CAUSE_GRACE` to show whether it is the cause: its clients die of
        a dead display, often before its own jail is reaped.
        """
        procs = list(self.procs)
        async with asyncio.TaskGroup() as tg:
            waits = [tg.create_task(p.wait(), name=f"desktop-wait:{p.pid}") for p in procs]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if not waits[0].done():
                    await asyncio.wait(waits[:1], timeout=CAUSE_GRACE)
            finally:
                # The others keep running, or are being stopped by whoever
                # stopped the desktop: their waits are not needed any more.
                for wait in waits:
                    wait.cancel()
        return self.exited() or "the desktop ended"


def _connect_error(path: Path) -> str | None:
    """Why *path* does not accept a connection yet; ``None`` once it does."""
    # A connect to a unix socket does not wait: it succeeds or fails at once,
    # so it is fine on the event loop.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        try:
            with connectable(path) as address:
                s.connect(address)
        except BlockingIOError:
            return None  # listening, with a full backlog
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
