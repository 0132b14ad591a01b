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

Commands run in one long-lived jail per session (see ``cmdjail``), whose
``/tmp`` therefore lasts from one command to the next, like a machine's, until
the desktop stops or the session closes: both end that jail with everything
in it, including what commands left running in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import structlog

from protocol.errors import CommandTimeout, ProtocolError, SandboxBroken
from sandboxes.base import OutputSink, SandboxFactory, SandboxSpec, ScrollDirection, StepReporter
from sandboxes.local import cgroups, tools
from sandboxes.local.cmdjail import CommandJail
from sandboxes.local.config import LocalConfig
from sandboxes.local.desktop import Desktop
from sandboxes.local.jail import HOME, UIDS, X11_DIR, Identity, Jail, Mount, session_pids, spawn
from sandboxes.local.procs import exit_code, kill_now, pump_both, reap, terminate

logger = structlog.get_logger()

PIPE = asyncio.subprocess.PIPE


class LocalSandbox:
    """A session's sandbox on this host; see the module docstring for its folders."""

    kind = "local"

    def __init__(self, spec: SandboxSpec, config: LocalConfig) -> None:
        if "/" in spec.session_id or spec.session_id.startswith("."):
            raise ProtocolError(f"session id {spec.session_id!r} cannot name a folder")
        self._spec, self._config = spec, config
        base = config.root / spec.session_id if config.root is not None else spec.data_dir
        self._base = base.absolute()
        self._id = _previous_id(spec) or f"local-{secrets.token_hex(6)}"
        #: The uid a restored session's home belongs to, taken back from the pool.
        self._claimed = self._claim_home_uid() if spec.previous_id is not None else None
        self._jail: Jail | None = None
        self._desktop: Desktop | None = None
        self._apps: list[asyncio.subprocess.Process] = []
        self._commands: set[asyncio.subprocess.Process] = set()
        #: The jail the session's commands run in, started at the first one.
        self._cmd_jail: CommandJail | None = None
        self._cmd_lock = asyncio.Lock()
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

    def command_jail_pids(self) -> set[int]:
        """Host pids of the command jail itself (bwrap, spawner), for tests and operators."""
        cmd_jail = self._cmd_jail
        return cmd_jail.pids() if cmd_jail is not None and cmd_jail.ended is None else set()

    # -- life cycle ----------------------------------------------------------

    def _claim_home_uid(self) -> int | None:
        """The restored home's owner, if it is a sandbox uid: its files stay its own."""
        if os.geteuid() != 0:
            return None
        try:
            uid = (self._base / "home").stat().st_uid
        except OSError:
            return None
        first, count = self._config.uid_base, self._config.uid_count
        if not first <= uid < first + count:
            return None
        UIDS.claim(uid)
        return uid

    def _identity(self) -> Identity:
        if self._claimed is not None:
            return Identity(uid=self._claimed, gid=self._claimed, dropped=True)
        return Identity.acquire(self._config.uid_base, self._config.uid_count)

    def _ensure(self) -> Jail:
        """The session's jail, creating its folders and identity on first use."""
        if self._closed:
            raise SandboxBroken(f"sandbox {self._id} is closed")
        if self._jail is not None:
            return self._jail
        identity = self._identity()
        try:
            # bwrap opens the mounted folders as the session's uid, so every
            # folder above them must be searchable (o+x) by it; the session
            # folders themselves are private to that uid.
            self._base.mkdir(mode=0o711, parents=True, exist_ok=True)
            if identity.dropped:
                _check_searchable(self._base)
            for name in ("home", "x11", "vnc"):
                folder = self._base / name
                folder.mkdir(mode=0o700, exist_ok=True)
                if identity.dropped:
                    os.chown(folder, identity.uid, identity.gid)
        except BaseException as exc:
            identity.release()
            if not isinstance(exc, OSError):
                raise
            raise SandboxBroken(f"cannot create the sandbox folder {self._base}: {exc.strerror}") from exc
        config = self._config
        try:
            cgroup = cgroups.for_session(config, self._id)
        except BaseException:
            identity.release()
            raise
        self._jail = Jail(
            identity=identity, username=self._spec.username, marker=self._id, tmp_bytes=config.tmp_bytes,
            shm_bytes=config.shm_bytes, root_bytes=config.root_bytes, cgroup=cgroup,
        )  # fmt: skip
        logger.info("sandbox.created", sandbox_id=self._id, uid=identity.uid, base=str(self._base))
        return self._jail

    async def start_desktop(self) -> None:
        if self.desktop_running:
            return
        if self._desktop is not None:
            await self.stop_desktop()
        jail, started = self._ensure(), time.monotonic()
        self._desktop = await Desktop.start(jail, self._config, self._base / "x11", self._base / "vnc")
        seconds = round(time.monotonic() - started, 3)
        logger.info(
            "sandbox.desktop_started", sandbox_id=self._id, display=self._desktop.display, seconds=seconds
        )

    async def stop_desktop(self) -> None:
        """End the desktop, its apps and any running command of the session."""
        desktop, self._desktop = self._desktop, None
        apps, self._apps = self._apps, []
        cmd_jail, self._cmd_jail = self._cmd_jail, None
        if self._jail is None:
            return
        procs = [*apps, *self._commands, *(desktop.procs if desktop else [])]
        if cmd_jail is not None:
            # Its running commands answer 137, as with any SIGKILLed jail.
            cmd_jail.stopping = True
            procs.append(cmd_jail.proc)
        try:
            stragglers = await terminate(self._jail, procs, grace=self._config.kill_grace)
        finally:
            if cmd_jail is not None:
                await cmd_jail.close()
            if desktop is not None:
                desktop.release()
        logger.info("sandbox.desktop_stopped", sandbox_id=self._id, stragglers=stragglers)

    async def close(self) -> None:
        await self._shut(keep=False)

    async def suspend(self) -> None:
        """Stop every process of the session, keep its folder (a durable shutdown)."""
        await self._shut(keep=True)

    async def recover(self) -> None:
        """End what a previous server left running of this session (its uid, its marker)."""
        if not self._base.exists():
            return
        jail = self._ensure()
        if jail.cgroup is not None:
            # Every process of the session joined its cgroup: no need to scan all of /proc.
            await asyncio.to_thread(jail.cgroup.kill)
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
        self._closed = True
        try:
            await self.stop_desktop()
        except Exception:
            logger.exception("sandbox.close_failed", sandbox_id=self._id)
        finally:
            self._kill_everything_now()
            if not keep:
                self._remove_folder()
            if self._jail is not None:
                if self._jail.cgroup is not None:
                    await cgroups.close(self._jail.cgroup)
                self._jail.identity.release()
            elif self._claimed is not None:
                UIDS.give(self._claimed)
        logger.info("sandbox.suspended" if keep else "sandbox.closed", sandbox_id=self._id)

    def _kill_everything_now(self) -> None:
        # Synchronous, so that it also happens when close() itself is cancelled.
        for proc in [*self._apps, *self._commands]:
            kill_now(proc)
        cmd_jail, self._cmd_jail = self._cmd_jail, None
        if cmd_jail is not None:
            cmd_jail.abort()
        if self._jail is not None:
            if self._jail.cgroup is not None:
                self._jail.cgroup.kill()
            for pid in session_pids(self._jail):
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)

    def _remove_folder(self) -> None:
        def note(_fn: Callable[..., object], path: str, exc: BaseException) -> None:
            logger.warning("sandbox.remove_failed", path=path, error=str(exc))

        if not self._base.exists():
            return
        # rmtree does not follow the symlinks a session may have left in its home.
        if sys.version_info >= (3, 12):
            shutil.rmtree(self._base, onexc=note)
        else:
            shutil.rmtree(self._base, onerror=lambda fn, path, info: note(fn, path, info[1]))

    # -- commands --------------------------------------------------------------

    def _mounts(self) -> tuple[list[Mount], int | None]:
        mounts = [Mount(self.home, HOME, writable=True)]
        if self._desktop is not None and self.desktop_running:
            return [*mounts, self._desktop.x_mount()], self._desktop.display
        return mounts, None

    async def run(self, cmd: str, *, timeout: float, on_output: OutputSink) -> int:
        return await self.exec(["/bin/bash", "-c", cmd], timeout=timeout, on_output=on_output)

    async def _command_jail(self) -> CommandJail:
        """The session's command jail, started (again) when there is none alive."""
        jail = self._ensure()
        try:
            async with asyncio.timeout(self._config.start_timeout * 2), self._cmd_lock:
                return await self._start_command_jail(jail)
        except TimeoutError:
            raise SandboxBroken("the sandbox's command jail did not become ready in time") from None

    async def _start_command_jail(self, jail: Jail) -> CommandJail:
        """The live command jail, or a new one in place of a dead one (under the lock)."""
        old = self._cmd_jail
        if old is not None and old.ended is None:
            return old
        if old is not None:
            await old.close()
            logger.warning("sandbox.command_jail_restarted", sandbox_id=self._id, reason=old.ended)
        # The X socket folder read-only: the display's socket can be used
        # (connect needs no write on the mount) but not replaced.
        mounts = [Mount(self.home, HOME, writable=True), Mount(self._base / "x11", X11_DIR)]
        started = time.monotonic()
        new = await CommandJail.start(
            jail,
            mounts=mounts,
            network=self._config.network_on,
            limits=self._config.limits,
            timeout=self._config.start_timeout,
        )
        if self._closed:
            await new.close()
            raise SandboxBroken(f"sandbox {self._id} is closed")
        self._cmd_jail = new
        seconds = round(time.monotonic() - started, 3)
        logger.info("sandbox.command_jail_started", sandbox_id=self._id, pid=new.proc.pid, seconds=seconds)
        return new

    async def exec(
        self, argv: Sequence[str], *, timeout: float, on_output: OutputSink, network: bool | None = None
    ) -> int:
        """Run *argv* with the home (and display) mounted; its exit code.

        Commands with the session's usual network setting run in its
        long-lived command jail; cancelling or timing out one kills its
        process group. Others get a jail of their own, killed whole.
        """
        net = self._config.network_on if network is None else network
        if net == self._config.network_on:
            cmd_jail = await self._command_jail()
            display = self._desktop.display if self._desktop is not None and self.desktop_running else None
            env = self._ensure().env(display)
            return await cmd_jail.run(argv, env=env, cwd=HOME, timeout=timeout, on_output=on_output)
        jail = self._ensure()
        mounts, display = self._mounts()
        proc = await spawn(
            jail, argv, mounts=mounts, display=display, network=net, limits=self._config.limits,
            stdout=PIPE, stderr=PIPE,
        )  # fmt: skip
        self._commands.add(proc)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await pump_both(proc, on_output)
                return exit_code(await proc.wait())
        except TimeoutError:
            if not deadline.expired():
                raise
            raise CommandTimeout(f"command timed out after {timeout:g} s") from None
        finally:
            self._commands.discard(proc)
            await reap(proc)

    async def setup(self, packages: Sequence[str], report: StepReporter) -> None:
        await tools.setup(self, packages, report)

    # -- desktop ---------------------------------------------------------------

    def _need_desktop(self) -> Desktop:
        if self._desktop is None or not self.desktop_running:
            raise SandboxBroken(f"sandbox {self._id} has no running desktop")
        return self._desktop

    async def _tool(self, argv: Sequence[str]) -> bytes:
        """Run a desktop helper (xdotool, import) in a jail; its stdout."""
        desktop, jail = self._need_desktop(), self._ensure()
        proc = await spawn(
            jail, argv, mounts=[desktop.x_mount()], display=desktop.display, stdout=PIPE, stderr=PIPE
        )
        try:
            async with asyncio.timeout(self._config.tool_timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            raise SandboxBroken(f"{argv[0]} did not finish within {self._config.tool_timeout:g} s") from None
        finally:
            await reap(proc)
        if proc.returncode != 0:
            detail = err.decode(errors="replace").strip()[-300:]
            raise SandboxBroken(f"{argv[0]} failed with exit code {proc.returncode}: {detail}")
        return out

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
        if not url_or_file or url_or_file.startswith("-"):
            raise ProtocolError(f"cannot open {url_or_file!r}")
        await self._launch([*tools.browser_argv(self._config.browser), url_or_file])

    async def launch(self, app: str) -> None:
        argv = shlex.split(app)
        if not argv:
            raise ProtocolError("launch needs an application name")
        if argv[0] in tools.BROWSER_NAMES:
            argv = [*tools.browser_argv(self._config.browser), *argv[1:]]
        await self._launch(argv)

    async def _launch(self, argv: Sequence[str]) -> None:
        """Start a desktop app in a jail and leave it running until the desktop stops."""
        desktop, jail = self._need_desktop(), self._ensure()
        self._apps = [p for p in self._apps if p.returncode is None]
        app_limits = attrs.evolve(self._config.limits, cpu_seconds=0, memory_bytes=0)
        mounts = [Mount(self.home, HOME, writable=True), desktop.x_mount()]
        proc = await spawn(
            jail,
            argv,
            mounts=mounts,
            display=desktop.display,
            network=self._config.network_on,
            limits=app_limits,
        )
        self._apps.append(proc)
        logger.info("sandbox.app_launched", sandbox_id=self._id, app=argv[0], pid=proc.pid)


def _check_searchable(folder: Path) -> None:
    for path in [folder, *folder.parents]:
        if not path.stat().st_mode & 0o001:
            raise SandboxBroken(
                f"{path} is not searchable by other users, so sandboxed uids cannot reach {folder}: "
                "choose a sandbox root whose parents all have o+x"
            )


def _previous_id(spec: SandboxSpec) -> str | None:
    """The restored sandbox's own id, if the store kept one of ours (it is the processes' marker)."""
    previous = spec.previous_id or ""
    tail = previous.removeprefix("local-")
    if previous.startswith("local-") and len(tail) == 12 and all(c in "0123456789abcdef" for c in tail):
        return previous
    return None


def local_factory(config: LocalConfig) -> SandboxFactory:
    """A factory making one ``LocalSandbox`` per session, all sharing *config*."""

    if config.cgroups:
        cgroups.shared()  # probed at start-up, so that a host without them is said at once

    def factory(spec: SandboxSpec) -> LocalSandbox:
        return LocalSandbox(spec, config)

    return factory
