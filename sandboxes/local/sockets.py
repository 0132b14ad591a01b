"""Connecting to a desktop's unix sockets, whatever the length of their paths.

A socket address holds at most 107 bytes of path, and a session's sockets sit
under the data folder (``<data-dir>/sandboxes/<session id>/vnc/sock``), which
may be as long as an operator likes. The programs that bind them do so at a
short path inside their jails; the server reaches them from outside through a
descriptor of the socket file: ``/proc/self/fd/N`` is always short, and the
kernel follows it to the socket. The descriptor is opened without following a
link (the socket's folder is the session's uid's to write), so the server
(root) only ever connects to a socket the session's program bound there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from sandboxes.local.hostpaths import open_nofollow

#: Longest path a unix socket address holds (``sun_path`` is 108 bytes, NUL included).
MAX_PATH = 107


@contextlib.contextmanager
def connectable(path: str | Path) -> Iterator[str]:
    """An address to ``connect`` to the socket at *path*, valid inside the ``with``.

    Raises ``OSError`` as ``open`` does (``FileNotFoundError`` while the
    socket does not exist yet, ``ELOOP`` for a link or anything but a socket).
    """
    fd = open_nofollow(path, "socket")
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
