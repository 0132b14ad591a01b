"""Where sessions, shares and journals are kept: ``--store URL``.

- ``sqlite://PATH`` (the default, ``sqlite://<data-dir>/deskhive.db``): a
  durable file; ``sqlite:///var/lib/x.db`` names ``/var/lib/x.db``.
- ``memory``: nothing outlives the process (tests and benchmarks).

A data folder serves one server at a time: :func:`lock_data_dir` refuses a
second one, naming the folder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from protocol.errors import NotConfigured
from store.base import TOMBSTONE_SECONDS, SessionRecord, ShareRecord, Store, StoredJournal
from store.memory import MemoryStore
from store.sqlite import SqliteStore

__all__ = [
    "TOMBSTONE_SECONDS",
    "MemoryStore",
    "SessionRecord",
    "ShareRecord",
    "SqliteStore",
    "Store",
    "StoredJournal",
    "default_url",
    "lock_data_dir",
    "open_store",
]


def default_url(data_dir: Path) -> str:
    return f"sqlite://{data_dir.absolute() / 'deskhive.db'}"


def open_store(url: str, *, journal_size: int) -> Store:
    """The store *url* names (not yet opened: ``await store.open()``)."""
    if url == "memory":
        return MemoryStore(journal_size)
    if url.startswith("sqlite://") and len(url) > len("sqlite://"):
        return SqliteStore(Path(url.removeprefix("sqlite://")), journal_size)
    raise NotConfigured(f"--store must be 'memory' or 'sqlite://PATH', not {url!r}")


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold the data folder for this server; keep the returned file open while serving.

    Raises ``NotConfigured`` naming the folder when another server holds it.
    """
    # A folder made here lists its names to nobody else (its files have their own modes).
    data_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    fd = os.open(data_dir / "deskhive.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    lock = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise NotConfigured(
            f"data folder {data_dir.absolute()} is in use by another deskhive server; "
            "give each server its own --data-dir"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n".encode())
    lock.flush()
    return lock
