"""A network of its own for each jail that has one: outbound only, through slirp4netns.

A jail never shares the host's network namespace. One started with the
network gets bubblewrap's fresh namespace (only ``lo``) and a slirp4netns
attached to it: a user-mode TCP/IP stack that gives the namespace a ``tap0``
(10.0.2.100, gateway 10.0.2.2, resolver 10.0.2.3) and makes each outbound
connection from the host as an ordinary socket. With
``--disable-host-loopback`` the gateway does not lead to the host's
127.0.0.1, so the server and anything else listening on the host's loopback
are out of reach; 127.0.0.1 inside is the jail's own ``lo``, and what another
session listens on lives in that session's namespace, which nothing forwards.

The steps, for one jail:

1. bubblewrap gets ``--json-status-fd`` (it first writes the pid of its
   child, already in the new namespace, and keeps the descriptor open in its
   outer process until the jail ends), and the command is put behind a small
   gate inside the jail that says "up" once bubblewrap's own setup is done,
   then waits for a "go".
2. The server reads the pid, opens the child's network namespace and the
   user namespace that owns it (so a pid reused later cannot misdirect
   anything), and starts slirp4netns on them with the read end of the status
   pipe as its ``--exit-fd``: bwrap's last word, or its death, ends it, however
   the jail ends.
3. Once slirp4netns has configured ``tap0`` (``--ready-fd``) the server says
   "go". A jail whose network does not come up is killed before anything of
   the session's has run.

slirp4netns runs as the server's uid, outside the jail: it opens the host's
``/dev/net/tun`` (often root's alone) and joins the jail's namespaces from
outside. It runs with ``--enable-seccomp`` and, for a root server,
``--enable-sandbox`` (an empty root, no capabilities left), which a
compromised slirp4netns would still have to escape. The server owns each one
through a ``SubprocessProtocol``: the event loop reaps it when it ends, with
no task waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final

from protocol.errors import SandboxBroken

SLIRP4NETNS: Final = "/usr/bin/slirp4netns"
#: bash, not dash: the gate names descriptors above 9.
BASH: Final = "/bin/bash"
TUN: Final = "/dev/net/tun"
#: ``ioctl(2)`` on a namespace: the user namespace that owns it (linux/nsfs.h).
NS_GET_USERNS: Final = 0xB701
#: slirp4netns's defaults (``--cidr`` 10.0.2.0/24): the jail's address, its
#: gateway (the way out) and the resolver slirp4netns answers on.
GUEST: Final = "10.0.2.100"
GATEWAY: Final = "10.0.2.2"
RESOLVER: Final = "10.0.2.3"
#: The largest MTU slirp4netns takes: fewer, larger packets through user space.
MTU: Final = 65520
#: Files a jail with the network sees in ``/etc``: the resolver is slirp4netns's,
#: never the host's (which may be on the host's loopback, or name internal hosts).
ETC_FILES: Final[Mapping[str, bytes]] = {
    "/etc/resolv.conf": f"nameserver {RESOLVER}\n".encode(),
    "/etc/hosts": b"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\tsandbox\n",
}
#: Bound on a jail's network coming up, from bwrap's start to slirp4netns's ready.
START_TIMEOUT: Final = 10.0
SLIRP_FAILED: Final = f"{SLIRP4NETNS} failed (is {TUN} there, and may the server open it?)"
#: bwrap's first word on ``--json-status-fd`` is a small JSON object.
_INFO_MAX: Final = 4096


class Uplink:
    """The pipes between one jail and its slirp4netns, for one start.

    ``jail_args`` hands the jail's ends over (its argv then owns them: they
    are closed in the server once it has started); ``close`` closes the
    server's own.
    """

    def __init__(self) -> None:
        self._own: list[int] = []
        self._status, status_w = self._pipe()
        self._up, up_w = self._pipe()
        go_r, self._go = self._pipe()
        self._theirs: tuple[int, int, int] | None = (status_w, up_w, go_r)

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self._own += [r, w]
        return r, w

    def jail_args(self, keep: Callable[[int], str], command: Sequence[str]) -> tuple[list[str], list[str]]:
        """bwrap's options for this uplink, and *command* behind the gate that waits for the network.

        *keep* passes a descriptor to the jail and closes the server's copy
        once it has started. The gate is a shell inside the jail: bwrap has
        set its namespace's ``lo`` up by then (slirp4netns, configuring the
        same namespace at the same moment, would make bwrap fail), and it
        runs *command* only once the network is there.
        """
        if self._theirs is None:
            raise RuntimeError("the uplink's jail ends were handed over already")
        theirs, self._theirs = self._theirs, None
        for fd in theirs:
            self._own.remove(fd)
        status, up, go = (keep(fd) for fd in theirs)
        gate = (
            f'printf up >&{up} && exec {up}>&- && read -r go <&{go} && [ "$go" = go ] '
            f'&& exec "$@" {go}<&- {status}>&-; exit 125'
        )
        return ["--json-status-fd", status], [BASH, "-c", gate, "gate", *command]

    def close(self) -> None:
        for fd in self._own:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._own.clear()

    async def attach(self, timeout: float, join: Callable[[int], None] | None = None) -> None:
        """Give the waiting jail its network, then let it run; raise if either fails.

        *join* puts slirp4netns in the session's cgroup: the work it does for
        the session's traffic counts toward the session's bounds.
        """
        try:
            async with asyncio.timeout(timeout):
                pid = await _child_pid(self._status)
                if await _read_some(self._up, 2) != b"up":
                    raise SandboxBroken("the sandbox ended before its network could be set up")
                with _namespaces(pid) as (netns, userns):
                    ready = await _start_slirp(netns, userns, self._status, join)
                try:
                    if await _read_some(ready, 1) != b"1":
                        raise SandboxBroken(f"the sandbox's network did not come up: {SLIRP_FAILED}")
                finally:
                    os.close(ready)
        except TimeoutError:
            raise SandboxBroken(f"the sandbox's network did not come up within {timeout:g} s") from None
        try:
            os.write(self._go, b"go\n")  # 3 bytes into an empty pipe: never blocks
        except BrokenPipeError:
            raise SandboxBroken("the sandbox ended before its network could be set up") from None


@contextlib.contextmanager
def uplink_for(network: bool) -> Iterator[Uplink | None]:
    """An ``Uplink`` for a jail with the network (else ``None``), closed on exit."""
    if not network:
        yield None
        return
    link = Uplink()
    try:
        yield link
    finally:
        link.close()


def slirp_argv(netns: int, userns: int, ready_fd: int, exit_fd: int) -> list[str]:
    """slirp4netns for the namespaces open as *netns*, *userns*: outbound only, not to the host's loopback."""
    # Its own sandbox needs root: it drops what it does not need from there.
    sandbox = ["--enable-sandbox"] if os.geteuid() == 0 else []
    return [
        SLIRP4NETNS, "--configure", f"--mtu={MTU}", "--disable-host-loopback", *sandbox,
        "--enable-seccomp", f"--ready-fd={ready_fd}", f"--exit-fd={exit_fd}", "--netns-type=path",
        f"--userns-path=/proc/self/fd/{userns}", f"/proc/self/fd/{netns}", "tap0",
    ]  # fmt: skip


@contextlib.contextmanager
def _namespaces(pid: int) -> Iterator[tuple[int, int]]:
    """Descriptors of *pid*'s network namespace and of the user namespace that owns it."""
    try:
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxBroken(f"the sandbox ended before its network could be set up: {exc.strerror}") from exc
    try:
        # Its owner, not /proc/<pid>/ns/user: bwrap's child may already have
        # moved on to a nested user namespace that has no say over this one.
        userns = fcntl.ioctl(netns, NS_GET_USERNS)
    except OSError as exc:
        os.close(netns)
        raise SandboxBroken(
            f"cannot find the owner of the sandbox's network namespace: {exc.strerror}"
        ) from exc
    try:
        yield netns, userns
    finally:
        os.close(netns)
        os.close(userns)


class _Slirp(asyncio.SubprocessProtocol):
    """Owns one running slirp4netns: closes its transport (the loop has reaped it) when it ends."""

    def __init__(self) -> None:
        self.transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport
        _RUNNING.add(self)

    def process_exited(self) -> None:
        _RUNNING.discard(self)
        if self.transport is not None:
            self.transport.close()


#: Every slirp4netns this process runs, until it ends (one per jail with the network).
_RUNNING: set[_Slirp] = set()


async def _start_slirp(netns: int, userns: int, exit_fd: int, join: Callable[[int], None] | None) -> int:
    """Start slirp4netns on the namespaces (in the cgroup *join* adds to); its ready pipe's read end."""
    ready_r, ready_w = os.pipe()
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.subprocess_exec(
            _Slirp, *slirp_argv(netns, userns, ready_w, exit_fd), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(netns, userns, ready_w, exit_fd),
            env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        os.close(ready_r)
        raise SandboxBroken(f"cannot start {SLIRP4NETNS} for the sandbox's network: {exc.strerror}") from exc
    finally:
        os.close(ready_w)
    if join is not None:
        try:
            join(transport.get_pid())
        except OSError as exc:
            transport.kill()
            os.close(ready_r)
            raise SandboxBroken(f"cannot put the sandbox's network in its cgroup: {exc.strerror}") from exc
    return ready_r


async def _child_pid(info: int) -> int:
    """The host pid of bwrap's child, from the first JSON bwrap writes to ``--json-status-fd``."""
    data = b""
    while len(data) < _INFO_MAX:
        chunk = await _read_some(info, _INFO_MAX)
        if not chunk:
            break
        data += chunk
        with contextlib.suppress(ValueError):
            # Only the first document: should bwrap have failed, its exit code follows.
            first, _ = json.JSONDecoder().raw_decode(data.decode())
            found = first.get("child-pid") if isinstance(first, dict) else None
            if isinstance(found, int) and found > 0:
                return found
    raise SandboxBroken("the sandbox ended before its network could be set up")


async def _read_some(fd: int, size: int) -> bytes:
    """Up to *size* bytes from the pipe *fd* once it is readable (b"" at its end)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return os.read(fd, size)
