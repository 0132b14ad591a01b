"""The ``e2b`` backend when E2B misbehaves: expiry, refusals, failed kills, crashes, load."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from protocol.errors import SandboxBroken, SessionClosed
from sandboxes.base import Stream
from sandboxes.e2b import E2BSandbox, sweep_orphans
from sandboxes.e2b_sdk import SandboxLost
from tests.e2b_envd import Script
from tests.e2b_service import SPEC, E2BService, e2b_service, make_config, sandbox, spec

__all__ = ["e2b_service", "sandbox"]  # fixtures


async def discard(_stream: Stream, _data: str) -> None:
    """An output sink that drops everything."""


async def test_busy_sessions_starve_no_one_and_all_are_killed(e2b_service: E2BService) -> None:
    """More sessions running commands than executor threads: others still answer, and all get killed."""
    busy = [E2BSandbox(spec(f"user{i}"), make_config(e2b_service)) for i in range(10)]
    scripts = [e2b_service.on(f"hold {i}", Script(hang=True)) for i in range(len(busy))]
    other = E2BSandbox(spec("other"), make_config(e2b_service))
    async with asyncio.timeout(20):
        jobs = [
            asyncio.ensure_future(b.run(f"hold {i}", timeout=60, on_output=discard))
            for i, b in enumerate(busy)
        ]
        for script in scripts:
            await script.started.wait()
        # The held commands never end, so any bound tells a free executor from
        # a full one; a loaded machine may take seconds over a screenshot.
        async with asyncio.timeout(15):
            assert (await other.screenshot()).startswith(b"\x89PNG")
            assert await asyncio.to_thread(lambda: "executor free") == "executor free"
        for job in jobs[::2]:
            job.cancel()
        await asyncio.gather(*(b.close() for b in [*busy, other]))
        await asyncio.gather(*jobs, return_exceptions=True)
    assert [b.kills for b in e2b_service.boxes.values()] == [1] * 11
    assert all(p.ended.is_set() for b in e2b_service.boxes.values() for p in b.processes)


async def test_kill_in_close_survives_cancellation(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """Cancelling close (a supervisor's stop timeout) stops the waiting, never the kill."""
    await sandbox.run("true", timeout=5, on_output=discard)
    async with asyncio.timeout(5):
        closing = asyncio.ensure_future(sandbox.close())
        await asyncio.sleep(0)  # let close start its kill
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await e2b_service.killed.wait()
    assert e2b_service.only().kills == 1


async def test_expired_sandbox_is_lost_and_the_next_start_makes_a_new_one(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """When E2B expires the sandbox, the desktop stops counting as running and a new start works."""
    await sandbox.start_desktop()
    first = e2b_service.only().sandbox_id
    e2b_service.expire(first)
    with pytest.raises(SandboxLost, match=f"e2b sandbox {first} is gone"):
        await sandbox.screenshot()
    assert not sandbox.desktop_running
    assert sandbox.sandbox_id is None
    assert sandbox.lost_reason is not None
    await sandbox.start_desktop()
    assert sandbox.desktop_running
    assert sandbox.sandbox_id not in (None, first)
    assert sandbox.lost_reason is None


async def test_unreachable_sandbox_that_e2b_still_runs_is_kept(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """A sandbox E2B's proxy cannot reach, but E2B still runs, fails the call and stays the session's."""
    await sandbox.start_desktop()
    e2b_service.unreachable = True
    with pytest.raises(SandboxBroken, match="could not be reached during screenshot"):
        await sandbox.screenshot()
    assert sandbox.desktop_running
    e2b_service.unreachable = False
    assert (await sandbox.screenshot()).startswith(b"\x89PNG")


async def test_unreachable_sandbox_that_e2b_no_longer_knows_is_lost(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """An unreachable sandbox the control plane no longer knows counts as lost."""
    await sandbox.start_desktop()
    e2b_service.unreachable = True
    e2b_service.expire(e2b_service.only().sandbox_id)
    with pytest.raises(SandboxLost, match="is gone"):
        await sandbox.left_click(1, 1)
    assert not sandbox.desktop_running


async def test_sandbox_expiring_under_a_command_is_lost(sandbox: E2BSandbox, e2b_service: E2BService) -> None:
    """A command whose sandbox expires mid-way fails as lost, not as a hang or a timeout."""
    script = e2b_service.on("serve", Script(hang=True))
    await sandbox.start_desktop()
    async with asyncio.timeout(10):
        job = asyncio.ensure_future(sandbox.run("serve", timeout=60, on_output=discard))
        await script.started.wait()
        e2b_service.expire(e2b_service.only().sandbox_id)
        with pytest.raises(SandboxLost):
            await job
    assert not sandbox.desktop_running


async def test_failed_kill_keeps_the_sandbox_for_a_later_kill(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """stop_desktop whose kill fails says so and keeps the sandbox, so close still kills it."""
    await sandbox.start_desktop()
    e2b_service.fail_kills = 1
    with pytest.raises(SandboxBroken, match="kill"):
        await sandbox.stop_desktop()
    assert sandbox.sandbox_id == e2b_service.only().sandbox_id
    await sandbox.close()
    assert e2b_service.only().kills == 1


async def test_kill_of_a_sandbox_already_gone_is_not_logged_as_killed(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """A kill that E2B answers with "not found" is logged as already gone."""
    await sandbox.run("true", timeout=5, on_output=discard)
    e2b_service.expire(e2b_service.only().sandbox_id)
    with capture_logs() as logs:
        await sandbox.close()
    assert [e["event"] for e in logs if e["event"].startswith("e2b.")] == ["e2b.already_gone"]


async def test_stream_start_that_timed_out_does_not_block_the_next(e2b_service: E2BService) -> None:
    """After a stream start that timed out half-way, the next start_desktop restarts the stream."""
    box = E2BSandbox(SPEC, make_config(e2b_service, call_timeout=0.5))
    try:
        await box.run("true", timeout=5, on_output=discard)
        e2b_service.on("for _ in $(seq 40); do netstat", Script(hang=True))
        with pytest.raises(SandboxBroken, match=r"stream\.start did not finish in time"):
            await box.start_desktop()
        e2b_service.on("for _ in $(seq 40); do netstat", Script())
        await box.start_desktop()
        assert box.desktop_running
        restarts = [c for c in e2b_service.only().commands() if "x11vnc -storepasswd" in c]
        assert len(restarts) == 2
        assert all(c.startswith("pkill -x x11vnc; pkill -f 'novnc_prox[y]';") for c in restarts)
    finally:
        await box.close()


async def test_rate_limited_create_is_retried_without_a_second_sandbox(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """A create answered 429 is retried by the SDK with the same idempotency key: one sandbox."""
    e2b_service.refuse_creates = 1
    await sandbox.start_desktop()
    assert len(e2b_service.boxes) == 1
    first, second = e2b_service.create_keys
    assert first is not None and first == second


async def test_create_refused_for_good_is_sandbox_broken(e2b_service: E2BService) -> None:
    """A create E2B keeps refusing fails clearly, naming the rate limit."""
    e2b_service.refuse_creates = 10
    connection = {**e2b_service.api_params(), "retries": 0}
    box = E2BSandbox(SPEC, make_config(e2b_service, connection=connection))
    with pytest.raises(SandboxBroken, match="rate limited"):
        await box.start_desktop()
    await box.close()
    assert e2b_service.boxes == {}


async def test_cancelled_create_kills_the_sandbox_it_made(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """A create cancelled before E2B answered still has its sandbox found by its tags and killed."""
    e2b_service.hold_creates = True
    async with asyncio.timeout(10):
        job = asyncio.ensure_future(sandbox.start_desktop())
        await e2b_service.create_held.wait()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
    assert [b.kills for b in e2b_service.boxes.values()] == [1]


async def test_close_during_creation_kills_the_new_sandbox(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """A sandbox still being created when the session closes is killed once it arrives."""
    e2b_service.hold_creates = True
    async with asyncio.timeout(10):
        job = asyncio.ensure_future(sandbox.start_desktop())
        await e2b_service.create_held.wait()
        await sandbox.close()
        e2b_service.release_creates.set()
        with pytest.raises(SessionClosed):
            await job
    assert [b.kills for b in e2b_service.boxes.values()] == [1]


async def test_orphans_of_this_instance_are_swept_at_start_up(e2b_service: E2BService) -> None:
    """After a crash, the sweep kills this instance's sandboxes no live session owns, and only those."""
    ours = [E2BSandbox(spec(n), make_config(e2b_service)) for n in ("kept", "orphan")]
    theirs = E2BSandbox(spec("theirs"), make_config(e2b_service, instance_id="other-instance"))
    for box in [*ours, theirs]:
        await box.run("true", timeout=5, on_output=discard)
    kept, orphan = (b.sandbox_id for b in ours)
    assert kept is not None and orphan is not None
    # The server "crashed": nothing was closed. The restarted one sweeps.
    killed = await sweep_orphans(make_config(e2b_service), live_ids={kept})
    assert killed == [orphan]
    assert sorted(b.sandbox_id for b in e2b_service.live()) == sorted([kept, theirs.sandbox_id])


async def test_reattach_takes_over_the_stored_sandbox(e2b_service: E2BService) -> None:
    """A restored session reattaches its sandbox by id and gets a fresh stream on it."""
    before = E2BSandbox(SPEC, make_config(e2b_service))
    await before.start_desktop()
    stored = before.sandbox_id
    assert stored is not None
    await before.release(keep_for=600)
    after = E2BSandbox(SPEC, make_config(e2b_service))
    try:
        assert await after.reattach(stored)
        assert not after.desktop_running
        await after.start_desktop()
        assert after.sandbox_id == stored
        assert after.stream_url is not None and after.stream_url != before.stream_url
        assert len(e2b_service.boxes) == 1
        assert e2b_service.only().timeouts[0] == 600  # release cut E2B's timeout
    finally:
        await after.close()
    assert e2b_service.only().kills == 1


async def test_reattach_to_an_expired_sandbox_reports_it_lost(e2b_service: E2BService) -> None:
    """A stored sandbox E2B no longer runs is reported lost; the next start makes a new one."""
    before = E2BSandbox(SPEC, make_config(e2b_service))
    await before.run("true", timeout=5, on_output=discard)
    stored = before.sandbox_id
    assert stored is not None
    e2b_service.expire(stored)
    after = E2BSandbox(SPEC, make_config(e2b_service))
    try:
        assert not await after.reattach(stored)
        assert after.lost_reason is not None and stored in after.lost_reason
        await after.start_desktop()
        assert after.sandbox_id != stored
    finally:
        await after.close()


async def test_keep_alive_holds_e2b_past_the_idle_deadline(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """keep_alive pushes E2B's deadline past the session's, and does not call E2B on every frame."""
    await sandbox.start_desktop()
    box = e2b_service.only()
    await sandbox.keep_alive(3000)  # within the created lifetime: nothing to do
    assert box.timeouts == []
    big = make_config(e2b_service, max_sandbox_timeout=86_400)
    pro = E2BSandbox(spec("pro"), big)
    try:
        await pro.run("true", timeout=5, on_output=discard)
        for _ in range(50):
            await pro.keep_alive(7200)
        (timeout,) = e2b_service.boxes[pro.sandbox_id or ""].timeouts
        assert timeout >= 7200
    finally:
        await pro.close()


async def test_long_command_renews_the_deadline_under_the_plan_cap(e2b_service: E2BService) -> None:
    """A command longer than the plan's set_timeout cap keeps its sandbox alive by renewing it."""
    box = E2BSandbox(SPEC, make_config(e2b_service, max_sandbox_timeout=2))
    script = e2b_service.on("train", Script(hang=True))
    try:
        async with asyncio.timeout(10):
            job = asyncio.ensure_future(box.run("train", timeout=600, on_output=discard))
            await script.started.wait()
            for _ in range(2):
                e2b_service.timeout_set.clear()
                await e2b_service.timeout_set.wait()
            script.release.set()
            assert await job == 0
        timeouts = e2b_service.only().timeouts
        assert len(timeouts) >= 2 and max(timeouts) <= 2
    finally:
        await box.close()


async def test_command_ended_by_our_own_stop_is_not_a_loss(
    sandbox: E2BSandbox, e2b_service: E2BService
) -> None:
    """A command whose sandbox we stopped fails as stopped, and nothing is reported lost."""
    script = e2b_service.on("serve", Script(hang=True))
    async with asyncio.timeout(10):
        job = asyncio.ensure_future(sandbox.run("serve", timeout=60, on_output=discard))
        await script.started.wait()
        await sandbox.stop_desktop()
        with pytest.raises(SandboxBroken, match="was stopped during run") as caught:
            await job
    assert not isinstance(caught.value, SandboxLost)
    assert sandbox.lost_reason is None
