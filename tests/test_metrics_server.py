"""``GET /metrics`` on a real server: the spec's names, parsed by prometheus-client, each seen to move."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

import server
from client import Client, ClientError, SessionEnded
from tests.conftest import StartServer
from tests.fakes import FakeSandbox

ADMIN = "admin-secret"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def _scrape(client: Client) -> tuple[str, Samples]:
    async with client.http.get(
        client.base_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


async def test_metrics_need_the_admin_token(served: tuple) -> None:
    """/metrics without the admin token, or with a session's token, is 401."""
    _, client = served
    login = await client.login("nosy")
    for token in (None, "wrong", login.token):
        with pytest.raises(ClientError) as caught:
            await client.call("GET", "/metrics", token=token)
        assert caught.value.status == 401


async def test_every_metric_moves_and_no_label_names_a_session(
    served: tuple, fakes: list[FakeSandbox]
) -> None:
    """Logins, sockets, frames, jobs, desktop starts, sandbox failures and logouts each move /metrics."""
    _, client = served
    _, before = await _scrape(client)
    assert before[("deskhive_logins_total", ())] == 0
    assert before[("deskhive_sessions_ended_total", (("reason", "logout"),))] == 0
    login = await client.login("metered")
    async with client.connect(login) as conn:
        assert (await conn.result(await conn.send("start_desktop")))["ok"]
        assert (await conn.result(await conn.send("run_command", cmd="echo hi")))["ok"]
        failed = await conn.result(await conn.send("run_command", cmd="fail"))
        assert failed["error"]["code"] == "sandbox_failed"
        rid = await conn.send("ping")
        await conn.wait_for(lambda e: e.get("id") == rid)
        text, during = await _scrape(client)
        assert during[("deskhive_logins_total", ())] == 1
        assert during[("deskhive_sockets", ())] == 1
        assert during[("deskhive_sessions", (("state", "ready"),))] == 1
        # hello, start_desktop, two run_commands and a ping
        assert during[("deskhive_frames_received_total", ())] == 5
        assert during[("deskhive_frames_sent_total", ())] >= 10
        assert during[("deskhive_job_duration_seconds_count", (("kind", "start_desktop"),))] == 1
        assert during[("deskhive_job_duration_seconds_count", (("kind", "run_command"),))] == 2
        assert during[("deskhive_desktop_start_seconds_count", ())] == 1
        assert during[("deskhive_sandbox_failures_total", (("sandbox", "fake"),))] == 1
    await client.logout(login)
    text, after = await _scrape(client)
    assert after[("deskhive_sessions_ended_total", (("reason", "logout"),))] == 1
    assert after[("deskhive_sockets", ())] == 0
    for secret in (login.session_id, login.token, "metered", ADMIN):
        assert secret not in text


async def test_crashes_restarts_idle_and_shutdown_are_counted(
    start_server: StartServer, fakes: list[FakeSandbox]
) -> None:
    """An actor crash and its restart, an idle reaping and a shutdown each count under their name.

    With ``--store memory`` a shutdown ends sessions (a durable store keeps them for the next start).
    """
    test_server, client = await start_server(idle_timeout=0.2, sweep_interval=0.1, store="memory")
    crashing = await client.login("crashy")
    async with client.connect(crashing) as conn:
        fakes[0].break_stream_url = True
        await conn.send("get_state")
        await conn.wait_for(lambda e: e.get("event") == "session.restarted")
        # Idle past the timeout: the sweep ends it, and the socket hears of it.
        with pytest.raises(SessionEnded):
            await conn.wait_for(lambda e: False, timeout=10)
    _, samples = await _scrape(client)
    assert samples[("deskhive_actor_crashes_total", ())] == 1
    assert samples[("deskhive_actor_restarts_total", ())] == 1
    assert samples[("deskhive_sessions_ended_total", (("reason", "idle"),))] == 1
    metrics = test_server.app[server.METRICS]
    assert metrics is not None
    await client.login("stays")
    await test_server.close()
    assert metrics.sessions_ended["shutdown"] == 1


async def test_metrics_off_serves_no_page_and_counts_no_frames(start_server: StartServer) -> None:
    """With --metrics off, /metrics is 404 and the server still serves sockets."""
    _, client = await start_server(metrics=False)
    with pytest.raises(ClientError) as caught:
        await client.call("GET", "/metrics", token=ADMIN)
    assert caught.value.status == 404
    login = await client.login("quiet")
    async with client.connect(login) as conn:
        rid = await conn.send("ping")
        async with asyncio.timeout(5):
            assert (await conn.wait_for(lambda e: e.get("id") == rid))["type"] == "pong"
