"""The baselines: a plain aiohttp WebSocket echo, and a plain login handler.

The echo does the least an aiohttp WebSocket server can do per frame, so the
ratio of deskhive's ping throughput to this one's shows what the session
layer (decode, mailbox, actor, encode) costs on top of aiohttp itself. The
login handler (``POST /api/sessions``) reads the JSON body and answers 201
with a fresh token and nothing else: what any aiohttp login costs here.

    python bench/echo_baseline.py [--host 127.0.0.1] [--port 0]

prints ``echo listening on http://HOST:PORT`` once it serves, and stops on
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal

from aiohttp import web


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(msg.data)
    return ws


async def login(request: web.Request) -> web.Response:
    body = await request.json()
    answer = {"session_id": body["username"], "token": secrets.token_urlsafe(32), "ws_url": "", "stream_url": None}
    return web.json_response(answer, status=201)


async def serve(host: str, port: int) -> None:
    app = web.Application()
    app.add_routes([web.get("/ws", echo), web.post("/api/sessions", login)])
    # No access log: deskhive's server runs without one too.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    print(f"echo listening on http://{bound_host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--host", default="127.0.0.1")
    args.add_argument("--port", type=int, default=0)
    ns = args.parse_args()
    asyncio.run(serve(ns.host, ns.port))


if __name__ == "__main__":
    main()
