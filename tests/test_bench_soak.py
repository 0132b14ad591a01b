"""The soak load of `make bench` does what its figure says: sessions come, reconnect and all go."""

from __future__ import annotations

import argparse

import aiohttp

from bench.soak import run_round
from tests.conftest import StartServer


async def test_a_soak_round_logs_in_reconnects_and_logs_out_every_session(start_server: StartServer) -> None:
    """After a short round every session has reconnected at least once and none is left on the server."""
    test_server, _ = await start_server()
    url = str(test_server.make_url("")).rstrip("/")
    ns = argparse.Namespace(url=url, sessions=5, seconds=1.0, reconnect=0.3)
    async with aiohttp.ClientSession() as http:
        report = await run_round(http, ns, 1)
        async with http.get(f"{url}/healthz") as resp:
            health = await resp.json()
    assert report["errors"] == {}, report
    assert (report["logins"], report["logouts"]) == (5, 5)
    assert report["connects"] >= 10 and report["pings"] == report["connects"]
    assert health["sessions"] == 0
