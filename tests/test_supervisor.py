"""The supervisor: restarts after crashes, reaping, and a clean close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from actors.session import ActorConfig
from protocol import messages as m
from protocol.errors import QuotaExceeded, SessionClosed, Unauthorized
from supervisor import Supervisor, SupervisorConfig
from tests.conftest import StartServer
from tests.fakes import FakeSandbox


@pytest.fixture
async def supervisor(tmp_path: Path, fakes: list[FakeSandbox]) -> AsyncIterator[Supervisor]:
    """A running supervisor; afterwards no session task may be left."""
    sup = Supervisor(SupervisorConfig(data_dir=tmp_path, stop_grace=2.0), FakeSandbox)
    task = asyncio.create_task(sup.run())
    await sup.wait_running()
    yield sup
    await sup.aclose()
    await asyncio.wait_for(task, 10)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("session:")]


async def _until(predicate: Callable[[], bool]) -> None:
    """Wait, bounded, for a supervisor counter that has no event of its own."""
    async with asyncio.timeout(5.0):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_crashed_actor_restarts_with_its_journal(
    start_server: StartServer, fakes: list[FakeSandbox]
) -> None:
    """An actor that crashes comes back with the same token and journal, and says so in a log event."""
    _, client = await start_server()
    login = await client.login("ann")
    async with client.connect(login) as conn:
        before = await conn.result(await conn.send("run_command", cmd="echo kept"))
        fakes[0].break_stream_url = True
        with capture_logs() as logs:
            await conn.send("get_state", id="boom")
            restarted = await conn.wait_for(lambda e: e.get("event") == "session.restarted")
        assert "stream_url broke" in restarted["error"]
        assert any(entry["event"] == "actor.crashed" for entry in logs)
        pong = await conn.send("ping", id="after")
        assert (await conn.wait_for(lambda e: e["type"] == "pong"))["id"] == pong
    async with client.connect(login) as conn:
        replay = [await conn.recv() for _ in range(before["seq"])]
        assert before in replay
    status = await client.call("GET", "/status", token="admin-secret")
    assert (status["totals"]["crashed"], status["totals"]["restarted"]) == (1, 1)
    assert fakes[0].closed == 0


async def test_crash_loop_marks_the_session_failed(supervisor: Supervisor, fakes: list[FakeSandbox]) -> None:
    """A fourth crash within 60 s ends the session as failed and kills its sandbox."""
    login = await supervisor.spawn("bea")
    actor = login.actor
    for n in range(4):
        await _until(lambda: actor.started.is_set())
        fakes[0].break_stream_url = True
        actor.tell(m.GetState(id=f"g{n}"))
        if n < 3:
            await _until(lambda n=n: supervisor.totals.restarted == n + 1)
    await _until(lambda: len(supervisor) == 0)
    assert actor.state == "failed"
    assert fakes[0].closed == 1
    with pytest.raises(SessionClosed):
        supervisor.by_token(login.token)


async def test_reaper_ends_idle_sessions_only(tmp_path: Path, fakes: list[FakeSandbox]) -> None:
    """With a short idle timeout, an idle session is reaped while one running a job is kept."""
    config = SupervisorConfig(data_dir=tmp_path, idle_timeout=0.2, sweep_interval=0.05)
    sup = Supervisor(config, FakeSandbox)
    task = asyncio.create_task(sup.run())
    await sup.wait_running()
    idle = await sup.spawn("cid")
    busy = await sup.spawn("dee")
    fakes[1].hold_commands = True
    busy.actor.tell(m.RunCommand(id="long", cmd="sleep 60"))
    await _until(
        lambda: idle.actor.info.session_id not in {s["session_id"] for s in sup.status()["sessions"]}
    )
    assert fakes[0].closed == 1
    assert sup.totals.reaped == 1
    assert busy.actor.state == "busy"
    assert len(sup) == 1
    await sup.aclose()
    await asyncio.wait_for(task, 10)
    assert fakes[1].released.is_set() and fakes[1].closed == 1


async def test_sweep_counts_and_status_snapshot(supervisor: Supervisor) -> None:
    """The status snapshot lists every session with its counters."""
    logins = [await supervisor.spawn(f"user{n}") for n in range(5)]
    assert supervisor.sweep() == 0
    snapshot = supervisor.status()
    assert snapshot["totals"]["spawned"] == 5
    assert {s["session_id"] for s in snapshot["sessions"]} == {lg.actor.info.session_id for lg in logins}
    assert all(s["state"] == "idle" and s["sandbox_kind"] == "fake" for s in snapshot["sessions"])


async def test_quota_and_tokens(supervisor: Supervisor) -> None:
    """The session quota holds per username and a wrong token is unauthorized."""
    for _ in range(3):
        await supervisor.spawn("eli")
    with pytest.raises(QuotaExceeded):
        await supervisor.spawn("eli")
    await supervisor.spawn("fin")
    with pytest.raises(Unauthorized):
        supervisor.by_token("not-a-token")


async def test_stop_cancels_a_job_and_closes_the_sandbox_once(
    supervisor: Supervisor, fakes: list[FakeSandbox]
) -> None:
    """Stopping a session cancels its running job and closes its sandbox exactly once."""
    login = await supervisor.spawn("gil")
    fakes[0].hold_commands = True
    login.actor.tell(m.RunCommand(id="j", cmd="sleep 60"))
    await asyncio.wait_for(fakes[0].command_started.wait(), 5)
    await supervisor.stop(login.actor.info.session_id, "logout")
    assert fakes[0].released.is_set()
    assert fakes[0].closed == 1
    assert login.actor.state == "closed"


async def test_mailbox_bound(tmp_path: Path, fakes: list[FakeSandbox]) -> None:
    """tell() past the mailbox bound raises busy without touching what was queued."""
    from protocol.errors import MailboxFull

    config = SupervisorConfig(data_dir=tmp_path, actor=ActorConfig(mailbox_size=3))
    sup = Supervisor(config, FakeSandbox)
    task = asyncio.create_task(sup.run())
    await sup.wait_running()
    actor = (await sup.spawn("hal")).actor
    for n in range(3):
        actor.tell(m.Ping(id=str(n)))
    with pytest.raises(MailboxFull) as caught:
        actor.tell(m.Ping(id="x"))
    assert caught.value.code == "busy" and caught.value.request_id == "x"
    await sup.aclose()
    await asyncio.wait_for(task, 10)


async def test_requests_after_a_stop_are_refused(supervisor: Supervisor, fakes: list[FakeSandbox]) -> None:
    """Once a session is told to stop, new requests get SessionClosed instead of vanishing."""
    login = await supervisor.spawn("ivy")
    fakes[0].hold_commands = True
    login.actor.tell(m.RunCommand(id="j", cmd="sleep 60"))
    await asyncio.wait_for(fakes[0].command_started.wait(), 5)
    login.actor.request_stop("logout")
    with pytest.raises(SessionClosed):
        login.actor.tell(m.Ping(id="late"))
