"""A home's disk and inode bound: filling it fails the session's writes, not the host's."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from config import from_args, parser
from sandboxes.local import quota
from sandboxes.local.quota import HomeQuota
from tests.conftest import MakeLocal
from tests.test_local_sandbox import run

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.skipif(quota.unavailable() is not None, reason=f"no home images here: {quota.unavailable()}"),
]

SMALL = HomeQuota(bytes=64 * 1024**2, inodes=2048)


async def test_a_full_home_fails_the_sessions_writes_and_leaves_the_host_alone(
    make: MakeLocal, root: Path
) -> None:
    """Writing 200 MB into a 64 MiB home fails with ENOSPC; the host's folder takes little of it."""
    sandbox = make("ada", home_quota=SMALL)
    before = shutil.disk_usage(root).free
    code, out = await run(sandbox, "head -c 200000000 /dev/zero > big; echo rc=$?; df -k . | tail -1")
    assert "No space left on device" in out.text() and "rc=1" in out.text()
    assert (sandbox.home / "big").stat().st_size < 64 * 1024**2
    assert before - shutil.disk_usage(root).free < 100 * 1024**2
    code, _ = await run(sandbox, "rm big && echo small > note")
    assert code == 0 and (sandbox.home / "note").read_text() == "small\n"


async def test_a_home_runs_out_of_files_at_its_inode_bound(make: MakeLocal) -> None:
    """Creating 5000 files in a home bounded to 2048 inodes fails part-way with ENOSPC."""
    sandbox = make("ada", home_quota=SMALL)
    script = "for i in $(seq 5000); do : > f$i || { echo stopped at $i; exit 3; }; done"
    code, out = await run(sandbox, script)
    assert code == 3 and "No space left on device" in out.text()
    assert 1000 < len(os.listdir(sandbox.home)) <= 2048


async def test_closing_a_bounded_session_unmounts_and_removes_its_home(make: MakeLocal) -> None:
    """After close nothing is mounted under the session's folder and the folder is gone."""
    sandbox = make("ada", home_quota=SMALL)
    assert (await run(sandbox, "echo kept > note"))[0] == 0
    base = sandbox.home.parent
    assert quota.mounts_under(base) == [os.fspath(sandbox.home)]
    async with asyncio.timeout(20):
        await sandbox.close()
    assert quota.mounts_under(base) == [] and not base.exists()


def test_home_quota_option_takes_a_size_and_inodes() -> None:
    """`--home-quota 2GiB:1000` is 2 GiB and 1000 inodes; the default is 5 GiB and 500,000; 0 is none."""
    serve = parser()
    assert from_args(serve.parse_args(["serve", "--home-quota", "2GiB:1000"]), {}).home_quota == (
        2 * 1024**3,
        1000,
    )
    assert from_args(serve.parse_args(["serve"]), {}).home_quota == (5 * 1024**3, 500_000)
    assert from_args(serve.parse_args(["serve"]), {"DESKHIVE_HOME_QUOTA": "0"}).home_quota[0] == 0
    with pytest.raises(SystemExit):
        serve.parse_args(["serve", "--home-quota", "lots"])


async def test_more_bounded_homes_than_the_loop_nodes_in_dev_are_all_bounded(make: MakeLocal) -> None:
    """Ten sessions at once (a container's /dev has loop0..7) each get a home of their own filesystem."""
    sandboxes = [make(f"u{i}", home_quota=SMALL) for i in range(10)]
    for sandbox in sandboxes:
        assert (await run(sandbox, "true"))[0] == 0
    mounted = set(quota.mounts_under(sandboxes[0].home.parent.parent))
    assert mounted == {os.fspath(s.home) for s in sandboxes}
