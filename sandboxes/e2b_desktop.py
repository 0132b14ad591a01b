"""The E2B Desktop's display, stream and input, as commands over ``e2b.AsyncSandbox``.

``e2b_desktop.Sandbox`` does the same with ``xdotool`` and friends, but only
synchronously, and with faults a user would notice: its clicks move the
pointer only ``if x and y`` (never to x=0 or y=0); ``write`` types 25
characters per round trip at 75 ms each, so long text outlives any sane
bound; ``press`` lowercases key names it does not map (``Return`` becomes
``return``, which xdotool ignores while exiting 0). Here each action is one
round trip, coordinates are always sent, key names keep their case, and an
unknown key is an error, not a silent no-op.

The commands follow the ``desktop`` template's layout (Xvfb on ``:0``,
XFCE, x11vnc on 5900, noVNC in ``/opt/noVNC`` on 6080), as the SDK does.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Sequence

from e2b import AsyncSandbox
from e2b_desktop.main import KEYS

from protocol.errors import ProtocolError
from sandboxes.base import ScrollDirection

DISPLAY = ":0"
VNC_PORT = 5900
STREAM_PORT = 6080
#: Milliseconds between typed characters (xdotool's own default).
TYPE_DELAY_MS = 12
#: xdotool buttons: the wheel is buttons 4-7.
_SCROLL_BUTTONS: dict[ScrollDirection, int] = {"up": 4, "down": 5, "left": 6, "right": 7}


def wait_until(check: str, seconds: int) -> str:
    """A shell loop, run inside the sandbox, that exits 0 once *check* does (1 after *seconds*)."""
    tries = seconds * 4
    return f"for _ in $(seq {tries}); do {check} && exit 0; sleep 0.25; done; exit 1"


async def boot_display(sdk: AsyncSandbox, resolution: tuple[int, int]) -> None:
    """Start Xvfb and XFCE, as ``e2b_desktop.Sandbox.create`` does, and wait for both."""
    width, height = resolution
    xvfb = await sdk.commands.run(
        f"Xvfb {DISPLAY} -ac -screen 0 {width}x{height}x24 -retro -dpi 96 -nolisten tcp -nolisten unix",
        background=True,
        timeout=0,
    )
    await xvfb.disconnect()
    await sdk.commands.run(wait_until(f"xdpyinfo -display {DISPLAY} >/dev/null 2>&1", 10), timeout=30)
    xfce = await sdk.commands.run("startxfce4", background=True, timeout=0)
    await xfce.disconnect()
    ready = "pgrep -x xfce4-session >/dev/null && pgrep -x xfwm4 >/dev/null && pgrep -x xfdesktop >/dev/null"
    await sdk.commands.run(wait_until(ready, 60), timeout=90)


async def display_alive(sdk: AsyncSandbox) -> bool:
    """Whether the sandbox's X display answers (a reconnected sandbox may have lost it)."""
    result = await sdk.commands.run(f"xdpyinfo -display {DISPLAY} >/dev/null 2>&1 || echo down")
    return "down" not in (result.stdout or "")


async def start_stream(sdk: AsyncSandbox, password: str) -> str:
    """Start x11vnc and noVNC afresh with *password*; the stream's URL.

    A stream left by an earlier start that timed out half-way, or by the
    process before a restart, is stopped first: the SDK would refuse with
    "Stream is already running" and the URL's password would not match.
    """
    # The bracket keeps pkill -f from matching this very shell's command line.
    restart = (
        "pkill -x x11vnc; pkill -f 'novnc_prox[y]'; "
        'mkdir -p ~/.vnc && x11vnc -storepasswd "$VNC_PASSWORD" ~/.vnc/passwd >/dev/null 2>&1 && '
        f"x11vnc -bg -display {DISPLAY} -forever -wait 50 -shared -rfbport {VNC_PORT} -usepw "
        "2>/tmp/x11vnc_stderr.log"
    )
    await sdk.commands.run(restart, envs={"VNC_PASSWORD": password})
    novnc = await sdk.commands.run(
        f"cd /opt/noVNC/utils && ./novnc_proxy --vnc localhost:{VNC_PORT} --listen {STREAM_PORT} "
        "--web /opt/noVNC > /tmp/novnc.log 2>&1",
        background=True,
        timeout=0,
    )
    await novnc.disconnect()
    await sdk.commands.run(wait_until(f"netstat -tuln | grep -q ':{STREAM_PORT} '", 10), timeout=30)
    query = f"autoconnect=true&resize=scale&password={password}"
    return f"https://{sdk.get_host(STREAM_PORT)}/vnc.html?{query}"


async def screenshot(sdk: AsyncSandbox) -> bytes:
    """A PNG of the whole screen, pointer included."""
    path = f"/tmp/deskhive-screenshot-{uuid.uuid4().hex}.png"
    await sdk.commands.run(f"scrot --pointer {path}")
    data = await sdk.files.read(path, format="bytes")
    await sdk.files.remove(path)
    return bytes(data)


def click_command(x: int, y: int, button: int, repeat: int = 1) -> str:
    """Move to (x, y), then click: one round trip, and x=0 or y=0 are real places."""
    again = f" --repeat {repeat}" if repeat > 1 else ""
    return f"xdotool mousemove --sync {int(x)} {int(y)} click{again} {button}"


def move_command(x: int, y: int) -> str:
    return f"xdotool mousemove --sync {int(x)} {int(y)}"


def scroll_command(direction: ScrollDirection, amount: int) -> str:
    return f"xdotool click --repeat {max(1, int(amount))} {_SCROLL_BUTTONS[direction]}"


def write_command(text: str) -> tuple[str, dict[str, str]]:
    """The command that types *text* in one round trip, and its environment.

    The text travels in the environment, not the command line: no quoting
    to get wrong, and no chunks of 25 characters each paying a round trip.
    """
    if "\x00" in text:
        raise ProtocolError("text with a NUL character cannot be typed")
    return f'xdotool type --delay {TYPE_DELAY_MS} -- "$DESKHIVE_TEXT"', {"DESKHIVE_TEXT": text}


def write_seconds(text: str) -> float:
    """How long typing *text* takes at the typing delay."""
    return len(text) * TYPE_DELAY_MS / 1000


def keysym(key: str) -> str:
    """The X keysym for *key*: the SDK's friendly names mapped, anything else kept as given."""
    return KEYS.get(key.lower(), key)


def press_command(keys: str | Sequence[str]) -> str:
    """``xdotool key`` for one key or chord: a list, or a string like ``ctrl+c``, is pressed together."""
    parts = [keys] if isinstance(keys, str) else list(keys)
    names = [name for part in parts for name in (part.split("+") if len(part) > 1 else [part])]
    if not names or any(not name.strip() for name in names):
        raise ProtocolError(f"no key to press in {keys!r}")
    return "xdotool key -- " + shlex.quote("+".join(keysym(n.strip()) for n in names))


def unknown_keys(stderr: str) -> list[str]:
    """The key names xdotool said it does not know (it ignores them and exits 0)."""
    return [line.split("'")[1] for line in stderr.splitlines() if "No such key name" in line and "'" in line]


def open_command(url_or_file: str) -> str:
    return f"xdg-open {shlex.quote(url_or_file)}"


def launch_command(app: str) -> str:
    if app == "terminal":
        # Debian's and Ubuntu's name for whichever terminal the image has.
        return "x-terminal-emulator"
    return f"gtk-launch {shlex.quote(app)}"
