"""Bubblewrap jails: the argv that confines a session's processes (who they run as: ``identity``).

Every process a local sandbox starts (commands, Xvfb, the window manager,
x11vnc, desktop apps, xdotool) goes through :func:`spawn`, so they all get
the same confinement: their own PID, mount, IPC, UTS, cgroup and network
namespaces, a read-only ``/usr``, a private ``/tmp``, only the session's own
folders mounted, a minimal environment (no server secret leaks in), and, when
the server runs as root, the session's own unprivileged uid.

The server opens every bind source itself, never through a link (see
``hostpaths``); with a uid of its own a jail binds the session's folders
from ``portal``, so the session's uid needs no right on the folders above
them; otherwise (a server not run as root) from those descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from protocol.errors import SandboxBroken
from sandboxes.base import Limits
from sandboxes.local import portal, seccomp
from sandboxes.local.cgroups import SessionCgroup
from sandboxes.local.hostpaths import open_nofollow, program
from sandboxes.local.identity import DISPLAYS as DISPLAYS
from sandboxes.local.identity import UIDS as UIDS
from sandboxes.local.identity import Identity as Identity
from sandboxes.local.identity import host_pids, real_uid
from sandboxes.local.identity import lock_uid as lock_uid
from sandboxes.local.network import ETC_FILES as NETWORK_ETC_FILES
from sandboxes.local.network import START_TIMEOUT as NETWORK_START_TIMEOUT
from sandboxes.local.network import Uplink, uplink_for
from sandboxes.local.procs import reap
from sandboxes.local.xauth import XAUTHORITY

HOME = "/home/user"
X11_DIR = "/tmp/.X11-unix"
#: Environment variable every session process carries, to find stragglers.
MARKER_VAR = "DESKHIVE_SANDBOX"

#: Read-only pieces of the host's /etc that programs need (fonts, TLS roots,
#: Debian's alternatives symlinks, X and browser defaults). Nothing secret.
SYSTEM_ETC = (
    "alternatives", "fonts", "ssl", "ca-certificates", "ld.so.cache", "ld.so.conf",
    "ld.so.conf.d", "localtime", "timezone", "mime.types", "X11", "xdg", "chromium",
    "chromium.d", "ImageMagick-6", "terminfo", "bash.bashrc", "profile", "inputrc",
    "nsswitch.conf", "host.conf", "gai.conf", "magic", "python3", "python3.11",
    "os-release", "debian_version", "gtk-3.0", "vim",
)  # fmt: skip
#: Other read-only host files: fontconfig's system cache, without which every
#: program using fonts (the window manager, browsers) rescans them all at start.
SYSTEM_OTHER = ("/var/cache/fontconfig",)
#: Started by absolute path: the environment handed to it is the session's.
BWRAP = "/usr/bin/bwrap"
SH = "/bin/sh"
PRLIMIT = "/usr/bin/prlimit"
CHROMIUM_D = "/etc/chromium.d"
#: Waits for one line "go" on stdin, then runs the rest of argv with stdin on
#: /dev/null; anything else (the server gave up) ends it before it ran anything.
_JOIN_THEN_EXEC = 'read -r go && [ "$go" = go ] && exec "$@" </dev/null; exit 125'
#: Top-level links of a merged-/usr system.
USR_LINKS = (("usr/bin", "/bin"), ("usr/sbin", "/sbin"), ("usr/lib", "/lib"), ("usr/lib64", "/lib64"))


@attrs.frozen
class Mount:
    """A host folder (or socket file) shown inside the jail at *dest*."""

    host: Path
    dest: str
    writable: bool = False


@attrs.frozen(kw_only=True)
class Jail:
    """Everything needed to confine one session's processes."""

    identity: Identity
    username: str
    marker: str
    #: Sizes of the jail's tmpfs mounts: ``/tmp``, ``/dev/shm`` and ``/``.
    tmp_bytes: int
    shm_bytes: int
    root_bytes: int
    #: The session's cgroup, which every process joins before it runs; ``None``
    #: where the host has none we can use.
    cgroup: SessionCgroup | None = None
    #: The session's folder; with a uid of its own, its jails reach it through
    #: ``portal`` (so no folder above it needs a right for the session's uid).
    base: Path | None = None

    @property
    def portal_base(self) -> Path | None:
        return self.base if self.identity.dropped else None

    def start_argv(self) -> tuple[list[str], dict[str, Any]]:
        """What runs before ``argv``, and ``Popen``'s arguments: root through the portal, or the uid."""
        if self.portal_base is None:
            return [], self.identity.popen_kwargs()
        return portal.prefix(self.portal_base, self.identity.uid, self.identity.gid), {}

    def env(self, display: int | None = None) -> dict[str, str]:
        env = {
            "PATH": f"{HOME}/.local/bin:/usr/local/bin:/usr/bin:/bin",
            "HOME": HOME,
            "USER": self.username,
            "LOGNAME": self.username,
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
            "TERM": "xterm-256color",
            MARKER_VAR: self.marker,
        }
        if display is not None:
            env["DISPLAY"] = f":{display}"
            env["XAUTHORITY"] = XAUTHORITY
        return env

    def _identity_files(self) -> tuple[str, str]:
        uid, gid, name = self.identity.uid, self.identity.gid, self.username
        passwd = f"root:x:0:0::/root:/usr/sbin/nologin\n{name}:x:{uid}:{gid}::{HOME}:/bin/bash\n"
        group = f"root:x:0:\n{name}:x:{gid}:\n"
        return passwd, group

    @contextlib.contextmanager
    def argv(
        self,
        command: Sequence[str],
        *,
        mounts: Sequence[Mount] = (),
        uplink: Uplink | None = None,
        limits: Limits | None = None,
        files: Mapping[str, bytes] | None = None,
        as_pid_1: bool = False,
    ) -> Iterator[tuple[list[str], list[int]]]:
        """The full argv and the descriptors it needs, open until exit.

        The jail always has a network namespace of its own: only ``lo``, or,
        with an *uplink*, the outbound-only network of ``network.py``.
        """
        with contextlib.ExitStack() as stack:
            fds: list[int] = []

            def keep(fd: int) -> str:
                stack.callback(os.close, fd)
                fds.append(fd)
                return str(fd)

            args = [*_prlimit(limits), BWRAP, "--unshare-all", *seccomp.bwrap_userns_args(BWRAP)]
            seccomp_fd = keep(_data_fd(seccomp.host_program()))
            args += ["--die-with-parent", "--new-session", "--seccomp", seccomp_fd]
            if as_pid_1:
                args.append("--as-pid-1")
            if uplink is not None:
                network_args, command = uplink.jail_args(keep, command)
                args += network_args
            # A bounded tmpfs over bwrap's own (unbounded) root, before anything is mounted on it.
            args += ["--size", str(self.root_bytes), "--tmpfs", "/"]
            args += ["--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
            for target, link in USR_LINKS:
                if os.path.lexists(link):
                    args += ["--symlink", target, link]
            # bwrap's /dev is an unbounded tmpfs: read-only (its devices still
            # work), with a bounded /dev/shm of its own.
            args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
            args += ["--size", str(self.shm_bytes), "--tmpfs", "/dev/shm"]
            args += ["--size", str(self.tmp_bytes), "--tmpfs", "/tmp"]
            for name in SYSTEM_ETC:
                args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
            for dest, data in NETWORK_ETC_FILES.items() if uplink is not None else ():
                args += ["--ro-bind-data", keep(_data_fd(data)), dest]
            for path in SYSTEM_OTHER:
                args += ["--ro-bind-try", path, path]
            args += _chromium_without_its_sandbox(keep)
            for dest, text in zip(("/etc/passwd", "/etc/group"), self._identity_files(), strict=True):
                args += ["--ro-bind-data", keep(_data_fd(text.encode())), dest]
            for dest, data in (files or {}).items():
                args += ["--ro-bind-data", keep(_data_fd(data)), dest]
            chdir = "/"
            for m in mounts:
                fd = _open(m.host)  # refused if a link, whichever way it is bound
                via = portal.source(self.portal_base, m.host) if self.portal_base is not None else None
                if via is None:
                    args += ["--bind-fd" if m.writable else "--ro-bind-fd", keep(fd), m.dest]
                else:
                    os.close(fd)
                    args += ["--bind" if m.writable else "--ro-bind", via, m.dest]
                chdir = HOME if m.dest == HOME else chdir
            args += ["--chdir", chdir, "--", *command]
            yield args, fds


def _chromium_without_its_sandbox(keep: Callable[[int], str]) -> list[str]:
    """Debian's chromium launcher reads ``/etc/chromium.d``: add ``--no-sandbox`` there.

    Chromium's own sandbox needs a new user namespace, which the jail refuses;
    without this flag it would refuse to start ("No usable sandbox!"). The jail
    is the boundary: its renderers share the session's uid, as its commands do.
    """
    try:
        names = sorted(os.listdir(CHROMIUM_D))
    except OSError:
        return []
    args = ["--size", "65536", "--tmpfs", CHROMIUM_D]
    for name in names:
        args += ["--ro-bind-try", f"{CHROMIUM_D}/{name}", f"{CHROMIUM_D}/{name}"]
    # --test-type: no "unsupported command-line flag: --no-sandbox" bar on
    # every window, which would tell the session's user something is wrong.
    flags = b'export CHROMIUM_FLAGS="$CHROMIUM_FLAGS --no-sandbox --test-type"\n'
    return [*args, "--ro-bind-data", keep(_data_fd(flags)), f"{CHROMIUM_D}/zz-deskhive-no-sandbox"]


def _open(path: Path) -> int:
    """A descriptor of a bind source: a folder, socket or file, never through a link (see ``hostpaths``)."""
    try:
        st = os.lstat(path)
        kind = "folder" if stat.S_ISDIR(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "file"
        return open_nofollow(path, kind)
    except OSError as exc:
        raise SandboxBroken(f"cannot open sandbox folder {path}: {exc.strerror}") from exc


def _data_fd(data: bytes) -> int:
    """A pipe holding *data*, for ``--ro-bind-data`` (under a pipe's 64 KiB, so it never blocks)."""
    if len(data) > 60_000:
        raise ValueError("a file for --ro-bind-data must fit in a pipe")
    r, w = os.pipe()
    try:
        os.write(w, data)
    finally:
        os.close(w)
    return r


def _prlimit(limits: Limits | None) -> list[str]:
    """``prlimit`` in front of bwrap; a limit of 0 means "not limited"."""
    if limits is None:
        return []
    pairs = (
        ("cpu", limits.cpu_seconds),
        ("data", limits.memory_bytes),
        ("nproc", limits.processes),
        ("fsize", limits.file_bytes),
    )
    return [PRLIMIT, *(f"--{name}={value}" for name, value in pairs if value > 0), "--"]


async def spawn(
    jail: Jail,
    command: Sequence[str],
    *,
    mounts: Sequence[Mount] = (),
    display: int | None = None,
    network: bool = False,
    limits: Limits | None = None,
    stdout: int | IO[Any] | None = asyncio.subprocess.DEVNULL,
    stderr: int | IO[Any] | None = asyncio.subprocess.DEVNULL,
    extra_env: Mapping[str, str] | None = None,
    files: Mapping[str, bytes] | None = None,
    pass_fds: Sequence[int] = (),
    as_pid_1: bool = False,
) -> asyncio.subprocess.Process:
    """Start *command* in the jail; its own process group, so it is killed whole.

    With a session cgroup, the process first waits on its stdin (a small
    shell, ours) while the server moves it into the cgroup, so prlimit, bwrap
    and all that follows run bounded from their first instruction. With
    *network*, the jail's command runs only once its own outbound-only
    network is up (see ``network``).
    """
    env = jail.env(display) | dict(extra_env or {})
    # bwrap would look the program up on the session's PATH (its ~/.local/bin first).
    command = [program(command[0]), *command[1:]]
    start, popen_kwargs = jail.start_argv()
    with uplink_for(network) as uplink:
        confined = jail.argv(
            command, mounts=mounts, uplink=uplink, limits=limits, files=files, as_pid_1=as_pid_1
        )
        with confined as (argv, fds), _gate(jail.cgroup) as gate:
            prefix = [SH, "-c", _JOIN_THEN_EXEC, "sh"] if gate is not None else []
            try:
                proc = await asyncio.create_subprocess_exec(
                    *prefix,
                    *start,
                    *argv,
                    stdin=gate[0] if gate is not None else asyncio.subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    env=env,
                    pass_fds=[*fds, *pass_fds],
                    start_new_session=True,
                    **popen_kwargs,
                )
            except OSError as exc:
                raise SandboxBroken(f"cannot start sandboxed {command[0]!r}: {exc}") from exc
            if gate is not None and jail.cgroup is not None:
                _join(proc, jail.cgroup, gate[1], command[0])
        # The jail's own ends of the uplink are closed by now: should bwrap
        # fail, the server reads its end instead of waiting out the bound.
        if uplink is not None:
            await _connected(proc, jail, uplink)
        return proc


async def _connected(proc: asyncio.subprocess.Process, jail: Jail, uplink: Uplink) -> None:
    """Attach the waiting jail's network; end the jail if it cannot be (nothing of it ran yet)."""
    try:
        await uplink.attach(NETWORK_START_TIMEOUT, jail.cgroup.add if jail.cgroup is not None else None)
    except BaseException:
        await reap(proc)
        raise


@contextlib.contextmanager
def _gate(cgroup: SessionCgroup | None) -> Iterator[tuple[int, int] | None]:
    """A pipe (read end for the child's stdin, write end for the go) while a cgroup is to be joined."""
    if cgroup is None:
        yield None
        return
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def _join(proc: asyncio.subprocess.Process, cgroup: SessionCgroup, go: int, name: str) -> None:
    """Move the waiting *proc* into *cgroup*, then let it go; kill it if it cannot join.

    Should the server fail between the two, closing *go* unwritten ends the
    child before it ran anything of the session's.
    """
    try:
        cgroup.add(proc.pid)
        os.write(go, b"go\n")  # 3 bytes into an empty pipe: never blocks
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise SandboxBroken(f"cannot put sandboxed {name!r} in the session's cgroup: {exc.strerror}") from exc


def session_pids(jail: Jail) -> list[int]:
    """Host pids of every live process of the session: its uid or its marker.

    A scan of every process on the host (100 ms and more on a busy one): for
    tests, operators, and a server without uids of its own to hand out, and
    never on the event loop.
    """
    me, needle = os.getpid(), f"\0{MARKER_VAR}={jail.marker}\0".encode()
    own_uid = jail.identity.uid if jail.identity.dropped else None
    found = []
    for pid in host_pids():
        if pid == me:
            continue
        uid = real_uid(pid)
        if uid is None:
            continue
        if uid == own_uid:
            found.append(pid)
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = b"\0" + f.read() + b"\0"
        except OSError:
            continue
        if needle in environ:
            found.append(pid)
    return found
