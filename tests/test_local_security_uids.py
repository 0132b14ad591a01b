"""Session uids: each server instance its own range, a bound per user, a uid taken back on restore."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import Settings
from protocol.errors import SandboxBroken
from sandboxes.base import SandboxSpec
from sandboxes.local import uids
from sandboxes.local.identity import UIDS, Identity, lock_uid
from sandboxes.local.sandbox import LocalSandbox
from tests.conftest import MakeLocal
from tests.test_local_sandbox import run
from wiring import sandbox_factory

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="uids are only handed out by a root server"),
]


@pytest.fixture
def locks(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "ranges"
    yield folder
    for first in list(uids._HELD):
        if (folder / str(first)).exists():
            uids.release_range(uids.UidRange(first, uids.RANGE_SIZE))


def slot_of(root: Path) -> int:
    digest = hashlib.sha256(os.fspath(root.resolve()).encode()).digest()
    return int.from_bytes(digest[:8], "big") % uids.SLOTS


def hold(locks: Path, first: int) -> int:
    """Lock range *first* as another server's process would (an open file of its own)."""
    locks.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(locks / str(first), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"/srv/other\n")
    return fd


def test_a_range_another_server_holds_or_a_subuid_range_covers_is_skipped(
    tmp_path: Path, locks: Path
) -> None:
    """The folder's range is another server's, the next a subuid range: a third range is used."""
    root = tmp_path / "a" / "sandboxes"
    own = uids.SPACE_BASE + slot_of(root) * uids.RANGE_SIZE
    fd = hold(locks, own)
    try:
        second = uids.UidRange(own + uids.RANGE_SIZE, uids.RANGE_SIZE)
        got = uids.instance_range(root, locks=locks, subids=[second])
        assert got.first not in (own, second.first) and not got.overlaps(own, 2 * uids.RANGE_SIZE)
    finally:
        os.close(fd)


def test_a_restart_keeps_its_range_and_a_second_server_on_the_folder_is_refused(
    tmp_path: Path, locks: Path
) -> None:
    """The recorded range comes back after a restart; held by another process, start-up fails naming it."""
    root = tmp_path / "a" / "sandboxes"
    first = uids.instance_range(root, locks=locks, subids=[])
    uids.release_range(first)  # the server exited
    again = uids.instance_range(root, locks=locks, subids=[])
    assert again == first
    uids.release_range(again)
    fd = hold(locks, first.first)
    try:
        with pytest.raises(SandboxBroken, match=r"held by another deskhive server.*/srv/other"):
            uids.instance_range(root, locks=locks, subids=[])
    finally:
        os.close(fd)


async def test_two_servers_on_one_host_run_their_sessions_as_disjoint_uids(root: Path) -> None:
    """Servers with two data folders run sessions in ranges of their own, outside every subuid range."""
    seen = []
    for name in ("one", "two"):
        data = root / name
        factory = sandbox_factory(Settings(data_dir=data))
        spec = SandboxSpec(session_id=f"ada_1700000000_{len(seen):016x}", username="ada", data_dir=data)
        sandbox = factory(spec)
        assert isinstance(sandbox, LocalSandbox)
        try:
            code, out = await run(sandbox, "id -u")
            assert code == 0
            seen.append(int(out.text()))
        finally:
            async with asyncio.timeout(10):
                await sandbox.close()
    one, two = seen
    assert one // uids.RANGE_SIZE != two // uids.RANGE_SIZE
    assert not any(r.overlaps(uid, 1) for r in uids.subid_ranges() for uid in seen)


async def test_one_user_holds_at_most_its_share_of_uids(make: MakeLocal) -> None:
    """With two uids per user, a third session of the same user fails clearly until one ends; others go on."""
    a, b, c = (make("ada", uids_per_user=2) for _ in range(3))
    assert (await run(a, "true"))[0] == 0
    assert (await run(b, "true"))[0] == 0
    with pytest.raises(SandboxBroken, match="'ada' already holds 2 sandbox uids"):
        await run(c, "true")
    assert (await run(make("bob", uids_per_user=2), "true"))[0] == 0
    await a.close()
    assert (await run(c, "true"))[0] == 0


async def test_a_uid_given_back_can_be_claimed_again_and_a_held_one_cannot(make: MakeLocal) -> None:
    """``Identity.claim`` takes a freed uid back (a restored session's), and refuses one a session holds."""
    a, b = make("ada"), make("bob")
    assert (await run(a, "true"))[0] == 0 and (await run(b, "true"))[0] == 0
    assert a.jail is not None and b.jail is not None
    uid = a.jail.identity.uid
    await a.close()
    claimed = await asyncio.to_thread(Identity.claim, uid)
    try:
        assert claimed.uid == uid and claimed.dropped
    finally:
        claimed.release()
    with pytest.raises(SandboxBroken, match="in use"):
        await asyncio.to_thread(Identity.claim, b.jail.identity.uid)


async def test_a_session_idle_after_kill_desktop_holds_no_uid_and_gets_its_own_back(make: MakeLocal) -> None:
    """After the desktop stops nothing holds the session's uid; its next command runs as it again."""
    # A range of its own: sandboxes of other test runs on the host take the lowest free uids.
    sandbox = make("ada", uid_base=270_000 + (os.getpid() % 1000) * 10, uid_count=10)
    assert (await run(sandbox, "echo mine > note"))[0] == 0
    assert sandbox.jail is not None
    uid = sandbox.jail.identity.uid
    for _ in range(5):  # "run true; kill_desktop" in a loop takes nothing from the pool
        await sandbox.stop_desktop()
        assert uid not in UIDS._taken
        fd = lock_uid(uid)
        assert fd is not None  # free host-wide too
        os.close(fd)
        code, out = await run(sandbox, "stat -c %u note; cat note")
        assert code == 0 and out.text().split() == [str(uid), "mine"]


async def test_a_session_whose_idle_uid_was_taken_moves_to_another_with_its_files(make: MakeLocal) -> None:
    """If another server took the idle session's uid, the next command runs as a new uid owning the home."""
    sandbox = make("ada")
    assert (await run(sandbox, "mkdir -p d && echo mine > d/note && ln -s /etc/passwd link"))[0] == 0
    assert sandbox.jail is not None
    uid = sandbox.jail.identity.uid
    await sandbox.stop_desktop()
    held = lock_uid(uid)
    assert held is not None
    try:
        code, out = await run(sandbox, "id -u; stat -c %u d d/note; cat d/note; echo x >> d/note")
        assert code == 0, out.text()
        new, *owners, text = out.text().split()
        assert new != str(uid) and owners == [new, new] and text == "mine"
        assert os.stat("/etc/passwd").st_uid == 0  # the link was not followed
    finally:
        os.close(held)
