"""``/api/sessions/{id}/files``: list, download and upload the files of a session's home.

The handlers check who asks, read the path and hand the work to the
session's sandbox (``list_files``, ``read_file``, ``write_file``), which
does it off the event loop and owns the rules about links and ownership.
Bodies are streamed both ways: an upload is never held in memory, and one
over ``--upload-limit`` is cut off with 413 and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import quote

import attrs
from aiohttp import web

import auth
from actors.session import SessionActor
from protocol import codec
from protocol.errors import Forbidden, FrameTooLarge
from sandboxes.files import home_parts
from supervisor import Supervisor

ROUTE: Final = "/api/sessions/{session_id}/files"
_PATH: Final = "{path:.+}"


def add_routes(app: web.Application, supervisor: web.AppKey[Supervisor], upload_limit: int) -> None:
    """Serve the file endpoints on *app*, sessions found through ``app[supervisor]``."""
    files = _Files(supervisor, upload_limit)
    app.router.add_get(ROUTE, files.list)
    app.router.add_get(f"{ROUTE}/{_PATH}", files.download)
    app.router.add_put(f"{ROUTE}/{_PATH}", files.upload)


@attrs.frozen
class _Files:
    supervisor: web.AppKey[Supervisor]
    upload_limit: int

    def session(self, request: web.Request) -> SessionActor:
        """The session whose files the bearer token may reach.

        The owner's token and a ``control`` share's reach them; a ``view``
        share's is refused with ``Forbidden`` (403).
        """
        token = auth.bearer(request.headers.get("Authorization"))
        actor, grant = request.app[self.supervisor].resolve_for(token, request.match_info["session_id"])
        if grant.role == "view":
            raise Forbidden("a view share may not reach the session's files")
        # Work on the files counts as use of the session: no reaping mid-upload.
        actor.touch()
        return actor

    async def list(self, request: web.Request) -> web.Response:
        """``GET ...files?path=DIR``: the folder's entries."""
        actor = self.session(request)
        listing = await actor.sandbox.list_files(request.query.get("path", ""))
        body: dict[str, object] = {"entries": [attrs.asdict(e) for e in listing.entries]}
        if listing.truncated:
            body["truncated"] = True
        return web.Response(text=codec.dumps(body), content_type="application/json")

    async def download(self, request: web.Request) -> web.StreamResponse:
        """``GET ...files/{path}``: the file's bytes, as an attachment."""
        actor = self.session(request)
        path = request.match_info["path"]
        name = home_parts(path)[-1]
        reader = await actor.sandbox.read_file(path)
        try:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name, safe='')}",
                    "Cache-Control": "no-store",
                }
            )
            if reader.size is not None:
                response.content_length = reader.size
            await response.prepare(request)
            async for chunk in reader:
                await response.write(chunk)
            await response.write_eof()
        finally:
            await reader.aclose()
        actor.touch()
        return response

    async def upload(self, request: web.Request) -> web.Response:
        """``PUT ...files/{path}``: the body becomes the file (parents made); 201."""
        actor = self.session(request)
        path = request.match_info["path"]
        home_parts(path)  # a bad path is refused before any byte is read
        if request.content_length is not None and request.content_length > self.upload_limit:
            raise self._too_large()
        size = await actor.sandbox.write_file(path, self._body(request))
        actor.touch()
        return web.Response(
            status=201,
            text=codec.dumps({"path": "/".join(home_parts(path)), "size": size}),
            content_type="application/json",
        )

    async def _body(self, request: web.Request) -> AsyncIterator[bytes]:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total > self.upload_limit:
                raise self._too_large()
            yield chunk

    def _too_large(self) -> FrameTooLarge:
        return FrameTooLarge(f"an upload is at most {self.upload_limit} bytes (--upload-limit)")
