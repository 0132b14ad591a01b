"""The files endpoints on the E2B backend: the real SDK's files calls against the fake E2B service."""

from __future__ import annotations

from collections.abc import AsyncIterator

from client import Client, Login
from sandboxes.base import SandboxSpec
from sandboxes.e2b import E2BSandbox
from tests.conftest import StartServer
from tests.e2b_service import E2BService, e2b_service, make_config
from tests.test_files import _auth, _url

__all__ = ["e2b_service"]  # fixtures


async def _served(start_server: StartServer, service: E2BService) -> tuple[Client, Login]:
    config = make_config(service)

    def factory(spec: SandboxSpec) -> E2BSandbox:
        return E2BSandbox(spec, config)

    _, client = await start_server(sandbox_factory=factory)
    return client, await client.login("cloud")


async def test_files_reach_the_sandbox_home(e2b_service: E2BService, start_server: StartServer) -> None:
    """An upload lands in the sandbox's /home/user, is listed there and downloads unchanged."""
    client, login = await _served(start_server, e2b_service)

    async def body() -> AsyncIterator[bytes]:
        for part in (b"first,", b"second"):
            yield part

    async with client.http.put(_url(client, login, "work/data.csv"), data=body(), headers=_auth(login)) as r:
        assert r.status == 201, await r.text()
        assert (await r.json())["size"] == 12
    assert e2b_service.only().files["/home/user/work/data.csv"] == b"first,second"
    async with client.http.get(_url(client, login), headers=_auth(login)) as r:
        assert [(e["name"], e["dir"]) for e in (await r.json())["entries"]] == [("work", True)]
    async with client.http.get(_url(client, login), params={"path": "work"}, headers=_auth(login)) as r:
        (entry,) = (await r.json())["entries"]
    assert (entry["name"], entry["size"], entry["dir"]) == ("data.csv", 12, False)
    async with client.http.get(_url(client, login, "work/data.csv"), headers=_auth(login)) as r:
        assert r.status == 200
        assert await r.read() == b"first,second"


async def test_missing_files_and_bad_paths(e2b_service: E2BService, start_server: StartServer) -> None:
    """A missing file or folder is 404; '..' is 400 before E2B is asked."""
    client, login = await _served(start_server, e2b_service)
    async with client.http.get(_url(client, login, "nope.txt"), headers=_auth(login)) as r:
        assert r.status == 404
    async with client.http.get(_url(client, login), params={"path": "nodir"}, headers=_auth(login)) as r:
        assert r.status == 404
    async with client.http.put(_url(client, login, "..%2Fetc%2Fx"), data=b"x", headers=_auth(login)) as r:
        assert r.status == 400
    assert not [p for p in e2b_service.only().files if "etc" in p]


async def test_upload_over_the_limit_is_413(e2b_service: E2BService, start_server: StartServer) -> None:
    """A streamed upload past --upload-limit is cut with 413 on E2B too."""
    config = make_config(e2b_service)
    _, client = await start_server(sandbox_factory=lambda spec: E2BSandbox(spec, config), upload_limit=1000)
    login = await client.login("cloud")

    async def body() -> AsyncIterator[bytes]:
        for _ in range(30):
            yield b"z" * 100

    async with client.http.put(_url(client, login, "big.bin"), data=body(), headers=_auth(login)) as r:
        assert r.status == 413, await r.text()
    assert "/home/user/big.bin" not in e2b_service.only().files
