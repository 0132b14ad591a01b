"""The session actor's own promises: one result per ack, a real mailbox bound, a bounded end."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from actors.session import ActorConfig, SessionActor, SessionInfo
from protocol import messages as m
from sandboxes.base import SandboxSpec
from supervisor import Supervisor, SupervisorConfig
from tests.conftest import StartServer
from tests.fakes import FakeSandbox, RecordingPeer


@pytest.fixture
async def supervisor(tmp_path: Path, fakes: list[FakeSandbox]) -> AsyncIterator[Supervisor]:
    """A running supervisor with short bounds; afterwards no session task may be left."""
    config = SupervisorConfig(data_dir=tmp_path, stop_grace=1.0, actor=ActorConfig(close_timeout=0.3))
    sup = Supervisor(config, FakeSandbox)
    task = asyncio.create_task(sup.run())
    await sup.wait_running()
    yield sup
    await sup.aclose()
    await asyncio.wait_for(task, 10)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(("session:", "job"))]


def _results(peer: RecordingPeer) -> dict[str, list[dict[str, object]]]:
    found: dict[str, list[dict[str, object]]] = {}
    for event in peer.frames:
        if event["type"] == "result":
            found.setdefault(str(event["id"]), []).append(event)
    return found


async def test_job_cancelled_before_its_first_step_gets_its_result(
    supervisor: Supervisor, fakes: list[FakeSandbox]
) -> None:
    """A job whose task is cancelled in the turn the runner starts it still gets one cancelled result."""
    actor = (await supervisor.spawn("amy")).actor
    peer = RecordingPeer()
    actor.attach(peer, None)

    def cut_off(event: dict[str, object]) -> None:
        # The runner has just made the job's task; it has not run a step yet.
        if event["type"] == "state" and event.get("current_command") == "echo two":
            (task,) = [t for t in asyncio.all_tasks() if t.get_name().endswith(":two")]
            task.cancel("cut off")

    peer.on_frame = cut_off
    actor.tell(m.RunCommand(id="one", cmd="echo one"), peer)
    actor.tell(m.RunCommand(id="two", cmd="echo two"), peer)
    actor.tell(m.RunCommand(id="three", cmd="echo three"), peer)
    await peer.wait_for(lambda e: e["type"] == "result" and e["id"] == "three")
    results = _results(peer)
    assert [len(results[rid]) for rid in ("one", "two", "three")] == [1, 1, 1]
    assert results["two"][0]["error"]["code"] == "cancelled"  # type: ignore[index]
    assert ("run", ("echo two", 600.0)) not in fakes[0].calls


async def test_every_ack_gets_exactly_one_result_through_cancel_kill_and_stop(
    supervisor: Supervisor, fakes: list[FakeSandbox]
) -> None:
    """Running, waiting, cancelled, killed and cut-off jobs each get exactly one result."""
    login = await supervisor.spawn("bob")
    actor = login.actor
    peer = RecordingPeer()
    actor.attach(peer, None)
    fakes[0].hold_commands = True
    for n in range(4):
        actor.tell(m.RunCommand(id=f"j{n}", cmd=f"sleep {n}"), peer)
    await asyncio.wait_for(fakes[0].command_started.wait(), 5)
    actor.tell(m.Cancel(id="c1", target="j2"), peer)
    actor.tell(m.Cancel(id="c0", target="j0"), peer)
    await peer.wait_for(lambda e: e.get("running_id") == "j1")
    actor.tell(m.KillDesktop(id="k"), peer)
    actor.tell(m.RunCommand(id="j4", cmd="sleep 4"), peer)
    await peer.wait_for(lambda e: e.get("running_id") == "j4")
    actor.tell(m.RunCommand(id="j5", cmd="sleep 5"), peer)
    await supervisor.stop(actor.info.session_id, "logout")
    acked = {e["id"] for e in peer.frames if e["type"] == "ack"}
    results = _results(peer)
    assert acked == set(results) == {"j0", "j1", "j2", "j3", "j4", "j5", "c0", "c1", "k"}
    assert all(len(r) == 1 for r in results.values())
    codes = {rid: r[0].get("error", {}).get("code") for rid, r in results.items()}  # type: ignore[union-attr]
    assert codes["j0"] == codes["j1"] == codes["j3"] == codes["j4"] == codes["j5"] == "cancelled"
    assert peer.closed_with is not None and peer.closed_with[0] == 4404


async def test_state_names_the_running_job_by_request_id(
    start_server: StartServer, fakes: list[FakeSandbox]
) -> None:
    """state carries running_id: the id of the job that runs, null once none does."""
    _, client = await start_server()
    login = await client.login("cat")
    async with client.connect(login) as conn:
        fakes[0].hold_commands = True
        job = await conn.send("run_command", cmd="sleep 60", id="long")
        busy = await conn.wait_for(lambda e: e["type"] == "state" and e["state"] == "busy")
        assert busy["running_id"] == job
        await conn.send("cancel", target=job)
        idle = await conn.wait_for(lambda e: e["type"] == "state" and e["state"] == "idle")
        assert idle["running_id"] is None


async def test_waiting_jobs_count_against_the_mailbox_bound(
    start_server: StartServer, fakes: list[FakeSandbox]
) -> None:
    """With one job running and a bound of 5, five more jobs are acked and the rest get busy."""
    _, client = await start_server(mailbox_size=5)
    login = await client.login("dan")
    async with client.connect(login) as conn:
        fakes[0].hold_commands = True
        await conn.send("run_command", cmd="sleep 60", id="running")
        await asyncio.wait_for(fakes[0].command_started.wait(), 5)
        for n in range(12):
            await conn.send("run_command", cmd=f"echo {n}", id=f"w{n}")
        replies: dict[str, dict[str, object]] = {}
        while len(replies) < 12:
            event = await conn.recv()
            if event["type"] in {"ack", "error"} and event["id"].startswith("w"):
                replies[event["id"]] = event
        assert [replies[f"w{n}"]["type"] for n in range(12)] == ["ack"] * 5 + ["error"] * 7
        assert {replies[f"w{n}"]["code"] for n in range(5, 12)} == {"busy"}
        (session,) = (await client.call("GET", "/status", token="admin-secret"))["sessions"]
        assert (session["mailbox_depth"], session["jobs_waiting"]) == (5, 5)
        pong = await conn.send("ping", id="p")
        assert (await conn.wait_for(lambda e: e.get("id") == pong))["type"] == "error"


async def test_end_closes_unanswering_sockets_together(tmp_path: Path) -> None:
    """Ten sockets that never finish closing cost one close deadline in all, and the others still get 4404."""
    spec = SandboxSpec(session_id="eve_1700000000_0000000000000000", username="eve", data_dir=tmp_path)
    info = SessionInfo(session_id=spec.session_id, username="eve", token_hash=b"h", created_at=0.0)
    actor = SessionActor(info, FakeSandbox(spec), ActorConfig())
    stuck = [RecordingPeer(hang=True) for _ in range(10)]
    fine = RecordingPeer()
    for peer in [*stuck, fine]:
        actor.attach(peer, None)
    started = time.monotonic()
    await actor.end("closed", "logout")
    # One deadline of 2 s for all of them, not 2 s for each in turn.
    assert time.monotonic() - started < 3 * actor.config.close_timeout
    assert fine.closed_with is not None and fine.closed_with[0] == 4404
    assert all(p.frames[-1]["state"] == "closed" for p in stuck)


async def test_an_ended_session_is_freed_without_the_cyclic_gc(
    supervisor: Supervisor, fakes: list[FakeSandbox]
) -> None:
    """With the cyclic GC off, an ended session's actor and journal are freed by reference counting."""
    gc.collect()
    gc.disable()
    try:
        login = await supervisor.spawn("fay")
        actor = login.actor
        peer = RecordingPeer()
        actor.attach(peer, None)
        actor.tell(m.RunCommand(id="a", cmd="echo a"), peer)
        actor.tell(m.RunCommand(id="b", cmd="fail"), peer)
        actor.tell(m.GetState(id="s"), peer)
        await peer.wait_for(lambda e: e["type"] == "result" and e["id"] == "b")
        fakes[0].hold_commands = True
        actor.tell(m.RunCommand(id="c", cmd="sleep 60"), peer)
        actor.tell(m.RunCommand(id="d", cmd="sleep 60"), peer)
        await asyncio.wait_for(fakes[0].command_started.wait(), 5)
        actor.tell(m.Cancel(id="x", target="c"), peer)
        await peer.wait_for(lambda e: e.get("running_id") == "d")
        await supervisor.stop(actor.info.session_id, "logout")
        # The journal's slots have no weakref: its event deque stands for it.
        refs = [weakref.ref(actor), weakref.ref(actor.journal._frames)]
        del actor, login
        assert [ref() for ref in refs] == [None, None]
    finally:
        gc.enable()
