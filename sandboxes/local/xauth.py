"""X authority for a session's desktop: a cookie its programs must show.

Xvfb starts with ``-auth``, so a client that reaches the display's socket
but lacks the cookie is refused before it can draw, read the screen or send
input. Each desktop run gets a new cookie, written by the server into the
session's ``auth/`` folder (root's, read-only in the jails, mounted at
``AUTH_DIR``); programs find it through ``XAUTHORITY``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
from pathlib import Path

#: Where jails see the session's auth folder, and the file in it.
AUTH_DIR = "/run/x11auth"
FILE = "Xauthority"
XAUTHORITY = f"{AUTH_DIR}/{FILE}"
#: An entry for any host: inside a jail the hostname is the jail's own.
FAMILY_WILD = 0xFFFF
PROTOCOL = b"MIT-MAGIC-COOKIE-1"


def entry(display: int, cookie: bytes) -> bytes:
    """One Xauthority entry (libXau's format: big-endian lengths before each field)."""
    fields = (b"", str(display).encode(), PROTOCOL, cookie)
    return struct.pack(">H", FAMILY_WILD) + b"".join(struct.pack(">H", len(f)) + f for f in fields)


def write(folder: Path, display: int) -> bytes:
    """Write a fresh cookie for *display* into *folder* (root's), replacing any; the cookie."""
    cookie = secrets.token_bytes(16)
    tmp = folder / f".{FILE}.new"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # Readable by the session's uid (the folder is reachable only through its jails' mounts).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, entry(display, cookie))
    finally:
        os.close(fd)
    os.replace(tmp, folder / FILE)
    return cookie


def remove(folder: Path) -> None:
    """The desktop is gone: its cookie with it."""
    with contextlib.suppress(FileNotFoundError):
        (folder / FILE).unlink()
