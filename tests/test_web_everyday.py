"""The web client's everyday use in a real browser: never locked out, never
surprised, kept alive, and the log, jobs and tools people reach for.

Servers and the browser as in test_web.py (whose fixtures these share).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Page, WebSocketRoute, expect
from yarl import URL

from tests.test_web import (
    CHROMIUM,
    Tab,
    browser,
    confirm,
    end_elsewhere,
    local_commands,
    local_server,
    log_in,
    new_tab,
    null_server,
    open_login,
    run_command,
    run_elsewhere,
    screenshot,
    serving,
    session_of,
    tab,
    unique,
    wait_connected,
)

__all__ = [
    "browser",
    "local_commands",
    "local_server",
    "new_tab",
    "null_server",
    "tab",
]  # fixtures, used by name

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]
ADMIN = "admin-token-for-the-page"


@pytest.fixture(scope="module")
def short_idle_server() -> Iterator[str]:
    """A server that reaps sessions idle for 4 s, sweeping every second."""
    with serving("null", "--idle-timeout", "4", "--sweep-interval", "1", "--admin-token", ADMIN) as url:
        yield url


async def status(base: str) -> dict:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base}/status", headers={"Authorization": f"Bearer {ADMIN}"}) as answer,
    ):
        assert answer.status == 200
        return await answer.json()


async def leave(page: Page) -> None:
    await page.get_by_role("button", name="Leave").click()
    await expect(page.locator("#login-view")).to_be_visible()


# --------------------------------------------------------------------------
# Never locked out, never surprised


async def test_a_session_logged_out_in_one_tab_leaves_another_tabs_list(null_server: str, tab: Tab) -> None:
    """The login page of a second tab drops a session from "Your sessions" once the first tab logs it out."""
    first = tab.page
    await log_in(first, null_server, unique("twolists"))
    session = await session_of(first)
    second = await first.context.new_page()
    await open_login(second, null_server)
    listed = second.locator("#known-list li", has_text=session["session_id"])
    await expect(listed).to_have_count(1)
    await confirm(first, "#logout", "End the session")
    await expect(first.locator("#login-view")).to_be_visible()
    await expect(listed).to_have_count(0)
    await second.close()


async def test_forgotten_sessions_are_listed_and_ended_from_the_login_page(
    null_server: str, tab: Tab
) -> None:
    """Three sessions left open no longer lock a username out: the login page lists them, End frees one."""
    username = unique("lockout")
    for _ in range(3):
        closed = await tab.page.context.new_page()
        await log_in(closed, null_server, username)
        await closed.close()  # without logging out
    page = tab.page
    await open_login(page, null_server)
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Username").press("Enter")
    await expect(page.locator("#login-form-error")).to_contain_text("listed here")
    sessions = page.locator("#known-list li")
    await expect(sessions).to_have_count(3)
    await screenshot(page, "login-your-sessions")

    first = sessions.first
    sid = (await first.locator(".hint").inner_text()).split()[0]
    await first.get_by_role("button", name=re.compile("End")).click()
    await page.get_by_role("dialog").get_by_role("button", name="End the session").click()
    await expect(sessions).to_have_count(2)
    await expect(page.locator("#known-feedback")).to_contain_text(f"Ended {sid}")

    await page.get_by_role("button", name="Log in").click()
    await wait_connected(page)
    await expect(page.locator("#session-user")).to_have_text(username)


async def test_leave_keeps_the_session_and_resume_returns_to_it(null_server: str, tab: Tab) -> None:
    """Leave goes to the login page with the session kept; Resume opens it again with its log."""
    page = tab.page
    await log_in(page, null_server, unique("leaver"))
    await run_command(page, "echo kept-after-leaving")
    session = await session_of(page)
    await leave(page)
    await expect(page.locator("#login-form-error")).to_contain_text("kept")

    row = page.locator("#known-list li", has_text=session["session_id"])
    await row.get_by_role("button", name="Resume").click()
    await wait_connected(page)
    await expect(page.locator("#session-id")).to_have_text(session["session_id"])
    await expect(page.locator("#log .output", has_text="kept-after-leaving")).to_have_count(1)


async def test_dangerous_buttons_ask_first_and_cancel_changes_nothing(null_server: str, tab: Tab) -> None:
    """Log out, Kill desktop and Clear log ask first, Cancel focused; cancelling changes nothing."""
    page = tab.page
    await log_in(page, null_server, unique("careful"))
    await page.get_by_role("button", name="Start desktop").click()
    await expect(page.locator("#state-badge")).to_have_text("ready")
    await run_command(page, "echo still-here")

    dialog = page.get_by_role("dialog")
    for button, words in (
        ("#logout", "files"),
        ("#kill-desktop", "closed"),
        ("#clear-logs", "cannot be brought back"),
    ):
        await page.locator(button).click()
        await expect(dialog).to_be_visible()
        await expect(dialog).to_contain_text(words)
        await expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
        if button == "#logout":
            await screenshot(page, "confirm-logout")
        await page.keyboard.press("Escape")
        await expect(dialog).to_be_hidden()

    await expect(page.locator("#session-view")).to_be_visible()
    await expect(page.locator("#state-badge")).to_have_text("ready")
    await expect(page.locator("#log .output", has_text="still-here")).to_have_count(1)


async def test_ended_session_is_told_in_plain_words(null_server: str, tab: Tab) -> None:
    """A session ended elsewhere is said to be gone with its files, and leaves the list."""
    page = tab.page
    await log_in(page, null_server, unique("gone"))
    session = await session_of(page)
    await end_elsewhere(null_server, session)
    await expect(page.locator("#login-form-error")).to_contain_text("files are gone")
    await expect(page.locator("#known-list li", has_text=session["session_id"])).to_have_count(0)


@contextlib.asynccontextmanager
async def serving_off_the_loop(*args: str) -> AsyncIterator[str]:
    """``serving`` (which starts and stops a server process, waiting on it) run in a thread."""
    started = serving(*args)
    base = await asyncio.to_thread(started.__enter__)
    try:
        yield base
    finally:
        await asyncio.to_thread(started.__exit__, None, None, None)


async def token_still_works(base: str, token: str) -> bool:
    """Whether the server takes *token* in a hello (a welcome) or has forgotten it (a close)."""
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{base}/ws") as ws:
        await ws.send_json({"type": "hello", "token": token, "last_seq": 2**31})
        message = await ws.receive(timeout=10)
        return message.type == aiohttp.WSMsgType.TEXT and json.loads(message.data)["type"] == "welcome"


async def test_after_a_server_restart_the_page_resumes_or_says_the_session_is_gone(tab: Tab) -> None:
    """After a restart the page resumes (durable sessions) or says plainly that the session is gone."""
    page = tab.page
    # The first server picks its port and the second takes it over: no port
    # is chosen free here and bound later, when another process may hold it.
    async with serving_off_the_loop("null") as base:
        port = URL(base).port
        await log_in(page, base, unique("restart"))
        await run_command(page, "echo before-the-restart")
        session = await session_of(page)
    await expect(page.locator("#connection")).to_contain_text("reconnecting")
    async with serving_off_the_loop("null", "--port", str(port)) as base:
        if await token_still_works(base, session["token"]):
            await wait_connected(page)
            await expect(page.locator("#log .output", has_text="before-the-restart")).to_have_count(1)
            await expect(page.locator("#log")).not_to_contain_text("unknown or wrong token")
        else:
            await expect(page.locator("#login-view")).to_be_visible(timeout=20_000)
            message = page.locator("#login-form-error")
            await expect(message).to_contain_text("no longer knows this session")
            await expect(message).to_contain_text("Log in to start a new one")
            await expect(page.locator("#known-list li", has_text=session["session_id"])).to_have_count(0)
            await screenshot(page, "session-gone")


# --------------------------------------------------------------------------
# Keep-alive


async def test_visible_page_keeps_its_session_past_the_idle_timeout(short_idle_server: str, tab: Tab) -> None:
    """A visible page pings, so its session outlives the idle timeout."""
    page = tab.page
    pings = asyncio.Queue[None]()

    async def watch(route: WebSocketRoute) -> None:
        server = route.connect_to_server()

        def from_page(message: str | bytes) -> None:
            if json.loads(message).get("type") == "ping":
                pings.put_nowait(None)
            server.send(message)

        route.on_message(from_page)

    await page.route_web_socket(re.compile(r"/ws$"), watch)
    await log_in(page, short_idle_server, unique("awake"))
    session = await session_of(page)
    # Four pings at a third of the 4 s timeout span well over the timeout.
    async with asyncio.timeout(20):
        for _ in range(4):
            await pings.get()
    live = {s["session_id"] for s in (await status(short_idle_server))["sessions"]}
    assert session["session_id"] in live
    await expect(page.locator("#connection")).to_have_text("connected")


async def test_low_time_left_warns_and_stay_keeps_the_session(null_server: str, tab: Tab) -> None:
    """A session a minute from reaping is warned of; Stay pings and the warning goes."""
    page = tab.page
    pings = asyncio.Queue[None]()

    async def nearly_idle(route: WebSocketRoute) -> None:
        server = route.connect_to_server()

        def from_server(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") == "welcome":
                # What a server says of a session idle for 59 of its 60 minutes.
                frame.update(idle_timeout=3600, idle_seconds=3540)
            route.send(json.dumps(frame))

        def from_page(message: str | bytes) -> None:
            if json.loads(message).get("type") == "ping":
                pings.put_nowait(None)
            server.send(message)

        server.on_message(from_server)
        route.on_message(from_page)

    await page.route_web_socket(re.compile(r"/ws$"), nearly_idle)
    await log_in(page, null_server, unique("drowsy"))
    warning = page.locator("#idle-warning")
    await expect(warning).to_be_visible()
    await expect(warning).to_contain_text("ended for being idle")
    await expect(page.locator("#time-left")).to_contain_text("left")
    await screenshot(page, "idle-warning")

    await warning.get_by_role("button", name="Stay").click()
    async with asyncio.timeout(10):
        await pings.get()
    await expect(warning).to_be_hidden()
    await expect(page.locator("#time-left")).to_be_hidden()


# --------------------------------------------------------------------------
# Log, jobs and tools


async def test_log_folds_bookkeeping_and_filters_searches_and_downloads(null_server: str, tab: Tab) -> None:
    """Job bookkeeping hides behind "details"; search and filters narrow the log; Download saves it."""
    page = tab.page
    await log_in(page, null_server, unique("logs"))
    await run_command(page, "echo alpha-line")
    await run_command(page, "echo beta-line")
    log = page.locator("#log")
    started = log.locator(".entry-log", has_text="job.started")
    await expect(started.first).to_be_attached()
    await expect(started.first).to_be_hidden()
    await expect(log.locator(".output", has_text="alpha-line")).to_be_visible()

    await page.get_by_label("details").check()
    await expect(started.first).to_be_visible()
    await page.get_by_label("details").uncheck()

    await page.get_by_label("Search the log").fill("beta")
    await expect(log.locator(".output", has_text="alpha-line")).to_be_hidden()
    await expect(log.locator(".output", has_text="beta-line")).to_be_visible()
    await page.get_by_label("Search the log").fill("")
    await page.get_by_label("Lines shown").select_option("stderr")
    await expect(log.locator(".output", has_text="alpha-line")).to_be_hidden()
    await page.get_by_label("Lines shown").select_option("all")
    await expect(log.locator(".output", has_text="alpha-line")).to_be_visible()
    await screenshot(page, "log-tools")

    async with page.expect_download() as info:
        await page.get_by_role("button", name="Download").click()
    download = await info.value
    text = await asyncio.to_thread(Path(await download.path()).read_text)
    assert "alpha-line" in text
    assert "beta-line" in text
    assert download.suggested_filename.endswith(".log")


async def test_log_lines_carry_their_event_time_after_a_reload(null_server: str, tab: Tab) -> None:
    """An output line keeps the time it happened, not the time a reload drew it again."""
    page = tab.page
    await log_in(page, null_server, unique("clock"))
    await run_command(page, "echo stamped")
    stamp = page.locator("#log .output", has_text="stamped").locator(".time")
    before = await stamp.get_attribute("title")
    assert before
    await page.reload()
    await wait_connected(page)
    await expect(stamp).to_have_attribute("title", before)


#: A 1x1 PNG, as an agent step's thumbnail.
THUMBNAIL = "data:image/png;base64," + (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


async def test_agent_steps_read_as_one_line_each_and_stop_cancels_the_run(null_server: str, tab: Tab) -> None:
    """An agent run shows each step as one line with its thumbnail, and Stop the agent cancels the run."""
    page = tab.page
    sent = asyncio.Queue[dict]()

    async def agent_running(route: WebSocketRoute) -> None:
        server = route.connect_to_server()

        def from_server(message: str | bytes) -> None:
            route.send(message)
            frame = json.loads(message)
            if frame.get("type") != "welcome":
                return
            # What a server running an agent task sends: its state, then a step.
            seq = frame["seq"]
            busy = {
                "type": "state",
                "seq": seq + 1,
                "state": "busy",
                "stream_url": None,
                "current_command": "run_task: find the weather",
                "running_id": "task-1",
            }
            step = {
                "type": "log",
                "seq": seq + 2,
                "ts": "2026-01-01T10:00:00Z",
                "level": "info",
                "event": "agent.step",
                "step": 1,
                "text": "I will open the browser.",
                "action": "click(x=10, y=20)",
                "outcome": "clicked",
                "thumbnail": THUMBNAIL,
            }
            route.send(json.dumps(busy))
            route.send(json.dumps(step))

        def from_page(message: str | bytes) -> None:
            sent.put_nowait(json.loads(message))
            server.send(message)

        server.on_message(from_server)
        route.on_message(from_page)

    await page.route_web_socket(re.compile(r"/ws$"), agent_running)
    await log_in(page, null_server, unique("agent"))
    step = page.locator("#log .agent-step")
    await expect(step).to_have_count(1)
    await expect(step).to_contain_text("I will open the browser.")
    await expect(step).to_contain_text("click(x=10, y=20)")
    await expect(step.get_by_role("img")).to_have_attribute("src", THUMBNAIL)
    await screenshot(page, "agent-run")

    await page.get_by_role("button", name="Stop the agent").click()
    async with asyncio.timeout(10):
        while (frame := await sent.get()).get("type") != "cancel":
            pass
    assert frame["target"] == "task-1"


async def test_screenshot_button_shows_and_saves_the_png(null_server: str, tab: Tab) -> None:
    """Screenshot shows the desktop's PNG in a dialog whose Save button downloads it."""
    page = tab.page
    await log_in(page, null_server, unique("shot"))
    await page.get_by_role("button", name="Start desktop").click()
    await expect(page.locator("#state-badge")).to_have_text("ready")
    await page.get_by_role("button", name="Screenshot").click()
    dialog = page.get_by_role("dialog")
    await expect(dialog).to_be_visible()
    image = dialog.get_by_role("img")
    await expect(image).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
    assert await image.evaluate("img => img.complete && img.naturalWidth > 0")
    async with page.expect_download() as info:
        await dialog.get_by_role("link", name="Save PNG").click()
    download = await info.value
    assert (await asyncio.to_thread(Path(await download.path()).read_bytes)).startswith(b"\x89PNG")
    await dialog.get_by_role("button", name="Close").click()


async def test_jobs_panel_shows_a_job_sent_elsewhere(null_server: str, tab: Tab) -> None:
    """The Jobs panel lists what runs from the session's state, whoever sent it, with a Cancel button."""
    page = tab.page
    await log_in(page, null_server, unique("foreign"))
    await expect(page.locator("#jobs-empty")).to_be_visible()
    token = (await session_of(page))["token"]
    # A job another client runs: the page sees it in the replayed or live state.
    await run_elsewhere(null_server, token, "echo from-elsewhere")
    await expect(page.locator("#log .output", has_text="from-elsewhere")).to_have_count(1)
    await expect(page.locator("#jobs .job")).to_have_count(0)
    await expect(page.locator("#jobs-empty")).to_be_visible()


async def test_launch_buttons_then_a_command(null_server: str, tab: Tab) -> None:
    """Open terminal sends `launch`, answered at once; a command after it runs, not stuck behind it."""
    page = tab.page
    await log_in(page, null_server, unique("launch"))
    await page.get_by_role("button", name="Start desktop").click()
    await expect(page.locator("#state-badge")).to_have_text("ready")
    await expect(page.get_by_role("button", name="Start desktop")).to_be_disabled()  # it runs already
    await page.get_by_role("button", name="Open terminal").click()
    feedback = page.locator("#desktop-feedback")
    await expect(feedback).not_to_have_text(re.compile("sent"))
    await expect(feedback).to_have_class(re.compile("feedback-ok"))
    await run_command(page, "echo after-launch")
    await expect(page.locator("#command-feedback")).to_have_text("Exited with code 0.")


@pytest.mark.local
async def test_a_job_from_another_tab_is_cancelled_from_this_one(
    local_commands: str, new_tab: Callable[[], Awaitable[Tab]]
) -> None:
    """A job sent from a second tab runs in the first tab's Jobs panel, whose Cancel (in view) ends it."""
    first = (await new_tab()).page
    await log_in(first, local_commands, unique("twotabs"))
    second = await first.context.new_page()
    await second.goto(local_commands)
    # A new tab of the same browser resumes the session from the login page's list.
    await second.locator("#known-list li").get_by_role("button", name="Resume").click()
    await wait_connected(second)
    long_command = "sleep 30 # " + "a-very-long-comment-that-makes-the-job-label-wide " * 4
    box = second.get_by_role("textbox", name="Command")
    await box.fill(long_command)
    await box.press("Enter")
    await expect(second.locator("#command-busy")).to_contain_text("still running")

    job = first.locator("#jobs .job", has_text="sleep 30")
    await expect(job).to_contain_text("running")
    await expect(first.locator("#command-busy")).to_contain_text("Cancel it")
    cancel = job.get_by_role("button", name=re.compile("Cancel"))
    await expect(cancel).to_be_in_viewport(ratio=1)
    await screenshot(first, "job-from-another-tab")
    await cancel.click()
    await expect(job).to_have_count(0)
    await expect(second.locator("#command-feedback")).to_contain_text("Cancelled")
    await expect(first.locator("#command-busy")).to_be_hidden()
    # The first tab did not send it, yet its log names what was cancelled, not a request id.
    await expect(first.locator("#log .note-cancelled", has_text="$ sleep 30")).to_have_count(1)
    await second.close()


@pytest.mark.local
async def test_tab_into_the_desktop_gives_its_canvas_the_keys(local_commands: str, tab: Tab) -> None:
    """Tabbing from the last control into the desktop frame focuses noVNC's canvas, which takes the keys."""
    page = tab.page
    await log_in(page, local_commands, unique("tabkeys"))
    await page.get_by_role("button", name="Start desktop").click()
    await expect(page.locator("#state-badge")).to_have_text("ready", timeout=40_000)
    frame = page.frame_locator("#desktop-frame")
    await expect(frame.locator("#status")).to_have_text("Connected", timeout=20_000)
    await page.get_by_role("button", name="Run", exact=True).focus()
    await page.keyboard.press("Tab")
    desktop = next(f for f in page.frames if "/desktop/" in f.url)
    await desktop.wait_for_function("() => document.activeElement?.tagName === 'CANVAS'", timeout=20_000)


# --------------------------------------------------------------------------
# The desktop page


async def test_bad_desktop_link_says_why_even_after_a_reload(null_server: str, tab: Tab) -> None:
    """A desktop link with a wrong token says the link is not valid, and still says so after a reload."""
    page = tab.page
    await log_in(page, null_server, unique("badlink"))
    session = await session_of(page)
    await page.goto(f"{null_server}/desktop/{session['session_id']}#token=not-the-right-token")
    await expect(page.locator("#status")).to_contain_text("not valid")
    assert "#" not in page.url
    await page.reload()
    await expect(page.locator("#status")).to_contain_text("not valid")
    await screenshot(page, "desktop-bad-link")


async def test_view_only_desktop_link_says_view_only(null_server: str, tab: Tab) -> None:
    """The desktop page opened from a view-only link says "view only"."""
    page = tab.page
    await log_in(page, null_server, unique("viewer"))
    session = await session_of(page)
    await page.goto(f"{null_server}/desktop/{session['session_id']}#token=whatever&view=1")
    await expect(page.locator("#mode")).to_contain_text("view only")
    await page.reload()
    await expect(page.locator("#mode")).to_contain_text("view only")


# --------------------------------------------------------------------------
# The operator


async def test_admin_page_lists_sessions_and_ends_one(
    short_idle_server: str, new_tab: Callable[[], Awaitable[Tab]]
) -> None:
    """The admin page lists a user's session; End ends it and the user's page says so."""
    user, admin = (await new_tab()).page, (await new_tab()).page
    await log_in(user, short_idle_server, unique("watched"))
    session = await session_of(user)

    await admin.goto(f"{short_idle_server}/admin")
    await admin.get_by_label("Admin token").fill("wrong")
    await admin.get_by_label("Admin token").press("Enter")
    await expect(admin.locator("#admin-error")).to_contain_text("Wrong admin token")
    await admin.get_by_label("Admin token").fill(ADMIN)
    await admin.get_by_label("Admin token").press("Enter")
    row = admin.locator("#admin-sessions tr", has_text=session["session_id"])
    await expect(row).to_contain_text(session["username"])
    await screenshot(admin, "admin")

    await row.get_by_role("button", name="End").click()
    await admin.get_by_role("dialog").get_by_role("button", name="End the session").click()
    await expect(admin.locator("#admin-feedback")).to_contain_text(f"Ended {session['session_id']}")
    await expect(row).to_have_count(0)
    await expect(user.locator("#login-view")).to_be_visible()
    await expect(user.locator("#login-form-error")).to_contain_text("ended")
