"""The supervisor: restarts after crashes, reaping, and a clean close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import server
from actors.session import ActorConfig
from client import ClientError, SessionEnded
from protocol import messages as m
from protocol.errors import QuotaExceeded, SessionClosed, Unauthorized
from sandboxes.base import SandboxSpec
from supervisor import Supervisor, SupervisorConfig
from tests.conftest import StartServer
from tests.fakes import FakeSandbox, RecordingPeer


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


async def test_a_sandbox_broken_for_good_ends_only_its_session(
    start_server: StartServer, fakes: list[FakeSandbox]
) -> None:
    """A sandbox whose stream_url always raises fails its own session; other sessions and logins go on."""
    _, client = await start_server()
    ann, bob = await client.login("ann"), await client.login("bob")
    async with client.connect(ann) as broken, client.connect(bob) as other:
        fakes[0].broken = {"stream_url", "desktop_running"}
        for n in range(4):
            await broken.send("get_state", id=f"g{n}")
        with pytest.raises(SessionEnded):
            await broken.wait_for(lambda e: False)
        pong = await other.send("ping", id="still-here")
        assert (await other.wait_for(lambda e: e["type"] == "pong"))["id"] == pong
        later = await client.login("cid")
        assert later.session_id.startswith("cid_")
        assert (await client.call("GET", "/healthz"))["ok"] is True
        status = await client.call("GET", "/status", token="admin-secret")
        assert {s["username"] for s in status["sessions"]} == {"bob", "cid"}
        assert status["totals"]["crashed"] == 4
    assert fakes[0].closed == 1


@pytest.mark.parametrize("error", [RecursionError("maximum recursion depth"), OSError(39, "not empty")])
async def test_any_error_closing_a_sandbox_is_logged_and_contained(
    supervisor: Supervisor, fakes: list[FakeSandbox], error: BaseException
) -> None:
    """Any error closing a sandbox (RecursionError too) is logged; the session ends, others go on."""
    login = await supervisor.spawn("dot")
    fakes[0].close_error = error
    with capture_logs() as logs:
        await supervisor.stop(login.actor.info.session_id, "logout")
    assert login.actor.state == "closed"
    assert [e["event"] for e in logs if e["event"] in {"sandbox.close_failed", "session.summary"}] == [
        "sandbox.close_failed",
        "session.summary",
    ]
    assert supervisor.running
    again = await supervisor.spawn("dot")
    assert again.actor.tell(m.Ping(id="p")) == "p"


@pytest.mark.parametrize("stubborn", [False, True])
async def test_cleanup_outlives_the_second_stop_phase(
    tmp_path: Path, fakes: list[FakeSandbox], stubborn: bool
) -> None:
    """A close slower than stop_grace, after a job deaf to a first cancel or not, ends in 4404 and summary."""
    config = SupervisorConfig(data_dir=tmp_path, stop_grace=0.1, actor=ActorConfig(close_timeout=1.0))
    sup = Supervisor(config, FakeSandbox)
    task = asyncio.create_task(sup.run())
    await sup.wait_running()
    actor = (await sup.spawn("eve")).actor
    peer = RecordingPeer()
    actor.attach(peer, None)
    fakes[0].hold_commands, fakes[0].stubborn = True, stubborn
    fakes[0].close_seconds = 0.4
    actor.tell(m.RunCommand(id="j", cmd="sleep 60"), peer)
    await asyncio.wait_for(fakes[0].command_started.wait(), 5)
    with capture_logs() as logs:
        await sup.stop(actor.info.session_id, "logout")
    assert peer.closed_with is not None and peer.closed_with[0] == 4404
    assert actor.state == "closed" and fakes[0].closed == 1 and fakes[0].released.is_set()
    assert [e["reason"] for e in logs if e["event"] == "session.summary"] == ["logout"]
    assert [r["id"] for r in peer.frames if r["type"] == "result"] == ["j"]
    assert len(sup) == 0
    await sup.aclose()
    await asyncio.wait_for(task, 10)


async def test_a_spawn_cut_off_after_registering_leaves_nothing(
    tmp_path: Path, fakes: list[FakeSandbox]
) -> None:
    """A login abandoned while its session starts frees the user's place, its token and its sandbox."""
    cut_off = True

    def factory(spec: SandboxSpec) -> FakeSandbox:
        nonlocal cut_off
        if cut_off:
            cut_off = False
            task = asyncio.current_task()
            assert task is not None
            task.cancel("the client went away")
        return FakeSandbox(spec)

    sup = Supervisor(SupervisorConfig(data_dir=tmp_path), factory)
    task = asyncio.create_task(sup.run())
    await sup.wait_running()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(sup.spawn("fay"))
    assert len(sup) == 0
    await _until(lambda: fakes[0].closed == 1)
    logins = [await sup.spawn("fay") for _ in range(3)]
    assert len(sup) == 3 and all(lg.actor.state == "idle" for lg in logins)
    await sup.aclose()
    await asyncio.wait_for(task, 10)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("session:")]


async def test_requests_are_refused_between_the_last_crash_and_the_end(
    supervisor: Supervisor, fakes: list[FakeSandbox]
) -> None:
    """After the crash past the restart limit, tell() refuses at once while the sandbox closes."""
    actor = (await supervisor.spawn("gia")).actor
    fakes[0].broken = {"stream_url"}
    fakes[0].close_seconds = 0.5
    for n in range(4):
        actor.tell(m.GetState(id=f"g{n}"))
    await _until(lambda: supervisor.totals.crashed == 4)
    assert fakes[0].closed == 1  # closing, slowly
    with pytest.raises(SessionClosed):
        actor.tell(m.Ping(id="late"))
    await _until(lambda: actor.state == "failed")


async def test_healthz_fails_once_the_supervisor_stops(start_server: StartServer) -> None:
    """/healthz answers 503 with the JSON error body once the supervisor no longer runs."""
    test_server, client = await start_server()
    supervisor = test_server.app[server.SUPERVISOR]
    assert supervisor.running
    await supervisor.aclose()
    assert not supervisor.running
    with pytest.raises(ClientError) as caught:
        await client.call("GET", "/healthz")
    assert (caught.value.status, caught.value.code) == (503, "internal")


async def test_a_cancelled_supervisor_still_closes_every_sandbox(
    tmp_path: Path, fakes: list[FakeSandbox]
) -> None:
    """Cancelling the supervisor's run from outside still closes each session's sandbox before it ends."""
    sup = Supervisor(SupervisorConfig(data_dir=tmp_path), FakeSandbox)
    task = asyncio.create_task(sup.run())
    await sup.wait_running()
    actors = [(await sup.spawn(name)).actor for name in ("ida", "jon")]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert [f.closed for f in fakes] == [1, 1]
    assert [a.state for a in actors] == ["closed", "closed"]
    assert not sup.running
