"""Connecting to a desktop's unix sockets, whatever the length of their paths.

A socket address holds at most 107 bytes of path, and a session's sockets sit
under the data folder (``<data-dir>/sandboxes/<session id>/vnc/sock``), which
may be as long as an operator likes. The programs that bind them do so at a
short path inside their jails; the server reaches them from outside through a
descriptor of the socket file: ``/proc/self/fd/N`` is always short, and the
kernel follows it to the socket.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

#: Longest path a unix socket address holds (``sun_path`` is 108 bytes, NUL included).
MAX_PATH = 107


@contextlib.contextmanager
def connectable(path: str | Path) -> Iterator[str]:
    """An address to ``connect`` to the socket at *path*, valid inside the ``with``.

    Raises ``OSError`` as ``open`` does (``FileNotFoundError`` while the
    socket does not exist yet).
    """
    name = os.fspath(path)
    if len(os.fsencode(name)) <= MAX_PATH:
        yield name
        return
    fd = os.open(name, os.O_PATH | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
