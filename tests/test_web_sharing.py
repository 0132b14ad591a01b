"""Files, sharing and "my sessions" in a real browser, on the SPEC's endpoints.

Where the server under test does not have an endpoint yet, the tests that
need it are skipped (probed over HTTP first); the page's side of the files
panel and of "my sessions" is also driven against routes the test answers
itself, exactly as SPEC 1.1 shapes them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.async_api import Page, Route, expect

from tests.test_web import (
    CHROMIUM,
    Tab,
    browser,
    log_in,
    new_tab,
    null_server,
    open_login,
    password_server,
    run_command,
    screenshot,
    serving,
    session_of,
    tab,
    unique,
    wait_connected,
)

__all__ = ["browser", "new_tab", "null_server", "password_server", "tab"]  # fixtures, used by name

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]


@pytest.fixture(scope="module")
def local_files_server() -> Iterator[str]:
    with serving("local", skip_if_unavailable=True) as url:
        yield url


async def open_panel(page: Page, name: str) -> None:
    await page.locator(f"#{name}-panel > summary").click()


# --------------------------------------------------------------------------
# Files


class FakeHome:
    """A session's home answered per SPEC 1.1's files endpoints (the page's side alone)."""

    def __init__(
        self, files: dict[str, bytes] | None = None, *, first_listing_waits: asyncio.Event | None = None
    ) -> None:
        self.files = {"notes.txt": b"hello from the home\n"} if files is None else files
        # The first listing is answered as the home was when asked, but only once this is set.
        self.first_listing_waits = first_listing_waits

    async def handle(self, route: Route) -> None:
        request = route.request
        match = re.search(r"/api/sessions/[^/]+/files/?(.*)$", urlparse(request.url).path)
        assert match
        name = match.group(1)
        if request.method == "PUT":
            self.files[name] = request.post_data_buffer or b""
            await route.fulfill(status=201, json={})
        elif name:
            await route.fulfill(status=200, body=self.files[name], content_type="application/octet-stream")
        else:
            folder = parse_qs(urlparse(request.url).query).get("path", ["."])[0]
            assert folder == "."
            entries = [{"name": n, "size": len(b), "dir": False, "mtime": 0} for n, b in self.files.items()]
            if (waits := self.first_listing_waits) is not None:
                self.first_listing_waits = None
                await asyncio.wait_for(waits.wait(), timeout=30)
            await route.fulfill(status=200, json={"entries": entries})


async def drop_file(page: Page, name: str, text: str) -> None:
    """Drops a file called *name* holding *text* on the files panel, as a drag from the desktop does."""
    data = await page.evaluate_handle(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name, { type: "text/plain" }));
            return transfer;
        }""",
        [name, text],
    )
    await page.locator("#files-drop").dispatch_event("drop", {"dataTransfer": data})


async def test_files_panel_lists_uploads_by_drop_and_downloads(null_server: str, tab: Tab) -> None:
    """The files panel lists the home, uploads a dropped file with PUT, and downloads a file."""
    page = tab.page
    home = FakeHome()
    await page.route(re.compile(r"/api/sessions/[^/]+/files"), home.handle)
    await log_in(page, null_server, unique("files"))
    await open_panel(page, "files")
    await expect(page.locator("#files-list")).to_contain_text("notes.txt")

    await drop_file(page, "dropped.txt", "dropped by the test")
    await expect(page.locator("#files-feedback")).to_contain_text("Uploaded dropped.txt")
    await expect(page.locator("#files-list")).to_contain_text("dropped.txt")
    assert home.files["dropped.txt"] == b"dropped by the test"

    async with page.expect_download() as info:
        await page.get_by_role("button", name="Download notes.txt").click()
    download = await info.value
    assert download.suggested_filename == "notes.txt"
    await screenshot(page, "files")


async def test_a_slow_listing_answered_after_an_upload_does_not_undo_it(null_server: str, tab: Tab) -> None:
    """A listing asked before an upload, answered after it, neither empties the list nor hides "Uploaded"."""
    page = tab.page
    released = asyncio.Event()
    home = FakeHome({}, first_listing_waits=released)
    await page.route(re.compile(r"/api/sessions/[^/]+/files"), home.handle)
    await log_in(page, null_server, unique("overtaken"))
    await open_panel(page, "files")  # its listing (of an empty home) is held
    await drop_file(page, "late.txt", "uploaded while the listing was out")
    feedback, listed = page.locator("#files-feedback"), page.locator("#files-list")
    await expect(feedback).to_contain_text("Uploaded late.txt")
    await expect(listed).to_contain_text("late.txt")

    async with page.expect_event("requestfinished", lambda request: request.method == "GET"):
        released.set()
    await page.evaluate("() => new Promise((done) => setTimeout(done, 200))")
    await expect(listed).to_contain_text("late.txt")
    await expect(listed).not_to_contain_text("is empty")
    await expect(feedback).to_contain_text("Uploaded late.txt")


@pytest.mark.local
async def test_upload_lands_in_the_home_and_downloads_back(local_files_server: str, tab: Tab) -> None:
    """On the real endpoints a file uploaded from the page is seen by commands and downloads back."""
    page = tab.page
    await log_in(page, local_files_server, unique("homefiles"))
    await open_panel(page, "files")
    await page.locator("#files-input").set_input_files(
        files=[{"name": "up.txt", "mimeType": "text/plain", "buffer": b"uploaded-through-the-page\n"}]
    )
    await expect(page.locator("#files-feedback")).to_contain_text("Uploaded up.txt")
    await run_command(page, "cat up.txt")
    await expect(page.locator("#log .output", has_text="uploaded-through-the-page")).to_have_count(1)
    async with page.expect_download() as info:
        await page.get_by_role("button", name="Download up.txt").click()
    saved = Path(await (await info.value).path())
    assert await asyncio.to_thread(saved.read_bytes) == b"uploaded-through-the-page\n"


# --------------------------------------------------------------------------
# Sharing


async def test_view_share_guest_sees_the_session_and_revoke_closes_it(
    null_server: str, new_tab: Callable[[], Awaitable[Tab]]
) -> None:
    """A view-only guest sees the owner's log, is told they may change nothing, and is shut out on Revoke."""
    owner = (await new_tab()).page
    await log_in(owner, null_server, unique("sharer"))
    session = await session_of(owner)
    await run_command(owner, "echo shared-marker")
    await open_panel(owner, "share")
    await owner.get_by_role("button", name="Copy view-only link").click()
    feedback = owner.locator("#share-feedback")
    await expect(feedback).to_contain_text("#share=")
    link = re.search(r"https?://\S+#share=\S+", await feedback.inner_text())
    assert link

    guest = (await new_tab()).page
    await guest.goto(link.group(0))
    await wait_connected(guest)
    await expect(guest.locator("#role-badge")).to_have_text("view only")
    await expect(guest.locator("#guest-note")).to_contain_text("change nothing")
    await expect(guest.locator("#session-user")).to_have_text(session["username"])
    await expect(guest.locator("#log .output", has_text="shared-marker")).to_have_count(1)
    assert await guest.locator("#command-form").evaluate("form => form.inert")
    await screenshot(guest, "guest-view")

    row = owner.locator("#share-list li", has_text="view only")
    await expect(row).to_contain_text("1 socket")
    await row.get_by_role("button", name=re.compile("Revoke")).click()
    await expect(guest.locator("#login-view")).to_be_visible()
    await expect(guest.locator("#login-form-error")).to_contain_text("stopped sharing")
    # The owner keeps the word that the link is dead; the list says nothing is shared.
    await expect(owner.locator("#share-list")).to_contain_text("Not shared with anyone")
    await expect(owner.locator("#share-feedback")).to_contain_text("Revoked")


# --------------------------------------------------------------------------
# My sessions, by password


async def test_password_lists_and_ends_sessions_from_any_browser(password_server: str, tab: Tab) -> None:
    """With a users file, the password lists the user's sessions in a fresh browser and ends one."""
    page = tab.page
    live = [
        {
            "session_id": "carol_1_aaaaaaaaaaaaaaaa",
            "created": 1,
            "state": "ready",
            "idle_seconds": 5,
            "desktop": True,
        },
        {
            "session_id": "carol_2_bbbbbbbbbbbbbbbb",
            "created": 2,
            "state": "idle",
            "idle_seconds": 9,
            "desktop": False,
        },
    ]
    asked: list[dict] = []

    async def mine(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}")
        asked.append(body)
        ended = set(body.get("end", []))
        live[:] = [s for s in live if s["session_id"] not in ended]
        await route.fulfill(status=200, json={"sessions": live})

    await page.route("**/api/sessions/mine", mine)
    await open_login(page, password_server)
    await page.get_by_label("Username").fill("carol")
    await page.get_by_label("Password").fill("correct horse")
    await page.get_by_role("button", name=re.compile("List and end my sessions")).click()
    rows = page.locator("#known-list li")
    await expect(rows).to_have_count(2)
    await expect(rows.first).to_contain_text("desktop running")
    await rows.first.get_by_role("button", name=re.compile("End")).click()
    await page.get_by_role("dialog").get_by_role("button", name="End the session").click()
    await expect(rows).to_have_count(1)
    assert asked[-1] == {
        "username": "carol",
        "password": "correct horse",
        "end": ["carol_1_aaaaaaaaaaaaaaaa"],
    }
