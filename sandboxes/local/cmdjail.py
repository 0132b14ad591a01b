"""A session's long-lived command jail: one bwrap, many commands.

Starting a fresh ``bwrap --unshare-all`` per command costs 10 to 15 times a
plain process start. Instead a session keeps one jail, confined exactly as
:func:`~sandboxes.local.jail.spawn` confines any other, whose PID 1 is the tiny
:mod:`sandboxes.local.spawner`. Each command is a request over a socketpair
that carries the command's stdout and stderr pipes (SCM_RIGHTS), so the server
reads them directly; the spawner starts the command in its own session. The
jail runs under ``prlimit`` like any other, so the spawner and every command
inherit the session's resource limits.

The spawner runs with the session's privileges, so nothing it says is trusted
beyond an exit code for a command we asked for: every reply has a bound on its
wait, and any reply that does not parse ends the jail. Per-command cancel kills
the command's process group; a process that left it (``setsid``) lives on in
the jail until the session's desktop stops or the session closes, which kill
the jail's bwrap and with it the whole PID namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from protocol.errors import CommandTimeout, SandboxBroken
from sandboxes.base import Limits, OutputSink
from sandboxes.local.jail import Jail, Mount, spawn
from sandboxes.local.procs import REAP_TIMEOUT, kill_now, pump_both, reap, wait_gone

logger = structlog.get_logger()

PYTHON = "/usr/bin/python3"  # Debian's, never the server's own interpreter
SPAWNER = Path(__file__).with_name("spawner.py")
SPAWNER_IN_JAIL = "/run/deskhive/spawner.py"
#: Replies are tiny; anything longer is malformed.
REPLY_MAX = 256
#: Requests stay well under the socket buffer set below (commands are <= 32 K chars).
REQUEST_MAX = 512 * 1024
SOCKET_BUFFER = 1024 * 1024
#: An exit code meaning "the jail ended under the command, not on our request".
_BROKEN = -1


class CommandJail:
    """One running jail with its spawner; ``start`` returns it ready."""

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self.proc, self._sock = proc, sock
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._next_id = 0
        #: Why the jail is no longer usable; ``None`` while it is.
        self.ended: str | None = None
        #: Set once the session stops the jail: its commands then answer 137.
        self.stopping = False
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, jail: Jail, *, mounts: Sequence[Mount], network: bool, limits: Limits, timeout: float
    ) -> CommandJail:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            ours.setblocking(False)
            theirs.set_inheritable(True)
            argv = [PYTHON, "-I", "-S", SPAWNER_IN_JAIL, str(theirs.fileno())]
            files = {SPAWNER_IN_JAIL: SPAWNER.read_bytes()}
            proc = await spawn(
                jail, argv, mounts=mounts, network=network, limits=limits, files=files,
                pass_fds=[theirs.fileno()], as_pid_1=True,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        made = cls(proc, ours)
        try:
            async with asyncio.timeout(timeout):
                hello = await asyncio.get_running_loop().sock_recv(ours, REPLY_MAX + 1)
            _check_hello(hello)
        except TimeoutError:
            await made.close()
            raise SandboxBroken(f"the sandbox's command spawner did not start within {timeout:g} s") from None
        except BaseException:
            await made.close()
            raise
        made._reader = asyncio.create_task(made._read(), name=f"cmdjail-reader-{proc.pid}")
        return made

    def pids(self) -> set[int]:
        """Host pids of the jail itself (its bwrap and the spawner), not of commands."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return {self.proc.pid, *map(int, f.read().split())}
        except (OSError, ValueError):
            return {self.proc.pid}

    # -- replies -------------------------------------------------------------

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.ended is None:
                data = await loop.sock_recv(self._sock, REPLY_MAX + 1)
                if not data:
                    self.end("the sandbox's command jail ended")
                    return
                reply = _status(data)
                future = self._pending.get(reply[0]) if reply is not None else None
                if reply is None or future is None:
                    logger.warning("sandbox.spawner_bad_reply", reply=data[:80])
                    self.end("the sandbox's command spawner sent a malformed reply; it was stopped")
                    return
                if not future.done():
                    future.set_result(reply[1])
        except OSError as exc:
            self.end(f"the sandbox's command jail cannot be reached: {exc}")

    def end(self, reason: str, *, deliberate: bool = False) -> None:
        """Kill the jail (everything in it dies) and settle every waiting command.

        A command the session asked us to stop answers 137 (it got SIGKILL);
        one whose jail failed under it raises ``SandboxBroken``.
        """
        deliberate = deliberate or self.stopping
        if self.ended is None:
            self.ended = reason
            if not deliberate:
                logger.warning("sandbox.command_jail_ended", pid=self.proc.pid, reason=reason)
        kill_now(self.proc)
        for future in self._pending.values():
            if not future.done():
                future.set_result(137 if deliberate else _BROKEN)

    async def close(self) -> None:
        inside = self.pids()
        self.end("the sandbox's command jail was stopped", deliberate=True)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.timeout(REAP_TIMEOUT):
                    await reader
        await reap(self.proc)
        # The spawner (PID 1) dies of bwrap's death (--die-with-parent), a
        # moment later; closing means it is gone.
        await wait_gone(list(inside), REAP_TIMEOUT)
        self._sock.close()

    def abort(self) -> None:
        """``close`` without waiting, for paths that cannot await."""
        self.end("the sandbox's command jail was stopped", deliberate=True)
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close()

    # -- requests ------------------------------------------------------------

    def _send(self, request: Mapping[str, object], fds: Sequence[int] = ()) -> None:
        data = json.dumps(request, ensure_ascii=False).encode()
        if len(data) > REQUEST_MAX:
            raise SandboxBroken(f"the command is too long ({len(data)} bytes)")
        try:
            # Never blocks: a spawner that stopped reading is broken, not slow.
            socket.send_fds(self._sock, [data], list(fds))
        except OSError as exc:
            self.end(f"the sandbox's command spawner does not take requests: {exc}")
            raise SandboxBroken(self.ended or "the sandbox's command jail ended") from None

    async def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        timeout: float,
        on_output: OutputSink,
    ) -> int:
        """Run *argv* in the jail, streaming its output; its exit code."""
        if self.ended is not None:
            raise SandboxBroken(self.ended)
        self._next_id += 1
        ident = self._next_id
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            try:
                request = {"op": "run", "id": ident, "argv": list(argv), "env": dict(env), "cwd": cwd}
                self._send(request, [out_w, err_w])
            finally:
                os.close(out_w)
                os.close(err_w)
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    await pump_both(((out_r, "stdout"), (err_r, "stderr")), on_output, future)
                    code = await future
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise CommandTimeout(f"command timed out after {timeout:g} s") from None
            if code == _BROKEN:
                raise SandboxBroken(f"{self.ended}; the next command starts a new one")
            return code
        finally:
            for fd in (out_r, err_r):
                with contextlib.suppress(OSError):
                    os.close(fd)
            try:
                await self._settle(ident, future)
            finally:
                self._pending.pop(ident, None)

    async def _settle(self, ident: int, future: asyncio.Future[int]) -> None:
        """Kill command *ident*'s process group unless it ended; bounded wait for its end."""
        if future.done():
            return
        with contextlib.suppress(SandboxBroken):
            self._send({"op": "kill", "id": ident})
        try:
            async with asyncio.timeout(REAP_TIMEOUT):
                await asyncio.shield(future)
        except TimeoutError:
            self.end("the sandbox's command spawner did not confirm a kill; it was stopped")
        except asyncio.CancelledError:
            self.end("the sandbox's command jail was stopped while a kill was pending", deliberate=True)
            raise


def _status(data: bytes) -> tuple[int, int] | None:
    """``(id, exit code)`` from a status reply; ``None`` for anything else."""
    reply = _loads(data)
    if not isinstance(reply, dict) or set(reply) != {"id", "status"}:
        return None
    ident, status = reply["id"], reply["status"]
    if type(ident) is not int or type(status) is not int or not 0 <= status <= 255:
        return None
    return ident, status


def _check_hello(data: bytes) -> None:
    if _loads(data) != {"ready": True}:
        raise SandboxBroken(f"the sandbox's command spawner did not start (it said {data[:80]!r})")


def _loads(data: bytes) -> object:
    try:
        return json.loads(data) if len(data) <= REPLY_MAX else None
    except ValueError:
        return None
