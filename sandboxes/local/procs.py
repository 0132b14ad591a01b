"""Ending sandboxed processes for sure, and reading their output as it comes.

Killing the outer ``bwrap`` of a jail ends everything in it at once: bwrap's
``--die-with-parent`` gives the namespace's init SIGKILL when bwrap dies, and
the kernel kills a PID namespace whole when its init goes. A graceful stop
first gives the programs inside SIGTERM and a short, bounded wait.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import signal
from collections.abc import Iterable, Sequence

import structlog

from sandboxes.base import OutputSink, Stream

logger = structlog.get_logger()

CHUNK = 32 * 1024
#: Bound on waiting for a SIGKILLed process to be reaped.
REAP_TIMEOUT = 2.0
POLL = 0.02
#: Output still read after the command exited, when something else keeps writing.
DRAIN_MAX = 1024 * 1024


def exit_code(returncode: int) -> int:
    """A shell-style exit code: killed by signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def kill_now(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL a jail's outer process group; its namespace dies with it."""
    if proc.returncode is not None:
        return
    # killpg, not proc.kill(): Popen.send_signal polls the child first, which
    # races asyncio's child watcher for its exit status. The jail's outer
    # process leads its own group (start_new_session), so this reaches it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def reap(proc: asyncio.subprocess.Process, timeout: float = REAP_TIMEOUT) -> None:
    """Kill *proc* if it still runs and wait, within *timeout*, for its end."""
    kill_now(proc)
    try:
        async with asyncio.timeout(timeout):
            await proc.wait()
    except TimeoutError:
        logger.warning("sandbox.reap_timeout", pid=proc.pid)


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


async def wait_gone(pids: list[int], timeout: float) -> None:
    # Not our children (they live in the jails' namespaces), so no wait():
    # a short poll of /proc, bounded by *timeout*.
    for _ in range(max(1, round(timeout / POLL))):
        if not any(_alive(p) for p in pids):
            return
        await asyncio.sleep(POLL)


async def terminate(procs: Iterable[asyncio.subprocess.Process], *, grace: float) -> int:
    """End *procs*, the jails' outer processes, with all inside; how many ignored SIGTERM.

    Programs inside get SIGTERM and *grace* seconds; then the outer bwraps get
    SIGKILL, which ends their namespaces. The programs are found by walking
    down from the outer processes (orphans in a jail are adopted by its init,
    so none escapes the walk), never by scanning every process of the host.
    Callers end whatever of the session's uid is left after this.
    """
    procs = list(procs)
    inits = [child for proc in procs for child in _children(proc.pid)]
    # Not the jails' inits (bwrap's, or a long-lived jail's spawner): they
    # ignore signals from outside anyway, and die with their namespace.
    inner = descendants(inits)
    _signal_all(inner, signal.SIGTERM)
    await wait_gone(inner, grace)
    stubborn = sum(1 for pid in inner if _alive(pid))
    for proc in procs:
        kill_now(proc)
    async with asyncio.TaskGroup() as tg:
        for proc in procs:
            tg.create_task(reap(proc))
    return stubborn


def descendants(roots: Iterable[int]) -> list[int]:
    """Every process below *roots* (not the roots), from /proc/<pid>/task/*/children."""
    found: list[int] = []
    todo = list(roots)
    seen = set(todo)
    while todo:
        for child in _children(todo.pop()):
            if child not in seen:
                seen.add(child)
                found.append(child)
                todo.append(child)
    return found


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    children: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children += map(int, f.read().split())
        except (OSError, ValueError):
            continue
    return children


async def pump_both(
    pipes: Sequence[tuple[int, Stream]], sink: OutputSink, exited: asyncio.Future[int] | None = None
) -> None:
    """Stream both pipes apart, at once, until both close (or the command has exited)."""
    try:
        async with asyncio.TaskGroup() as tg:
            for fd, name in pipes:
                tg.create_task(pump(fd, name, sink, exited))
    except BaseExceptionGroup as group:
        # The sink's own error (say, an output cap) reaches the caller as is.
        raise group.exceptions[0] from None


async def pump(fd: int, stream: Stream, sink: OutputSink, exited: asyncio.Future[int] | None = None) -> None:
    """Forward pipe *fd* to *sink*, decoding UTF-8 incrementally, until it closes.

    With *exited*, once that is done only what is left in the pipe is read: a
    process the command left in the background may hold the pipe open for
    ever, and the command is over when its shell exits.
    """
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    if exited is not None:
        exited.add_done_callback(lambda _: readable.set())
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    after_exit = 0
    try:
        while after_exit < DRAIN_MAX:
            try:
                chunk = os.read(fd, CHUNK)
            except BlockingIOError:
                if exited is not None and exited.done():
                    break
                readable.clear()
                await readable.wait()
                continue
            if not chunk:
                break
            after_exit += len(chunk) if exited is not None and exited.done() else 0
            if text := decoder.decode(chunk):
                await sink(stream, text)
    finally:
        loop.remove_reader(fd)
    if tail := decoder.decode(b"", final=True):
        await sink(stream, tail)
