"""The local sandbox: bubblewrap jails and an Xvfb desktop on this host.

Layout of a session's folder (``<root>/<session_id>`` or the spec's
``data_dir``), created on first use and removed by ``close``::

    home/   the session's home, mounted read-write at /home/user in its jails
    x11/    Xvfb's socket folder; desktop jails get the socket file alone, the
            command jail the folder read-only (the socket appears when the
            desktop starts after the jail)
    vnc/    x11vnc's unix socket; never mounted in a jail the user's code runs in

At a durable shutdown ``suspend`` stops every process but keeps the folder;
the restored session's sandbox (``SandboxSpec.previous_id`` set) takes back
its id and the uid that owns its home, and ``recover`` ends whatever the
dead server left of it.

Commands run in one long-lived jail per session (see ``commands``), whose
``/tmp`` therefore lasts from one command to the next, like a machine's, until
the desktop stops or the session closes: both end that jail with everything
in it, including what commands left running in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import time
from collections.abc import AsyncIterable, Sequence
from pathlib import Path

import attrs
import structlog

from protocol.errors import ProtocolError, SandboxBroken
from sandboxes.base import OutputSink, SandboxSpec, ScrollDirection, StepReporter
from sandboxes.files import FileReader, Listing
from sandboxes.local import apps, cgroups, footprint, quota, tools
from sandboxes.local.commands import Commands
from sandboxes.local.config import LocalConfig
from sandboxes.local.desktop import Desktop
from sandboxes.local.files import LocalHome
from sandboxes.local.folders import remove_logged
from sandboxes.local.identity import wait_uid_gone
from sandboxes.local.jail import HOME, Jail, Mount, session_pids
from sandboxes.local.procs import kill_now, reap, terminate

logger = structlog.get_logger()


class LocalSandbox:
    """A session's sandbox on this host; see the module docstring for its folders."""

    kind = "local"

    def __init__(self, spec: SandboxSpec, config: LocalConfig) -> None:
        if "/" in spec.session_id or spec.session_id.startswith("."):
            raise ProtocolError(f"session id {spec.session_id!r} cannot name a folder")
        self._spec, self._config = spec, config
        base = config.root / spec.session_id if config.root is not None else spec.data_dir
        self._base = base.absolute()
        self._id = footprint.previous_id(spec) or f"local-{secrets.token_hex(6)}"
        #: A restored session: its home, and the uid that owns it, are taken back.
        self._restored = spec.previous_id is not None
        self._jail: Jail | None = None
        self._desktop: Desktop | None = None
        #: Why the last desktop died by itself (until the next start).
        self._lost: str | None = None
        self._apps: list[asyncio.subprocess.Process] = []
        self._commands = Commands(self._id, config, self._base)
        self._home_files: LocalHome | None = None
        self._ensure_lock = asyncio.Lock()
        #: True while the session's uid is given back (see ``_park``).
        self._parked = False
        self._closed = False

    # -- Sandbox protocol: state -------------------------------------------

    @property
    def sandbox_id(self) -> str | None:
        return self._id if self._jail is not None else None

    @property
    def desktop_running(self) -> bool:
        return self._desktop is not None and self._desktop.alive()

    @property
    def stream_url(self) -> str | None:
        return self._spec.stream_url if self.desktop_running else None

    @property
    def lost_reason(self) -> str | None:
        """Which desktop program exited by itself, with its code, until the next start."""
        if self._lost is None and self._desktop is not None:
            # Exited, and the watcher has not run yet.
            return self._desktop.exited()
        return self._lost

    @property
    def vnc_endpoint(self) -> str | None:
        """Path of x11vnc's unix socket while the desktop runs (no password on it)."""
        return str(self._desktop.vnc_socket) if self._desktop and self.desktop_running else None

    @property
    def vnc_password(self) -> str | None:
        """Always ``None``: the socket is the access control, see ``vncproxy``."""
        return None

    @property
    def home(self) -> Path:
        """The home folder on the host (for tests and operators)."""
        return self._base / "home"

    @property
    def config(self) -> LocalConfig:
        return self._config

    @property
    def jail(self) -> Jail | None:
        return self._jail

    def desktop_programs(self) -> dict[str, int]:
        """Host pid of each desktop program's jail (``{"Xvfb": pid, ...}``), for tests and operators."""
        desktop = self._desktop
        return {} if desktop is None else {desktop.names[p.pid]: p.pid for p in desktop.procs}

    def command_jail_pids(self) -> set[int]:
        """Host pids of the command jail itself (bwrap, spawner), for tests and operators."""
        return self._commands.pids()

    # -- life cycle ----------------------------------------------------------

    async def _ensure(self) -> Jail:
        """The session's jail, creating its folders and identity on first use."""
        if self._closed:
            raise SandboxBroken(f"sandbox {self._id} is closed")
        if self._jail is not None and not self._parked:
            return self._jail
        async with self._ensure_lock:
            if self._jail is None:
                self._jail = await self._create_jail()
            elif self._parked:
                self._jail = await self._unpark(self._jail)
        return self._jail

    def _park(self) -> None:
        """Give the uid back: nothing runs under it (the desktop stopped, its uid swept)."""
        if self._jail is not None and self._jail.identity.dropped and not self._closed:
            self._jail.identity.release()
            self._parked = True

    async def _unpark(self, jail: Jail) -> Jail:
        """The jail with its uid taken back (or a new one, the home handed over), off the loop."""
        owner = self._spec.username
        identity = await footprint.off_loop(
            functools.partial(footprint.retake, jail.identity, self._base, self._config, owner)
        )
        self._parked = False
        if identity.uid != jail.identity.uid:
            logger.info("sandbox.uid_changed", sandbox_id=self._id, uid=identity.uid, was=jail.identity.uid)
        return attrs.evolve(jail, identity=identity)

    async def _create_jail(self) -> Jail:
        prepare = functools.partial(
            footprint.prepare, self._base, self._config, self._spec.username, restored=self._restored
        )
        identity = await footprint.off_loop(prepare)
        if self._closed:
            identity.release()
            raise SandboxBroken(f"sandbox {self._id} is closed")
        jail = footprint.new_jail(identity, self._config, self._id, self._spec.username, self._base)
        logger.info("sandbox.created", sandbox_id=self._id, uid=identity.uid, base=str(self._base))
        return jail

    async def start_desktop(self) -> None:
        if self.desktop_running:
            return
        if self._desktop is not None:
            await self.stop_desktop()
        self._lost = None
        jail, started = await self._ensure(), time.monotonic()
        self._desktop = await Desktop.start(jail, self._config, self._base)
        seconds = round(time.monotonic() - started, 3)
        logger.info(
            "sandbox.desktop_started", sandbox_id=self._id, display=self._desktop.display, seconds=seconds
        )

    async def desktop_ended(self) -> str | None:
        """Wait for one of the desktop's programs to exit; stop the rest and say which, if not on purpose."""
        desktop = self._desktop
        if desktop is None or not desktop.procs:
            return None
        reason = await desktop.first_exit()
        if self._desktop is not desktop:
            return None  # stop_desktop took it: stopped on purpose
        await self._lose_desktop(desktop, reason)
        return reason

    async def _lose_desktop(self, desktop: Desktop, reason: str) -> None:
        """Stop what is left of a desktop that died, and its apps; commands go on."""
        self._lost, self._desktop = reason, None
        apps, self._apps = self._apps, []
        logger.warning("sandbox.desktop_lost", sandbox_id=self._id, display=desktop.display, reason=reason)
        procs = [*apps, *desktop.procs]
        for proc in procs:
            # At once, so that a cancelled wait below still leaves nothing running.
            kill_now(proc)
        try:
            async with asyncio.TaskGroup() as tg:
                for proc in procs:
                    tg.create_task(reap(proc), name=f"desktop-reap:{proc.pid}")
        finally:
            desktop.procs.clear()
            desktop.release()

    async def stop_desktop(self) -> None:
        """End the desktop, its apps and any running command of the session."""
        desktop, self._desktop = self._desktop, None
        apps, self._apps = self._apps, []
        cmd_jail = self._commands.take()
        if self._jail is None:
            return
        procs = [*apps, *self._commands.alone, *(desktop.procs if desktop else [])]
        if cmd_jail is not None:
            # Its running commands answer 137, as with any SIGKILLed jail.
            cmd_jail.stopping = True
            procs.append(cmd_jail.proc)
        try:
            stubborn = await terminate(procs, grace=self._config.kill_grace)
        finally:
            if cmd_jail is not None:
                await cmd_jail.close()
            if desktop is not None:
                desktop.release()
        # Anything of the session's left outside the jails walked above (a
        # desktop helper in flight); no new command jail may start meanwhile.
        if self._jail.identity.dropped and not self._parked:
            async with self._commands.held():
                await asyncio.to_thread(self._jail.identity.kill_all)
                # Once nothing runs under the uid, a session idle after its
                # desktop stopped holds none (the next command takes it back).
                uid, grace = self._jail.identity.uid, self._config.kill_grace * 4
                if await asyncio.to_thread(wait_uid_gone, uid, grace):
                    self._park()
        logger.info("sandbox.desktop_stopped", sandbox_id=self._id, ignored_sigterm=stubborn)

    async def close(self) -> None:
        """End every process of the session and remove its folder; never raises but on cancellation.

        The last steps (SIGKILL of the session's uid, removing the folder,
        giving back the uid) run in a thread that finishes even if this call
        is cancelled: a huge home takes seconds to remove, and never on the loop.
        """
        await self._shut(keep=False)

    async def suspend(self) -> None:
        """Stop every process of the session, keep its folder (a durable shutdown)."""
        await self._shut(keep=True)

    async def recover(self) -> None:
        """End what a previous server left running of this session (its uid, its marker)."""
        if not self._base.exists():
            return
        jail = await self._ensure()  # a restored session's uid is swept as it is taken back
        if jail.cgroup is not None:
            # Every process of the session joined its cgroup: no need to scan all of /proc.
            await asyncio.to_thread(jail.cgroup.kill)
        if jail.identity.dropped:
            return
        pids = await asyncio.to_thread(session_pids, jail)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        if pids:
            logger.info("sandbox.leftovers_killed", sandbox_id=self._id, processes=len(pids))

    async def _shut(self, *, keep: bool) -> None:
        if self._closed:
            return
        self._closed = self._commands.closed = True
        loop = asyncio.get_running_loop()
        try:
            await self.stop_desktop()
        except Exception:
            logger.exception("sandbox.close_failed", sandbox_id=self._id)
        finally:
            self._abort_processes()
            teardown = footprint.in_thread(loop, functools.partial(self._teardown, keep=keep))
        if teardown is not None:
            await asyncio.shield(teardown)
        if self._jail is not None and self._jail.cgroup is not None:
            await cgroups.close(self._jail.cgroup)
        logger.info("sandbox.suspended" if keep else "sandbox.closed", sandbox_id=self._id)

    def _abort_processes(self) -> None:
        # Synchronous, so that it also happens when close() itself is cancelled.
        for proc in self._apps:
            kill_now(proc)
        self._commands.abort()
        if self._jail is not None and self._jail.cgroup is not None:
            self._jail.cgroup.kill()

    def _teardown(self, *, keep: bool = False) -> None:
        """SIGKILL what is left of the session, remove its folder unless *keep*, free its uid (blocking).

        Never raises. A kept folder's home is unmounted: the next server mounts it again.
        """
        jail, gone = self._jail, True
        try:
            if jail is not None and not self._parked:  # a parked uid may be another's by now
                gone = False
                footprint.kill_session(jail)
                gone = True
            if keep:
                quota.unmount_under(self._base)
            else:
                remove_logged(self._base, sandbox_id=self._id)
        except Exception:
            logger.exception("sandbox.teardown_failed", sandbox_id=self._id)
        finally:
            # A uid whose processes may live on is never handed out again; a
            # parked one was given back already (and may be another's now).
            if jail is not None and gone and not self._parked:
                jail.identity.release()

    # -- commands --------------------------------------------------------------

    def _mounts(self) -> tuple[list[Mount], int | None]:
        mounts = [Mount(self.home, HOME, writable=True)]
        if self._desktop is not None and self.desktop_running:
            return [*mounts, *self._desktop.x_mounts()], self._desktop.display
        return mounts, None

    async def run(self, cmd: str, *, timeout: float, on_output: OutputSink) -> int:
        return await self.exec(["/bin/bash", "-c", cmd], timeout=timeout, on_output=on_output)

    async def exec(
        self, argv: Sequence[str], *, timeout: float, on_output: OutputSink, network: bool | None = None
    ) -> int:
        """Run *argv* with the home (and display) mounted; its exit code (see ``commands``)."""
        jail = await self._ensure()
        mounts, display = self._mounts()
        net = self._config.network_on if network is None else network
        if net == self._config.network_on:
            return await self._commands.run(jail, argv, display=display, timeout=timeout, on_output=on_output)
        return await self._commands.run_alone(
            jail, argv, mounts=mounts, display=display, network=net, timeout=timeout, on_output=on_output
        )

    async def setup(self, packages: Sequence[str], report: StepReporter) -> None:
        await tools.setup(self, packages, report)

    # -- files of the home (see sandboxes.local.files) ---------------------------

    async def _files(self) -> LocalHome:
        identity = (await self._ensure()).identity
        if self._home_files is None:
            # One per sandbox: it bounds the session's file operations in the workers.
            owner = (identity.uid, identity.gid) if identity.dropped else None
            self._home_files = LocalHome(self.home, owner)
        return self._home_files

    async def list_files(self, path: str) -> Listing:
        return await (await self._files()).list_files(path)

    async def read_file(self, path: str) -> FileReader:
        return await (await self._files()).read_file(path)

    async def write_file(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        return await (await self._files()).write_file(path, chunks)

    # -- desktop ---------------------------------------------------------------

    def _need_desktop(self) -> Desktop:
        if self._desktop is None or not self.desktop_running:
            raise SandboxBroken(f"sandbox {self._id} has no running desktop")
        return self._desktop

    async def _tool(self, argv: Sequence[str]) -> bytes:
        """Run a desktop helper (xdotool, import) in a jail; its stdout."""
        desktop, jail = self._need_desktop(), await self._ensure()
        return await apps.run_helper(jail, desktop, argv, self._config.tool_timeout)

    async def screenshot(self) -> bytes:
        display = self._need_desktop().display
        png = await self._tool(["import", "-display", f":{display}", "-window", "root", "png:-"])
        if not png.startswith(b"\x89PNG"):
            raise SandboxBroken("import did not return a PNG")
        return png

    async def xdotool(self, *args: str) -> str:
        """Run xdotool on the desktop; its output (also for tests)."""
        return (await self._tool(["xdotool", *args])).decode(errors="replace")

    async def left_click(self, x: int, y: int) -> None:
        await self.xdotool("mousemove", str(int(x)), str(int(y)), "click", "1")

    async def double_click(self, x: int, y: int) -> None:
        await self.xdotool("mousemove", str(int(x)), str(int(y)), "click", "--repeat", "2", "1")

    async def right_click(self, x: int, y: int) -> None:
        await self.xdotool("mousemove", str(int(x)), str(int(y)), "click", "3")

    async def move_mouse(self, x: int, y: int) -> None:
        await self.xdotool("mousemove", str(int(x)), str(int(y)))

    async def scroll(self, direction: ScrollDirection = "down", amount: int = 1) -> None:
        button = tools.SCROLL_BUTTONS.get(direction)
        if button is None:
            raise ProtocolError(f"scroll direction {direction!r} is not up, down, left or right")
        await self.xdotool("click", "--repeat", str(max(1, int(amount))), button)

    async def write(self, text: str) -> None:
        if text:
            await self.xdotool("type", "--delay", "8", "--", text)

    async def press(self, keys: str | Sequence[str]) -> None:
        await self.xdotool("key", "--", tools.key_chord(keys))

    async def open(self, url_or_file: str) -> None:
        await self._launch(apps.open_argv(url_or_file, self._config))

    async def launch(self, app: str) -> None:
        await self._launch(apps.launch_argv(app, self._config.browser))

    async def _launch(self, argv: Sequence[str]) -> None:
        """Start a desktop app in a jail and leave it running until the desktop stops."""
        desktop, jail = self._need_desktop(), await self._ensure()
        self._apps = [p for p in self._apps if p.returncode is None]
        proc = await apps.spawn_app(jail, desktop, argv, self._config, self.home)
        self._apps.append(proc)
        await apps.check_started(proc, argv[0])
        logger.info("sandbox.app_launched", sandbox_id=self._id, app=argv[0], pid=proc.pid)
