"""The session's folder, shown to its jails' bwrap at a path every uid can walk.

bwrap runs as the session's uid and resolves every bind source by path, even
one given by descriptor (``--bind-fd`` is ``realpath("/proc/self/fd/N")`` in
bwrap 0.8), so the session's uid would need x on every folder above its
session folder: a data folder under ``/root`` could not work, and making the
folders above enterable lets other accounts walk them too. Instead each jail
starts as root in a mount namespace of its own, bind-mounts (``--rbind``,
so a home's image comes along) the session's folder on ``PORTAL``, then drops
to the session's uid with ``setpriv`` and runs bwrap, whose bind sources are
paths under ``PORTAL``. The mount lives and dies with that one namespace:
nothing is left mounted on the host, whatever happens to the server.

Only the session's folder is reachable this way, and only by its own uid
(the folder is 0710 root with the session's group).
"""

from __future__ import annotations

import os
from pathlib import Path

PORTAL = "/run/deskhive/portal"
UNSHARE = "/usr/bin/unshare"
MOUNT = "/usr/bin/mount"
SETPRIV = "/usr/bin/setpriv"
#: Run as root in the new mount namespace: the bind, then the rest of argv.
_SCRIPT = f'{MOUNT} --rbind -- "$1" "$2" || exit 125; shift 2; exec "$@"'


def ensure() -> None:
    """The mount point, root's, walkable by every uid (nothing is ever mounted on it outside a jail)."""
    os.makedirs(PORTAL, mode=0o755, exist_ok=True)
    os.chmod(os.path.dirname(PORTAL), 0o711)
    os.chmod(PORTAL, 0o755)


def prefix(base: Path, uid: int, gid: int) -> list[str]:
    """What runs before the jail's prlimit and bwrap: a mount namespace, the bind, the uid switch."""
    return [
        UNSHARE, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _SCRIPT, "portal",
        os.fspath(base), PORTAL, SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
    ]  # fmt: skip


def source(base: Path, host: Path) -> str | None:
    """*host*'s path under the portal, if it is in the session's folder *base*; else ``None``."""
    try:
        rest = host.relative_to(base)
    except ValueError:
        return None
    return os.path.join(PORTAL, rest) if rest.parts else PORTAL
