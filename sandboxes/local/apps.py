"""Programs a local session runs on its desktop, each in a jail of its own.

``run_helper`` runs a desktop helper (xdotool, import) to its end and gives
its output; ``spawn_app`` starts an app that runs until the desktop stops, and
``check_started`` says whether it ended at once. ``open_argv`` and
``launch_argv`` turn an ``open`` or ``launch`` step into the argv to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import attrs

from protocol.errors import ProtocolError, SandboxBroken
from sandboxes.local import tools
from sandboxes.local.config import LocalConfig
from sandboxes.local.desktop import Desktop
from sandboxes.local.jail import HOME, Jail, Mount, spawn
from sandboxes.local.procs import exit_code, reap

PIPE = asyncio.subprocess.PIPE
#: How long a launched program is watched for ending at once (a missing program).
_LAUNCH_CHECK_S = 0.25


async def run_helper(jail: Jail, desktop: Desktop, argv: Sequence[str], timeout: float) -> bytes:
    """Run a desktop helper (xdotool, import) in a jail; its stdout."""
    proc = await spawn(
        jail, argv, mounts=desktop.x_mounts(), display=desktop.display, stdout=PIPE, stderr=PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        raise SandboxBroken(f"{argv[0]} did not finish within {timeout:g} s") from None
    finally:
        await reap(proc)
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip()[-300:]
        raise SandboxBroken(f"{argv[0]} failed with exit code {proc.returncode}: {detail}")
    return out


async def spawn_app(
    jail: Jail, desktop: Desktop, argv: Sequence[str], config: LocalConfig, home: Path
) -> asyncio.subprocess.Process:
    """Start a desktop app in a jail with the home and the display mounted (no CPU or memory rlimit)."""
    app_limits = attrs.evolve(config.limits, cpu_seconds=0, memory_bytes=0)
    mounts = [Mount(home, HOME, writable=True), *desktop.x_mounts()]
    return await spawn(
        jail, argv, mounts=mounts, display=desktop.display, network=config.network_on, limits=app_limits
    )


async def check_started(proc: asyncio.subprocess.Process, name: str) -> None:
    """Raise if *proc* fails at once: a program that cannot start (a name no package provides) says so."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_LAUNCH_CHECK_S):
            code = await proc.wait()
        if code != 0:
            raise SandboxBroken(f"{name} ended at once with exit code {exit_code(code)}")


def open_argv(url_or_file: str, config: LocalConfig) -> list[str]:
    """The browser's argv opening *url_or_file*; refused if it cannot load here."""
    if not url_or_file or url_or_file.startswith("-"):
        raise ProtocolError(f"cannot open {url_or_file!r}")
    if not config.network_on and _needs_network(url_or_file):
        # The browser would show its own error page and the step would pass.
        raise SandboxBroken(
            f"{url_or_file} cannot load: this server gives sandboxes no network (see --sandbox-network)"
        )
    return [*tools.browser_argv(config.browser), url_or_file]


def launch_argv(app: str, browser: str) -> list[str]:
    """The argv of a ``launch`` line: ``terminal`` and the browser's names are ours to spell."""
    try:
        argv = shlex.split(app)
    except ValueError as exc:
        raise ProtocolError(f"cannot read {app[:80]!r} as a program and its arguments: {exc}") from None
    if not argv:
        raise ProtocolError("launch needs an application name")
    if argv[0] == "terminal":
        argv = [tools.TERMINAL, *argv[1:]]
    if argv[0] in tools.BROWSER_NAMES:
        argv = [*tools.browser_argv(browser), *argv[1:]]
    return argv


def _needs_network(url: str) -> bool:
    """Whether opening *url* needs a network: a web address of another host than the sandbox itself."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return False
    return (parts.hostname or "") not in ("localhost", "127.0.0.1", "::1")
