"""Secrets stay secret: no token, key or hash in logs, events or ``/status``, on any path."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

import auth
import cli
import config
import server
from client import Client, ClientError, Connection, Event, Login
from tests.conftest import StartServer
from tests.test_cli import ROOT, start, stop

MODEL_KEY = "sk-model-key-marker-5b1e"
ADMIN_TOKEN = "admin-token-marker-77c0"
PASSWORD = "password-marker-9d2f"


@pytest.fixture
async def bad_model() -> AsyncIterator[str]:
    """A loopback model endpoint answering ``200`` with the body ``b"\\xff"`` (not UTF-8)."""

    async def complete(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"\xff", content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    model = TestServer(app, host="127.0.0.1", port=0)
    await model.start_server()
    try:
        yield str(model.make_url("/v1"))
    finally:
        await model.close()


async def _journal(client: Client, login: Login) -> list[Event]:
    """Every frame a new socket gets when it resumes from 0: the whole journal, then a pong."""
    frames: list[Event] = []
    async with client.connect(login, last_seq=0) as conn:
        frames.append(conn.welcome)
        rid = await conn.send("ping")
        while not frames or frames[-1].get("id") != rid or frames[-1]["type"] != "pong":
            frames.append(await conn.recv())
    return frames


async def _exercise(client: Client, conn: Connection, test_server: TestServer) -> None:
    """Walk the paths a secret could leak on: failures first, since they log the most."""
    result = await conn.result(await conn.send("run_task", query="open the browser"), timeout=20)
    assert not result["ok"] and "not UTF-8" in result["error"]["message"], result
    await conn.result(await conn.send("run_command", cmd="echo hi"))
    await conn.send("get_state")
    for path in ("/status", "/start-desktop"):
        with pytest.raises(ClientError):
            await client.call("GET" if path == "/status" else "POST", path, token="wrong-token")
    desktop = test_server.make_url(f"/desktop/{conn.login.session_id}/websockify")
    async with aiohttp.ClientSession() as http:
        for token in ("wrong", test_server.app[server.STREAM_TOKENS].token(conn.login.session_id)):
            async with http.get(desktop, params={"token": token}) as response:
                assert response.status in (401, 409)
    with pytest.raises(ClientError):
        await client.login("ada", password="not-it")


async def test_no_secret_reaches_logs_events_or_status(
    start_server: StartServer, bad_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With every secret set, a failing model, bad tokens and a logout, none of them is in any output."""
    cli.configure_logging("debug", "json", cache=False)
    hashed = await asyncio.to_thread(auth.hash_password, PASSWORD)
    users = tmp_path / "users"
    users.write_text(f"ada:{hashed}\n")
    test_server, client = await start_server(
        sandbox="local",
        admin_token=ADMIN_TOKEN,
        model_url=bad_model,
        model_key=MODEL_KEY,
        users_file=users,
    )
    login = await client.login("ada", password=PASSWORD)
    tokens = test_server.app[server.STREAM_TOKENS]
    secrets = {
        "model key": MODEL_KEY,
        "admin token": ADMIN_TOKEN,
        "password": PASSWORD,
        "session token": login.token,
        "control stream token": tokens.token(login.session_id, "control"),
        "view stream token": tokens.token(login.session_id, "view"),
        **{f"password hash part {i}": part for i, part in enumerate(hashed.split("$")[4:])},
    }
    async with client.connect(login) as conn:
        await _exercise(client, conn, test_server)
    status = json.dumps(await client.call("GET", "/status", token=ADMIN_TOKEN))
    events = json.dumps(await _journal(client, login))
    await client.logout(login)
    captured = capsys.readouterr()
    outputs = {"log": captured.out + captured.err, "events": events, "/status": status}
    assert "session.summary" in outputs["log"], "the log must have been captured"
    leaks = [
        (what, where) for what, secret in secrets.items() for where, text in outputs.items() if secret in text
    ]
    assert leaks == []
    assert repr(config.Settings(admin_token=ADMIN_TOKEN, model_key=MODEL_KEY)).count("marker") == 0


async def test_model_key_from_the_environment_never_reaches_the_json_log(
    bad_model: str, tmp_path: Path
) -> None:
    """The leak's repro: a model answers ``\\xff``, the key in DESKHIVE_MODEL_KEY, run_task, grep the log."""
    served = await start(
        "--sandbox",
        "null",
        "--data-dir",
        str(tmp_path),
        "--log-format",
        "json",
        "--log-level",
        "debug",
        env={"DESKHIVE_MODEL_KEY": MODEL_KEY, "DESKHIVE_MODEL_URL": bad_model},
    )
    try:
        async with Client(served.url) as client:
            login = await client.login("ada")
            async with client.connect(login) as conn:
                result = await conn.result(await conn.send("run_task", query="hello"), timeout=20)
                assert not result["ok"]
    finally:
        assert await stop(served) == 0
    assert any("job" in line for line in served.log), "".join(served.log)
    assert [line for line in served.log if MODEL_KEY in line] == []
    assert "--model-key" not in served.banner, "no warning about argv when the key came from the environment"


async def test_secret_files_are_read_and_a_secret_on_argv_is_warned_about(tmp_path: Path) -> None:
    """``--admin-token-file`` sets the admin token unprinted; ``--model-key`` on argv gets a warning."""
    token_file = tmp_path / "admin"
    token_file.write_text(ADMIN_TOKEN + "\n")
    served = await start(
        "--sandbox",
        "null",
        "--data-dir",
        str(tmp_path),
        "--admin-token-file",
        str(token_file),
        "--model-key",
        MODEL_KEY,
    )
    try:
        assert ADMIN_TOKEN not in served.banner and MODEL_KEY not in served.banner
        assert "--model-key on the command line is visible" in served.banner
        async with Client(served.url) as client:
            assert "sessions" in await client.call("GET", "/status", token=ADMIN_TOKEN)
    finally:
        assert await stop(served) == 0
    assert [line for line in served.log if ADMIN_TOKEN in line or MODEL_KEY in line] == []


def test_unreadable_or_doubled_secret_files_stop_start_up_with_a_clear_message(tmp_path: Path) -> None:
    """A missing key file, an empty one, or a file and a flag together end start-up naming the problem."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = {
        ("--model-key-file", str(tmp_path / "absent")): "cannot read",
        ("--model-key-file", str(empty)): "is empty",
        ("--admin-token-file", str(empty), "--admin-token", "x"): "not both",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as stopped:
            config.from_args(config.parser().parse_args(["serve", *argv]), {})
        assert message in str(stopped.value)


async def test_bad_choices_are_refused_at_parse_time_with_the_choices_named() -> None:
    """``--log-level verbose``, ``--log-format xml`` and ``--sandbox cloud`` exit 2 naming what is allowed."""
    cases = {
        ("--log-level", "verbose"): "debug, info, warning, error",
        ("--log-format", "xml"): "json, console, auto",
        ("--sandbox", "cloud"): "local, e2b, null",
    }
    for argv, allowed in cases.items():
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli",
            "serve",
            *argv,
            cwd=ROOT,
            env=dict(os.environ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
        assert proc.returncode == 2, (argv, out, err)
        assert allowed in err.decode() and b"Traceback" not in err
    with pytest.raises(SystemExit) as stopped:
        config.from_args(config.parser().parse_args(["serve"]), {"DESKHIVE_LOG_LEVEL": "verbose"})
    assert "debug, info, warning, error" in str(stopped.value)


def test_tracebacks_in_the_log_carry_no_frame_locals(capsys: pytest.CaptureFixture[str]) -> None:
    """An error logged with its traceback names the error and the frame, never the frame's variables."""
    cli.configure_logging("info", "json", cache=False)
    log = structlog.get_logger("test")

    def call_model(api_key: str) -> None:
        headers = {"Authorization": f"Bearer {api_key}"}
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, f"invalid start byte ({len(headers)} headers)")

    try:
        call_model(MODEL_KEY)
    except UnicodeDecodeError:
        log.exception("job.failed")
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["exception"][0]["exc_type"] == "UnicodeDecodeError"
    assert "call_model" in json.dumps(line)
    assert MODEL_KEY not in json.dumps(line)


async def test_a_model_endpoint_echoing_the_key_does_not_put_it_in_the_error() -> None:
    """An endpoint that refuses the request and echoes its headers gets an error message without the key."""
    from agent.model import ModelConfig, complete
    from protocol.errors import ModelFailed

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=401, text=f"bad key: {request.headers['Authorization']}")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    model = TestServer(app, host="127.0.0.1", port=0)
    await model.start_server()
    try:
        config = ModelConfig(url=str(model.make_url("/v1")), model="m", api_key=MODEL_KEY)
        async with aiohttp.ClientSession() as http:
            with pytest.raises(ModelFailed) as failed:
                await complete(http, config, [], [])
    finally:
        await model.close()
    assert "HTTP 401" in failed.value.message and MODEL_KEY not in failed.value.message
