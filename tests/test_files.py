"""The files endpoints through a real server: list, download, upload, and what they refuse."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from client import Client, Login
from tests.conftest import StartServer
from tests.fakes import FakeSandbox


def _url(client: Client, login: Login, path: str | None = None) -> URL:
    base = f"{client.base_url}/api/sessions/{login.session_id}/files"
    return URL(base if path is None else f"{base}/{path}", encoded=True)


def _auth(login: Login) -> dict[str, str]:
    return {"Authorization": f"Bearer {login.token}"}


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


async def test_upload_then_list_and_download(served: tuple[TestServer, Client]) -> None:
    """A file put into a folder that did not exist is listed in it and downloads byte for byte."""
    _, client = served
    login = await client.login("files")
    body = bytes(range(256)) * 40
    async with client.http.put(_url(client, login, "docs/notes/a.bin"), data=body, headers=_auth(login)) as r:
        assert r.status == 201
        assert await r.json() == {"path": "docs/notes/a.bin", "size": len(body)}
    async with client.http.get(_url(client, login), params={"path": "docs/notes"}, headers=_auth(login)) as r:
        assert r.status == 200
        (entry,) = (await r.json())["entries"]
    assert (entry["name"], entry["size"], entry["dir"]) == ("a.bin", len(body), False)
    assert entry["mtime"] > 0
    async with client.http.get(_url(client, login), headers=_auth(login)) as r:
        assert [(e["name"], e["dir"]) for e in (await r.json())["entries"]] == [("docs", True)]
    async with client.http.get(_url(client, login, "docs/notes/a.bin"), headers=_auth(login)) as r:
        assert r.status == 200
        assert "a.bin" in r.headers["Content-Disposition"]
        assert await r.read() == body


async def test_missing_file_and_folder_are_404(served: tuple[TestServer, Client]) -> None:
    """Downloading or listing what is not there answers 404 with the JSON error body."""
    _, client = served
    login = await client.login("files")
    async with client.http.get(_url(client, login, "nope.txt"), headers=_auth(login)) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"
    async with client.http.get(_url(client, login), params={"path": "nodir"}, headers=_auth(login)) as r:
        assert r.status == 404


@pytest.mark.parametrize("path", ["..%2Fother", "a/../../x", "%2Fetc%2Fpasswd", "a/%2E%2E/%2E%2E/x"])
async def test_paths_out_of_the_home_are_400(
    served: tuple[TestServer, Client], fakes: list[FakeSandbox], path: str
) -> None:
    """An absolute path or one with '..' is refused with 400 and the sandbox is never asked."""
    _, client = served
    login = await client.login("files")
    async with client.http.put(_url(client, login, path), data=b"x", headers=_auth(login)) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "bad_message"
    async with client.http.get(_url(client, login, path), headers=_auth(login)) as r:
        assert r.status == 400
    async with client.http.get(_url(client, login), params={"path": "../x"}, headers=_auth(login)) as r:
        assert r.status == 400
    assert not [c for c in fakes[0].calls if c[0] == "write_file"]


async def test_tokens_reach_only_their_own_session(served: tuple[TestServer, Client]) -> None:
    """No token is 401; another session's token is 403 and sees nothing of this home."""
    _, client = served
    alice, bob = await client.login("alice"), await client.login("bob")
    async with client.http.put(_url(client, alice, "secret.txt"), data=b"mine", headers=_auth(alice)) as r:
        assert r.status == 201
    async with client.http.get(_url(client, alice, "secret.txt")) as r:
        assert r.status == 401
    async with client.http.get(_url(client, alice, "secret.txt"), headers=_auth(bob)) as r:
        assert r.status == 403
    async with client.http.put(_url(client, alice, "x.txt"), data=b"his", headers=_auth(bob)) as r:
        assert r.status == 403


async def test_upload_over_the_limit_is_413_and_stores_nothing(
    start_server: StartServer, fakes: list[FakeSandbox]
) -> None:
    """Past --upload-limit an upload is 413, whether its length is told ahead or only streamed."""
    _, client = await start_server(upload_limit=1000)
    login = await client.login("files")
    async with client.http.put(_url(client, login, "big"), data=b"x" * 1001, headers=_auth(login)) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "too_large"
    async with client.http.put(
        _url(client, login, "streamed"), data=_chunks(40, 100), headers=_auth(login)
    ) as r:
        assert r.status == 413
    async with client.http.put(_url(client, login, "fits"), data=b"x" * 1000, headers=_auth(login)) as r:
        assert r.status == 201
    listing = await fakes[0].files.list_files("")
    assert [e.name for e in listing.entries] == ["fits"]


async def test_a_file_cannot_be_a_folder(served: tuple[TestServer, Client]) -> None:
    """Uploading under a file, or downloading a folder, is 400."""
    _, client = served
    login = await client.login("files")
    async with client.http.put(_url(client, login, "f"), data=b"1", headers=_auth(login)) as r:
        assert r.status == 201
    async with client.http.put(_url(client, login, "f/g"), data=b"1", headers=_auth(login)) as r:
        assert r.status == 400
    async with client.http.put(_url(client, login, "d/e"), data=b"1", headers=_auth(login)) as r:
        assert r.status == 201
    async with client.http.get(_url(client, login, "d"), headers=_auth(login)) as r:
        assert r.status == 400


async def test_a_control_share_reaches_the_files_and_a_view_share_gets_403(
    served: tuple[TestServer, Client],
) -> None:
    """A control guest uploads and downloads like the owner; a view guest is refused with 403."""
    _, client = served
    login = await client.login("files")
    shares = f"/api/sessions/{login.session_id}/shares"
    control = await client.call("POST", shares, token=login.token, body={"mode": "control"})
    view = await client.call("POST", shares, token=login.token, body={"mode": "view"})
    guest = {"Authorization": f"Bearer {control['token']}"}
    async with client.http.put(_url(client, login, "from-guest.txt"), data=b"hi", headers=guest) as r:
        assert r.status == 201
    async with client.http.get(_url(client, login, "from-guest.txt"), headers=_auth(login)) as r:
        assert await r.read() == b"hi"
    watcher = {"Authorization": f"Bearer {view['token']}"}
    for method, url in (("GET", _url(client, login)), ("GET", _url(client, login, "from-guest.txt"))):
        async with client.http.request(method, url, headers=watcher) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "forbidden"
    async with client.http.put(_url(client, login, "nope.txt"), data=b"x", headers=watcher) as r:
        assert r.status == 403
