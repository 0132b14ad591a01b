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
from collections.abc import Iterable

import structlog

from sandboxes.base import OutputSink, Stream
from sandboxes.local.jail import Jail, session_pids

logger = structlog.get_logger()

CHUNK = 32 * 1024
#: Bound on waiting for a SIGKILLed process to be reaped.
REAP_TIMEOUT = 2.0
POLL = 0.02


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


async def terminate(jail: Jail, procs: Iterable[asyncio.subprocess.Process], *, grace: float) -> int:
    """End *procs* and every other process of the session; return the leftovers killed.

    Programs inside get SIGTERM and *grace* seconds; then the jails' outer
    bwraps get SIGKILL, which ends their namespaces, and any process of the
    session still found in /proc gets SIGKILL too.
    """
    procs = list(procs)
    outer = {p.pid for p in procs}
    # Not the jails' own processes: bwrap, and a long-lived jail's spawner
    # (the direct child of its outer bwrap, which a SIGTERM never stops).
    inner = [
        pid
        for pid in session_pids(jail)
        if pid not in outer and _comm(pid) != "bwrap" and _ppid(pid) not in outer
    ]
    _signal_all(inner, signal.SIGTERM)
    await wait_gone(inner, grace)
    for proc in procs:
        kill_now(proc)
    async with asyncio.TaskGroup() as tg:
        for proc in procs:
            tg.create_task(reap(proc))
    stragglers = session_pids(jail)
    _signal_all(stragglers, signal.SIGKILL)
    await wait_gone(stragglers, REAP_TIMEOUT)
    return len(stragglers)


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


async def pump(reader: asyncio.StreamReader | None, stream: Stream, sink: OutputSink) -> None:
    """Forward *reader* to *sink* chunk by chunk, decoding UTF-8 incrementally."""
    if reader is None:
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := await reader.read(CHUNK):
        if text := decoder.decode(chunk):
            await sink(stream, text)
    if tail := decoder.decode(b"", final=True):
        await sink(stream, tail)


async def pump_both(proc: asyncio.subprocess.Process, sink: OutputSink) -> None:
    """Stream stdout and stderr apart, both at once, until both close."""
    streams: tuple[tuple[asyncio.StreamReader | None, Stream], ...] = (
        (proc.stdout, "stdout"),
        (proc.stderr, "stderr"),
    )
    try:
        async with asyncio.TaskGroup() as tg:
            for reader, name in streams:
                tg.create_task(pump(reader, name, sink))
    except BaseExceptionGroup as group:
        # The sink's own error (say, an output cap) reaches the caller as is.
        raise group.exceptions[0] from None
