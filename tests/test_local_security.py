"""Another local account against a session's desktop and files; programs planted in a home."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandboxes.base import SandboxSpec
from sandboxes.local import LocalConfig, LocalSandbox, portal, quota, xauth
from sandboxes.local.sockets import connectable
from tests.conftest import MakeLocal
from tests.test_local_sandbox import run

pytestmark = [
    pytest.mark.skipif(shutil.which("x11vnc") is None, reason="the desktop's programs are not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="other accounts are only kept out by a root server"),
]

NOBODY = ("/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


async def as_nobody(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str]:
    """Run *argv* as the host's ``nobody``; its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        *NOBODY, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", **(env or {})}, cwd=cwd,
    )  # fmt: skip
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@contextlib.asynccontextmanager
async def relay(target: Path) -> AsyncIterator[int]:
    """A host X display number whose (abstract) socket relays to *target*: the attack's tool."""

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with connectable(target) as address:
            up_r, up_w = await asyncio.open_unix_connection(address)

        async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(copy(reader, up_w), copy(up_r, writer))

    display = random.randrange(3000, 4000)
    server = await asyncio.start_unix_server(forward, path=f"\0/tmp/.X11-unix/X{display}")
    try:
        yield display
    finally:
        server.close()


@pytest.fixture
async def desktop(make: MakeLocal) -> LocalSandbox:
    sandbox = make("ada")
    async with asyncio.timeout(20):
        await sandbox.start_desktop()
    assert (await run(sandbox, "echo topsecret > secret.txt"))[0] == 0
    return sandbox


async def test_another_account_cannot_list_sessions_reach_the_display_or_read_the_home(
    desktop: LocalSandbox,
) -> None:
    """As `nobody`: listing the sessions, connecting to the X socket and reading the home all fail."""
    assert desktop._desktop is not None
    x_socket = desktop._desktop.x_socket
    code, out = await as_nobody("ls", str(desktop.home.parent.parent))
    assert code != 0 and desktop.home.parent.name not in out
    # From inside the session's folder (a short relative path: nothing is in the way but rights).
    connect = f"import socket; socket.socket(socket.AF_UNIX).connect('x11/{x_socket.name}')"
    code, out = await as_nobody("/usr/bin/python3", "-c", connect, cwd=x_socket.parent.parent)
    assert code != 0 and "PermissionError" in out
    code, out = await as_nobody("cat", str(desktop.home / "secret.txt"))
    assert code != 0 and "topsecret" not in out


@pytest.mark.skipif(shutil.which("xdpyinfo") is None, reason="xdpyinfo is not installed")
async def test_an_x_client_without_the_cookie_is_refused_even_through_a_relay(
    desktop: LocalSandbox, root: Path
) -> None:
    """`xdpyinfo` as `nobody`, relayed to the display's socket by root, is refused without the cookie."""
    assert desktop._desktop is not None
    async with relay(desktop._desktop.x_socket) as display:
        code, out = await as_nobody("xdpyinfo", "-display", f":{display}")
        assert code != 0 and "unable to open display" in out
        # The relay itself works: the same client with the desktop's cookie gets in.
        cookie = (desktop._desktop.auth_dir / xauth.FILE).read_bytes()[-16:]
        allowed = root / "allowed"  # root is 0711: nobody reaches it by name
        allowed.write_bytes(xauth.entry(display, cookie))
        allowed.chmod(0o644)
        code, out = await as_nobody("xdpyinfo", "-display", f":{display}", env={"XAUTHORITY": str(allowed)})
        assert code == 0 and "screen #0" in out


async def test_the_sessions_own_programs_draw_with_the_cookie_and_nothing_without(
    desktop: LocalSandbox,
) -> None:
    """Commands, screenshots and xdotool reach the display; a command that drops XAUTHORITY is refused."""
    assert (await desktop.screenshot()).startswith(b"\x89PNG")
    assert "x:" in await desktop.xdotool("getmouselocation")
    code, out = await run(desktop, "xdotool getmouselocation")
    assert code == 0 and "x:" in out.text()
    code, out = await run(desktop, "env -u XAUTHORITY xdotool getmouselocation")
    assert code != 0


PLANTED = '#!/bin/sh\ntouch "$HOME/planted-$(basename "$0")"\nexit 0\n'


async def windows(sandbox: LocalSandbox, klass: str) -> str:
    """Ids of the desktop's windows of class *klass*, once there is one (within 30 s)."""
    async with asyncio.timeout(30):
        while True:
            with contextlib.suppress(Exception):
                if found := (await sandbox.xdotool("search", "--class", klass)).strip():
                    return found
            await asyncio.sleep(0.2)


async def test_programs_planted_in_the_home_are_not_what_the_server_starts(desktop: LocalSandbox) -> None:
    """With `xterm` and `chromium` planted in ~/.local/bin, `launch` and `open` start the system's."""
    bin_dir = desktop.home / ".local" / "bin"
    script = f"mkdir -p {bin_dir.relative_to(desktop.home)}"
    assert (await run(desktop, script))[0] == 0
    for name in ("xterm", "chromium", "xdotool", "import", "prlimit"):
        assert (await run(desktop, f"printf %s '{PLANTED}' > .local/bin/{name}; chmod +x .local/bin/{name}"))[
            0
        ] == 0
    await desktop.launch("xterm")
    await desktop.open("about:blank")
    assert await windows(desktop, "xterm")
    assert await windows(desktop, "chromium")
    assert (await desktop.screenshot()).startswith(b"\x89PNG")
    assert not list(desktop.home.glob("planted-*"))


async def test_a_data_folder_under_a_private_folder_works_and_leaves_no_mount(tmp_path: Path) -> None:
    """Under a 0700 folder (as /root is) commands and the desktop run; nothing stays mounted on the host."""
    private = tmp_path / "root-like"
    private.mkdir(mode=0o700)
    spec = SandboxSpec(session_id="ada_1700000000_00000000000000aa", username="ada", data_dir=private)
    sandbox = LocalSandbox(spec, LocalConfig(root=private / "sandboxes"))
    try:
        code, out = await run(sandbox, "echo hi > note; cat note")
        assert (code, out.text()) == (0, "hi\n")
        async with asyncio.timeout(20):
            await sandbox.start_desktop()
        assert (await sandbox.screenshot()).startswith(b"\x89PNG")
        code, out = await run(sandbox, "xdotool getmouselocation")
        assert code == 0 and "x:" in out.text()
        assert quota.mounts_under(Path(portal.PORTAL).parent) == []
    finally:
        async with asyncio.timeout(20):
            await sandbox.close()
