"""Measurements of the local sandbox, as plain async functions returning numbers.

Each builds its sandboxes under a fresh root (searchable by every uid, as the
jails need) and closes them before returning.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sandboxes.base import SandboxSpec, Stream
from sandboxes.local import LocalConfig, LocalSandbox
from sandboxes.local.jail import session_pids


@asynccontextmanager
async def _sandboxes(n: int, config: LocalConfig | None = None) -> AsyncIterator[list[LocalSandbox]]:
    root = Path(tempfile.mkdtemp(prefix="deskhive-bench-"))
    os.chmod(root, 0o711)
    config = config or LocalConfig(root=root)
    made = [
        LocalSandbox(
            SandboxSpec(session_id=f"bench{i}_1700000000_{i:016x}", username=f"bench{i}", data_dir=root),
            config,
        )
        for i in range(n)
    ]
    try:
        yield made
    finally:
        for sandbox in made:
            await sandbox.close()
        shutil.rmtree(root, ignore_errors=True)


async def _ignore(_stream: Stream, _text: str) -> None:
    return None


async def desktop_start_seconds(runs: int = 10) -> float:
    """Median seconds from ``start_desktop()`` to ready (x11vnc answering)."""
    times = []
    async with _sandboxes(1) as (sandbox,):
        for _ in range(runs):
            started = time.perf_counter()
            await sandbox.start_desktop()
            times.append(time.perf_counter() - started)
            await sandbox.stop_desktop()
    return statistics.median(times)


async def _plain_true() -> None:
    """A plain ``true`` with its output piped and read, as a command's is."""
    proc = await asyncio.create_subprocess_exec(
        "true",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await proc.communicate()


async def bwrap_overhead_ratio(runs: int = 200) -> float:
    """What a session pays per command in steady state, as a ratio.

    Median time of ``true`` through ``LocalSandbox.run`` with the session's
    jail already up, over the median of a plain ``true`` started with pipes.
    The jail's one-off start is ``jail_start_seconds``.
    """
    plain, jailed = [], []
    async with _sandboxes(1) as (sandbox,):
        await sandbox.run("true", timeout=10, on_output=_ignore)  # warm up: folders, uid, the jail
        for _ in range(runs):
            started = time.perf_counter()
            await _plain_true()
            plain.append(time.perf_counter() - started)
            started = time.perf_counter()
            await sandbox.run("true", timeout=10, on_output=_ignore)
            jailed.append(time.perf_counter() - started)
    return statistics.median(jailed) / statistics.median(plain)


async def jail_start_seconds(runs: int = 20) -> float:
    """Median seconds of a session's first ``true``: its jail's start plus the command.

    Each round stops the desktop (which ends the command jail), so the next
    command starts a new jail.
    """
    times = []
    async with _sandboxes(1) as (sandbox,):
        await sandbox.run("true", timeout=10, on_output=_ignore)  # folders and uid are not the jail
        for _ in range(runs):
            await sandbox.stop_desktop()
            started = time.perf_counter()
            await sandbox.run("true", timeout=10, on_output=_ignore)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _pss_bytes(pids: list[int]) -> int:
    """Proportional set size: shared pages (libraries) split among their users."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


async def idle_desktops_pss_bytes(n: int = 1) -> int:
    """Memory (summed PSS) of *n* idle desktops: Xvfb, window manager, x11vnc, their jails."""
    async with _sandboxes(n) as made:
        for sandbox in made:
            await sandbox.start_desktop()
        await asyncio.sleep(1.0)  # let each x11vnc settle after its start
        return sum(_pss_bytes(session_pids(s.jail)) for s in made if s.jail is not None)


async def main() -> None:
    print(f"desktop start to ready, median: {await desktop_start_seconds():.3f} s")
    print(f"bwrap overhead on `true` (warm jail): x{await bwrap_overhead_ratio():.1f}")
    print(f"command jail start (first `true`), median: {await jail_start_seconds() * 1000:.1f} ms")
    print(f"one idle desktop: {await idle_desktops_pss_bytes(1) / 2**20:.1f} MiB")
    print(f"20 idle desktops: {await idle_desktops_pss_bytes(20) / 2**20:.1f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
