"""How the server (root) names programs and opens the files it hands to jails.

Two rules, both about paths a session can influence:

- Programs are found on the host's system folders only (``SYSTEM_PATH``),
  never on the session's ``PATH``, whose first entry is its own
  ``~/.local/bin``: a ``chromium`` planted there must not be what
  ``open`` runs.
- A file or folder the server opens for a jail (a bind source, a socket) is
  opened with ``O_NOFOLLOW`` on its last component, and must be of the kind
  expected. Its parents are the session's folder and folders above it, which
  root alone may change: every folder a session's uid can write (``home``,
  ``x11``, ``vnc``) sits right under the session's folder, so the last
  component is the only one a session could make a link.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from protocol.errors import SandboxBroken

#: Where programs the server starts are looked for: root-owned, read-only in every jail.
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"

_KINDS = {"folder": stat.S_ISDIR, "socket": stat.S_ISSOCK, "file": stat.S_ISREG}


def program(name: str) -> str:
    """The absolute path of program *name* on the host's system folders; a path is kept as given."""
    if "/" in name:
        return name
    found = shutil.which(name, path=SYSTEM_PATH)
    if found is None:
        raise SandboxBroken(f"there is no program {name!r} on this host (looked in {SYSTEM_PATH})")
    return found


def open_nofollow(path: Path | str, kind: str, flags: int = os.O_PATH) -> int:
    """A descriptor of *path*, which must be a *kind* ("folder", "socket", "file") and not a link.

    Raises ``OSError`` as ``open`` does (``FileNotFoundError`` while it does
    not exist yet); a link or a wrong kind raises ``OSError(ELOOP)``.
    """
    extra = os.O_DIRECTORY if kind == "folder" else 0
    fd = os.open(path, flags | extra | os.O_NOFOLLOW | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if _KINDS[kind](mode):
        return fd
    os.close(fd)
    # O_PATH | O_NOFOLLOW opens a link itself instead of failing on it.
    what = "a link" if stat.S_ISLNK(mode) else "not a " + kind
    raise OSError(errno.ELOOP, f"{path} is {what}; refused")
