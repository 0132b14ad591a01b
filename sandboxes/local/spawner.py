"""Starts a session's commands from inside its long-lived jail.

Runs as the jail's PID 1 (``bwrap --as-pid-1``) under Debian's
``/usr/bin/python3 -I -S``, so it must stay standard-library only and import
nothing of the server. It talks over one SOCK_SEQPACKET socket whose number
is ``argv[1]``; every message is one JSON object:

server to spawner
    ``{"op": "run", "id": N, "argv": [...], "env": {...}, "cwd": "..."}``
    carrying two descriptors (the command's stdout and stderr), and
    ``{"op": "kill", "id": N}``: SIGKILL the command's process group.
spawner to server
    ``{"ready": true}`` once, then ``{"id": N, "status": CODE}`` when command
    N ends (128 + N for signal N).

Resource limits are not its business: ``prlimit`` set them on the whole jail,
so the spawner and every command inherit them, as every process in a jail
always has. As PID 1 it also reaps every orphan of the jail. Signals without a handler
cannot reach a namespace's init, so neither the session's own programs nor a
host SIGTERM stops it; the server ends it by killing the jail's bwrap.
"""

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Any

DEFAULT_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGCHLD,
    signal.SIGTERM,
    signal.SIGHUP,
)
MAX_MESSAGE = 1 << 20
PR_SET_DUMPABLE = 4
MAX_FD = 1 << 16
#: Bound on waiting for a killed group to be gone before its status is sent.
KILL_WAIT = 1.0


def start(req: dict[str, Any], out: int, err: int) -> int:
    """Start one command in its own session (and so process group); its pid."""
    argv, env, cwd = req["argv"], req["env"], req["cwd"]
    if not argv or not all(isinstance(a, str) for a in argv) or not isinstance(env, dict):
        raise ValueError("bad argv or env")
    os.chdir(cwd)  # inherited: posix_spawn has no chdir of its own here
    # posix_spawn (a vfork, unlike os.fork of this interpreter) keeps the
    # start cheap. The descriptors received are close-on-exec, so only
    # 0, 1 and 2 reach the command, never the control socket.
    return os.posix_spawnp(
        argv[0],
        argv,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out, 1),
            (os.POSIX_SPAWN_DUP2, err, 2),
        ],
        setsid=True,  # its own process group: a kill reaches its whole tree
        setsigmask=(),
        # The interpreter ignores SIGPIPE and SIGXFSZ, and ignored signals
        # survive exec: commands must get the defaults a shell gives them.
        setsigdef=DEFAULT_SIGNALS,
    )


def not_traceable() -> None:
    """Make this process non-dumpable: a command (same uid, no capabilities) cannot ptrace it.

    A command that stopped PID 1 would stall every later command of the jail.
    The flag is not inherited across exec, so commands can still trace each other.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def main() -> None:
    not_traceable()
    fd = int(sys.argv[1])
    # Descriptors bwrap left open are of no use here and must not leak on.
    os.closerange(3, fd)
    os.closerange(fd + 1, MAX_FD)
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # pid 1: SIG_DFL means ignored
    jobs: dict[int, Any] = {}  # pid -> id, of commands whose status is not sent yet
    groups: dict[Any, int] = {}  # id -> pid (its process group), same commands

    def send(obj: object) -> None:
        sock.sendall(json.dumps(obj).encode())

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ident = jobs.pop(pid, None)
            if ident is not None:
                groups.pop(ident, None)
                code = os.waitstatus_to_exitcode(status)
                send({"id": ident, "status": 128 - code if code < 0 else code})

    def kill(ident: object) -> None:
        pgid = groups.get(ident)
        if pgid is None:
            return
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
        # Report only once the whole group is gone, so "killed" means gone.
        deadline = time.monotonic() + KILL_WAIT
        while time.monotonic() < deadline:
            reap()
            try:
                os.killpg(pgid, 0)
            except OSError:
                break
            time.sleep(0.002)
        reap()

    def handle(msg: bytes, fds: list[int]) -> None:
        req = json.loads(msg)
        op, ident = req["op"], req["id"]
        if op == "kill":
            kill(ident)
            return
        if op != "run" or len(fds) != 2 or ident in groups:
            raise ValueError("bad request")
        for f in fds:
            os.set_inheritable(f, False)
        try:
            pid = start(req, fds[0], fds[1])
        except (OSError, ValueError) as exc:
            # Every run request gets a status, or the server would wait for it
            # until the command's timeout (ValueError: a NUL in argv or env).
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            os.write(fds[1], f"sandbox: cannot run {req['argv'][0]}: {reason}\n".encode(errors="replace"))
            send({"id": ident, "status": 127 if isinstance(exc, FileNotFoundError) else 126})
            return
        jobs[pid], groups[ident] = ident, pid

    # poll, not select: the socket's number is the server's, past select's
    # 1024 on a server holding many connections.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    send({"ready": True})
    while True:
        try:
            ready = {ready_fd for ready_fd, _events in poller.poll()}
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
        reap()
        if fd not in ready:
            continue
        msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 2)
        if not msg:
            return  # the server is gone: ending PID 1 ends the jail
        try:
            handle(msg, fds)
        except Exception:  # noqa: BLE001 - a bad request is dropped, not fatal
            pass
        finally:
            for f in fds:
                os.close(f)


if __name__ == "__main__":
    main()
