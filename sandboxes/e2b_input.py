"""When the E2B desktop last had keyboard or pointer input, its own stream's included.

A user who works only in E2B's noVNC sends nothing through deskhive: their
input reaches the sandbox's X server by x11vnc. So the sandbox is asked. One
long-lived watcher per desktop (a small Python program on the X display,
started with the stream) writes when the X server last saw input to a file,
every few seconds; the sweep reads that file with a plain ``cat``.

The watcher keeps one X connection on purpose: on Xvfb, the idle time a new
X client reads counts from the last client connection, so a probe that
connected each time would reset what it measures.
"""

from __future__ import annotations

from e2b import AsyncSandbox

from sandboxes.e2b_desktop import DISPLAY

#: Where the watcher keeps the time (epoch seconds) of the last input.
WATCH_FILE = "/tmp/deskhive-last-input"
#: Seconds between two of the watcher's readings.
WATCH_EVERY_S = 5


def watcher_source(path: str = WATCH_FILE, every: float = WATCH_EVERY_S) -> str:
    """The watcher's Python program: writes (and prints) the time of the last input to *path*."""
    return f"""
import ctypes, ctypes.util, os, time
class Info(ctypes.Structure):
    _fields_ = [("window", ctypes.c_ulong), ("state", ctypes.c_int), ("kind", ctypes.c_int),
                ("since", ctypes.c_ulong), ("idle", ctypes.c_ulong), ("mask", ctypes.c_ulong)]
x11 = ctypes.CDLL(ctypes.util.find_library("X11") or "libX11.so.6")
xss = ctypes.CDLL(ctypes.util.find_library("Xss") or "libXss.so.1")
x11.XOpenDisplay.restype = ctypes.c_void_p
x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
x11.XDefaultRootWindow.restype = ctypes.c_ulong
x11.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(Info)
xss.XScreenSaverQueryInfo.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(Info)]
display = x11.XOpenDisplay(None)
info = xss.XScreenSaverAllocInfo()
root = x11.XDefaultRootWindow(display) if display else 0
while display and xss.XScreenSaverQueryInfo(display, root, info):
    last = "%.3f" % (time.time() - info.contents.idle / 1000)
    with open("{path}.new", "w") as out:
        out.write(last)
    os.replace("{path}.new", "{path}")
    print(last, flush=True)
    time.sleep({every})
"""


#: Starts the watcher afresh. Its marker argument is quoted in the shell's own
#: text, so that ``pkill -f`` matches the old watcher and never this shell.
WATCH_COMMAND = (
    "pkill -f 'deskhive-input-watc[h]'; "
    'exec python3 -c "$DESKHIVE_WATCHER" deskhive-input-wat"ch" >/dev/null 2>&1'
)
#: The sandbox's clock and the watcher's last reading, on one line.
PROBE_COMMAND = f"echo $(date +%s.%N) $(cat {WATCH_FILE} 2>/dev/null)"


async def start_watch(sdk: AsyncSandbox) -> None:
    """Start (or restart) the desktop's input watcher in the background."""
    handle = await sdk.commands.run(
        WATCH_COMMAND,
        background=True,
        timeout=0,
        envs={"DISPLAY": DISPLAY, "DESKHIVE_WATCHER": watcher_source()},
    )
    await handle.disconnect()


def idle_from(stdout: str) -> float | None:
    """Seconds since the desktop's last input, from ``PROBE_COMMAND``'s output; ``None`` if unknown."""
    try:
        now, last = (float(field) for field in stdout.split())
    except ValueError:  # no reading yet (or no watcher): unknown, never "active"
        return None
    return max(0.0, now - last)
