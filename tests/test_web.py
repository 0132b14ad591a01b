"""The web client in a real browser against a real server.

Each server runs as a subprocess on a free port (it prints where it
listens); Debian's chromium runs headless under Playwright. Screenshots of
the main screens go to artifacts/screens/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Route, WebSocketRoute, async_playwright, expect

from tests.datadirs import fresh_data_dir, remove_data_dir

ROOT = Path(__file__).resolve().parents[1]
SCREENS = ROOT / "artifacts" / "screens"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A laptop screen of 1366x768, less the browser's own bars.
VIEWPORT = {"width": 1366, "height": 680}
LISTENING = re.compile(r"deskhive listening on (https?://[^\s,]+)")
SERVER_START_TIMEOUT_S = 30

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]
expect.set_options(timeout=10_000)


# --------------------------------------------------------------------------
# The server under test


class ServerProcess:
    """A `deskhive serve` subprocess; its output is drained so it never blocks."""

    def __init__(self, sandbox: str, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.data_dir = fresh_data_dir()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--sandbox",
                sandbox,
                # A folder of its own: a data folder serves one server at a time.
                "--data-dir",
                str(self.data_dir),
                *extra,
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self.listening = threading.Event()
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            match = LISTENING.search(line)
            if match and self.url is None:
                self.url = match.group(1).rstrip("/.")
                self.listening.set()
        self.listening.set()  # the process ended: nobody waits for a line that will not come

    def wait_listening(self) -> str | None:
        self.listening.wait(SERVER_START_TIMEOUT_S)
        return self.url

    def output(self) -> str:
        return "\n".join(self.lines[-40:])

    def stop(self) -> None:
        """Stops it the way a user does (SIGINT), then kills what is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.reader.join(5)
        assert self.process.stdout is not None
        self.process.stdout.close()
        remove_data_dir(self.data_dir)


@contextlib.contextmanager
def serving(sandbox: str, *extra: str, skip_if_unavailable: bool = False) -> Iterator[str]:
    server = ServerProcess(sandbox, *extra)
    try:
        url = server.wait_listening()
        if url is None:
            last_line = server.lines[-1] if server.lines else "no output"
            message = f"the server with --sandbox {sandbox} did not start: {last_line}"
            if skip_if_unavailable:
                pytest.skip(message)
            pytest.fail(message)
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def null_server() -> Iterator[str]:
    with serving("null") as url:
        yield url


@pytest.fixture(scope="module")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with a users file: carol's password is "correct horse"."""
    hashed = subprocess.run(
        [sys.executable, "-m", "cli", "hash-password"],
        input="correct horse\n",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    users = tmp_path_factory.mktemp("users") / "users"
    users.write_text(f"carol:{hashed}\n")
    with serving("null", "--users-file", str(users)) as url:
        yield url


@pytest.fixture(scope="module")
def small_journal_server() -> Iterator[str]:
    """A server keeping only 10 events per session, so a tab away for long misses some."""
    with serving("null", "--journal-size", "10") as url:
        yield url


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    with serving("local", skip_if_unavailable=True) as url:
        yield url


# --------------------------------------------------------------------------
# The browser


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


class Tab:
    """One browser context (one person) with its page and the script errors it raised."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))


@pytest_asyncio.fixture(loop_scope="module")
async def new_tab(browser: Browser) -> AsyncIterator[Callable[[], Awaitable[Tab]]]:
    """Opens tabs in contexts of their own (as many people); fails on any script error."""
    contexts = []
    tabs: list[Tab] = []

    async def open_tab() -> Tab:
        context = await browser.new_context(viewport=VIEWPORT)
        contexts.append(context)
        tab = Tab(await context.new_page())
        tabs.append(tab)
        return tab

    yield open_tab
    for context in contexts:
        await context.close()
    assert [error for tab in tabs for error in tab.errors] == []


@pytest_asyncio.fixture(loop_scope="module")
async def tab(new_tab: Callable[[], Awaitable[Tab]]) -> Tab:
    return await new_tab()


def unique(name: str) -> str:
    """A username no other test holds, so the per-username quota never bites."""
    return f"{name}-{secrets.token_hex(3)}"


async def screenshot(page: Page, name: str) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=SCREENS / f"{name}.png")


async def open_login(page: Page, base: str) -> None:
    """Opens the login page and waits until it is wired (its button enabled)."""
    await page.goto(base)
    await expect(page.get_by_role("button", name="Log in")).to_be_enabled()


async def log_in(page: Page, base: str, username: str) -> None:
    await open_login(page, base)
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("AWS login").fill(f"{username}@example.com")
    await page.get_by_label("Customer name").fill("Example Corp")
    await page.get_by_label("Username").press("Enter")
    await wait_connected(page)


async def wait_connected(page: Page) -> None:
    await expect(page.locator("#session-view")).to_be_visible()
    await expect(page.locator("#connection")).to_have_text("connected")


async def run_command(page: Page, cmd: str) -> None:
    """Runs *cmd* from the command box and waits for its result in the log."""
    before = await page.locator("#log .note-ok, #log .note-warn, #log .note-error").count()
    box = page.get_by_role("textbox", name="Command")
    await box.fill(cmd)
    await box.press("Enter")
    await expect(page.locator("#log .note-ok, #log .note-warn, #log .note-error")).to_have_count(before + 1)


async def confirm(page: Page, button: str, action: str) -> None:
    """Clicks *button* and answers its confirmation dialog with *action*."""
    await page.locator(button).click()
    dialog = page.get_by_role("dialog")
    await expect(dialog).to_be_visible()
    await dialog.get_by_role("button", name=action, exact=True).click()
    await expect(dialog).to_be_hidden()


async def session_of(page: Page) -> dict:
    return json.loads(await page.evaluate("sessionStorage.getItem('deskhive.session')"))


async def end_elsewhere(base: str, session: dict) -> None:
    """Ends *session* over HTTP, as another client (or the owner's other tab) would."""
    async with (
        aiohttp.ClientSession() as http,
        http.delete(
            f"{base}/api/sessions/{session['session_id']}",
            headers={"Authorization": f"Bearer {session['token']}"},
        ) as answer,
    ):
        assert answer.status == 204


async def log_seqs(page: Page) -> list[int]:
    return [
        int(seq)
        for seq in await page.locator("#log [data-seq]").evaluate_all(
            "rows => rows.map(row => row.dataset.seq)"
        )
    ]


# --------------------------------------------------------------------------
# Tests on the null sandbox


async def test_bad_username_shows_the_server_error_next_to_the_field(null_server: str, tab: Tab) -> None:
    """A username the server refuses shows its 400 message under the username field."""
    page = tab.page
    await open_login(page, null_server)
    await screenshot(page, "login")
    await page.get_by_label("Username").fill("not a valid name!")
    await page.get_by_role("button", name="Log in").click()

    error = page.locator("#login-username-error")
    await expect(error).not_to_be_empty()
    await expect(page.get_by_label("Username")).to_have_attribute("aria-invalid", "true")
    await expect(page.get_by_label("Username")).to_be_focused()
    await expect(page.locator("#session-view")).to_be_hidden()
    await screenshot(page, "login-error")


async def test_enter_before_the_page_is_ready_sends_nothing(null_server: str, tab: Tab) -> None:
    """Enter pressed while the page loads neither leaves it nor puts the password in its address."""
    page = tab.page
    ready = asyncio.Event()

    async def slow_info(route: Route) -> None:
        await asyncio.wait_for(ready.wait(), timeout=30)
        await route.continue_()

    await page.route("**/api/info", slow_info)
    await page.goto(null_server)
    await page.get_by_label("Username").fill(unique("early"))
    await page.get_by_label("Password").fill("not-for-the-address")
    await page.get_by_label("Password").press("Enter")
    await expect(page.get_by_role("button", name="Log in")).to_be_disabled()
    assert "not-for-the-address" not in page.url
    assert "?" not in page.url

    ready.set()
    await expect(page.get_by_role("button", name="Log in")).to_be_enabled()
    await page.get_by_label("Password").press("Enter")
    await wait_connected(page)
    assert "not-for-the-address" not in page.url
    await page.unroute("**/api/info")


async def test_wrong_password_shows_the_error_next_to_the_password(password_server: str, tab: Tab) -> None:
    """With a users file, a missing password is told under the password field; the right one logs in."""
    page = tab.page
    await open_login(page, password_server)
    await page.get_by_label("Username").fill("carol")
    await page.get_by_label("Username").press("Enter")

    password = page.get_by_label("Password")
    await expect(page.locator("#login-password-error")).not_to_be_empty()
    await expect(password).to_have_attribute("aria-invalid", "true")
    await expect(password).to_be_focused()

    await password.fill("correct horse")
    await password.press("Enter")
    await wait_connected(page)
    await expect(page.locator("#session-user")).to_have_text("carol")


async def test_quota_error_is_shown_on_the_form(null_server: str, tab: Tab) -> None:
    """A username already holding its quota of sessions gets the server's 429 message on the form."""
    page = tab.page
    username = unique("quota")
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(f"{null_server}/api/sessions", json={"username": username}) as answer:
                assert answer.status == 201
    await open_login(page, null_server)
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Username").press("Enter")

    await expect(page.locator("#login-form-error")).not_to_be_empty()
    await expect(page.locator("#login-username-error")).to_be_empty()
    await expect(page.locator("#session-view")).to_be_hidden()


async def test_keyboard_alone_logs_in_and_starts_the_desktop(null_server: str, tab: Tab) -> None:
    """Typing, Tab and Enter are enough to log in and reach the first control."""
    page = tab.page
    await page.goto(null_server)
    await expect(page.get_by_label("Username")).to_be_focused()
    await page.keyboard.type(unique("keys"))
    for label in ("AWS login", "Customer name", "Password"):
        await page.keyboard.press("Tab")
        await expect(page.get_by_label(label)).to_be_focused()
    await page.keyboard.press("Enter")
    await wait_connected(page)

    await expect(page.locator("#session-title")).to_be_focused()
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("button", name="Start desktop")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("#state-badge")).to_have_text("ready")


async def test_start_desktop_reaches_ready(null_server: str, tab: Tab) -> None:
    """Start desktop brings the badge to ready, Kill desktop back to idle, each answered by the buttons."""
    page = tab.page
    await log_in(page, null_server, unique("ada"))
    await expect(page.locator("#state-badge")).to_have_text("idle")

    await page.get_by_role("button", name="Start desktop").click()

    await expect(page.locator("#state-badge")).to_have_text("ready")
    await expect(page.locator("#desktop-feedback")).to_have_class(re.compile(r"feedback-ok"))
    await expect(page.locator("#log .note-state").last).to_contain_text("ready")

    await confirm(page, "#kill-desktop", "Kill desktop")
    await expect(page.locator("#state-badge")).to_have_text("idle")
    await expect(page.locator("#desktop-feedback")).to_contain_text("Kill desktop: done")


async def open_agent_panel(page: Page) -> None:
    """Unfolds "Agent and workflows" (folded on a server without a model)."""
    panel = page.locator("#agent-panel")
    if await panel.get_attribute("open") is None:
        await panel.locator("summary").click()
    await expect(page.get_by_role("button", name="Run workflow")).to_be_visible()


async def test_workflow_picker_runs_the_chosen_workflow(null_server: str, tab: Tab) -> None:
    """The picker lists the server's workflows, and running one reports its result next to it."""
    page = tab.page
    await log_in(page, null_server, unique("flow"))
    await open_agent_panel(page)
    picker = page.get_by_label("Workflow")
    await expect(picker.locator("option")).not_to_have_count(1)

    await picker.select_option("inspect")
    await page.get_by_role("button", name="Run workflow").click()

    await expect(page.locator("#workflow-feedback")).to_have_class(re.compile(r"feedback-ok"))
    await expect(page.locator("#workflow-feedback")).to_contain_text("Finished")


async def test_command_output_appears_in_the_log(null_server: str, tab: Tab) -> None:
    """A command typed in the command box shows its output and exit code in the log panel."""
    page = tab.page
    await log_in(page, null_server, unique("grace"))
    await page.get_by_role("button", name="Start desktop").click()
    await expect(page.locator("#state-badge")).to_have_text("ready")

    await run_command(page, "echo hello-from-the-browser")

    await expect(page.locator("#log .output.stdout")).to_contain_text("hello-from-the-browser")
    await expect(page.locator("#log .note-ok").last).to_contain_text("exited with code 0")
    await expect(page.locator("#command-feedback")).to_have_text("Exited with code 0.")
    await expect(page.get_by_role("textbox", name="Command")).to_be_focused()
    await screenshot(page, "session")


async def test_two_users_each_see_only_their_own_log(
    null_server: str, new_tab: Callable[[], Awaitable[Tab]]
) -> None:
    """Two people logged in at once each see only their own commands; clearing one log leaves the other."""
    alice, bob = (await new_tab()).page, (await new_tab()).page
    await log_in(alice, null_server, unique("alice"))
    await log_in(bob, null_server, unique("bob"))

    await run_command(alice, "echo alice-secret-marker")
    await run_command(bob, "echo bob-secret-marker")

    await expect(alice.locator("#log")).to_contain_text("alice-secret-marker")
    await expect(bob.locator("#log")).to_contain_text("bob-secret-marker")
    await expect(alice.locator("#log")).not_to_contain_text("bob-secret-marker")
    await expect(bob.locator("#log")).not_to_contain_text("alice-secret-marker")

    await confirm(alice, "#clear-logs", "Clear log")
    await expect(alice.locator("#log")).not_to_contain_text("alice-secret-marker")
    await expect(alice.locator("#log-feedback")).to_contain_text("done")
    await bob.reload()
    await wait_connected(bob)
    await expect(bob.locator("#log")).to_contain_text("bob-secret-marker")


async def test_reload_shows_the_same_history_once(null_server: str, tab: Tab) -> None:
    """A reload, and events produced while the page was away, leave the log complete with no event twice."""
    page = tab.page
    await log_in(page, null_server, unique("linus"))
    for n in range(3):
        await run_command(page, f"echo before-reload-{n}")
    # The job's last event, its state back to idle, comes after its result:
    # the seqs are taken once it is in, or the reload would bring one more.
    await expect(page.locator("#state-badge")).to_have_text("idle")
    before = await log_seqs(page)

    await page.reload()
    await wait_connected(page)
    await expect(page.locator("#log .output", has_text="before-reload-2")).to_have_count(1)
    assert await log_seqs(page) == before

    # While no page watches, another client of the same session runs a command.
    session = await session_of(page)
    await page.goto("about:blank")
    await run_elsewhere(null_server, session["token"], "echo while-away")
    await page.goto(null_server)
    await wait_connected(page)

    await expect(page.locator("#log .output", has_text="while-away")).to_have_count(1)
    await expect(page.locator("#log .output", has_text="before-reload-0")).to_have_count(1)
    seqs = await log_seqs(page)
    assert seqs == sorted(set(seqs))
    assert seqs[: len(before)] == before


async def test_dropped_socket_reconnects_and_resumes(null_server: str, tab: Tab) -> None:
    """When its socket drops, the page reconnects by itself and shows what happened meanwhile, once."""
    page = tab.page
    # Every socket of the page goes through this proxy, so the test can cut
    # it, and refuse new ones until events have happened in the meantime.
    sockets: list[WebSocketRoute] = []
    refusing = asyncio.Event()

    async def proxy(route: WebSocketRoute) -> None:
        if refusing.is_set():
            await route.close(code=1013, reason="try again later")
            return
        sockets.append(route)
        route.connect_to_server()

    await page.route_web_socket(re.compile(r"/ws$"), proxy)
    await log_in(page, null_server, unique("vint"))
    await run_command(page, "echo before-the-drop")
    session = await session_of(page)

    refusing.set()
    await sockets[-1].close(code=1011, reason="cut by the test")
    await expect(page.locator("#connection")).to_contain_text("reconnecting")
    await run_elsewhere(null_server, session["token"], "echo during-the-drop")
    refusing.clear()

    await wait_connected(page)
    assert len(sockets) >= 2
    await expect(page.locator("#log .output", has_text="during-the-drop")).to_have_count(1)
    await expect(page.locator("#log .output", has_text="before-the-drop")).to_have_count(1)
    await expect(page.locator("#log .note-warn", has_text="Connection lost")).to_have_count(1)
    seqs = await log_seqs(page)
    assert seqs == sorted(set(seqs))


async def run_elsewhere(base: str, token: str, *cmds: str) -> None:
    """Runs *cmds* in the session over a socket of its own and waits for their results."""
    waiting = {f"elsewhere-{n}" for n in range(len(cmds))}
    async with (
        asyncio.timeout(30),
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{base}/ws") as ws,
    ):
        await ws.send_json({"type": "hello", "token": token, "last_seq": 2**31})
        for n, cmd in enumerate(cmds):
            await ws.send_json({"type": "run_command", "id": f"elsewhere-{n}", "cmd": cmd})
        async for message in ws:
            frame = json.loads(message.data)
            if frame.get("type") == "result" and frame.get("id") in waiting:
                assert frame["ok"], frame
                waiting.remove(frame["id"])
                if not waiting:
                    return
        pytest.fail("the socket closed before the commands' results")


async def test_log_follows_new_events_until_the_reader_scrolls_up(null_server: str, tab: Tab) -> None:
    """The log keeps its newest line in view, stays put once the reader scrolls up, and returns on request."""
    page = tab.page
    await log_in(page, null_server, unique("follow"))
    token = (await session_of(page))["token"]
    log = page.locator("#log")

    await run_elsewhere(null_server, token, *(f"echo first-batch-{n}" for n in range(10)))
    await expect(log.locator(".output", has_text="first-batch-9")).to_be_in_viewport()

    await log.hover()
    await page.mouse.wheel(0, -400)
    await expect(log.locator(".output", has_text="first-batch-9")).not_to_be_in_viewport()
    await run_elsewhere(null_server, token, *(f"echo second-batch-{n}" for n in range(5)))
    await expect(log.locator(".output", has_text="second-batch-4")).to_have_count(1)
    await expect(log.locator(".output", has_text="second-batch-4")).not_to_be_in_viewport()

    await page.get_by_role("button", name="New events below").click()
    await expect(log.locator(".output", has_text="second-batch-4")).to_be_in_viewport()


async def test_events_lost_while_away_show_as_a_gap(small_journal_server: str, tab: Tab) -> None:
    """Coming back after the journal has moved on shows a gap note, then the events still kept."""
    page = tab.page
    await log_in(page, small_journal_server, unique("gap"))
    await run_command(page, "echo kept-in-the-tab")
    session = await session_of(page)

    await page.goto("about:blank")
    await run_elsewhere(small_journal_server, session["token"], *(f"echo away-{n}" for n in range(5)))
    await page.goto(small_journal_server)
    await wait_connected(page)

    await expect(page.locator("#log .note-gap")).to_have_count(1)
    await expect(page.locator("#log .note-gap")).to_contain_text("no longer kept")
    await expect(page.locator("#log .output", has_text="kept-in-the-tab")).to_have_count(1)
    await expect(page.locator("#log .output", has_text="away-4")).to_have_count(1)
    await expect(page.locator("#log .output", has_text="away-0")).to_have_count(0)


async def test_run_task_without_model_is_disabled_and_says_why(null_server: str, tab: Tab) -> None:
    """On a server without a model endpoint Run task is disabled and says so before anyone tries."""
    page = tab.page
    await log_in(page, null_server, unique("ken"))
    panel = page.locator("#agent-panel")
    await expect(panel).not_to_have_attribute("open", "")  # folded: it could only take room from the log
    await expect(panel.locator("summary")).to_contain_text("no AI model on this server")
    await open_agent_panel(page)
    await expect(page.get_by_role("button", name="Run task")).to_be_disabled()
    await expect(page.locator("#task-unavailable")).to_contain_text("No AI model on this server")
    query = page.get_by_role("textbox", name="Task for the agent")
    await query.fill("open a browser")
    await query.press("Enter")
    await expect(page.locator("#log .note-error")).to_have_count(0)


async def test_logout_and_ended_session_return_to_login(null_server: str, tab: Tab) -> None:
    """Log out returns to the login form; a session ended elsewhere does too, with the reason shown."""
    page = tab.page
    await log_in(page, null_server, unique("barbara"))
    await confirm(page, "#logout", "End the session")
    await expect(page.locator("#login-view")).to_be_visible()
    await expect(page.locator("#login-form-error")).to_contain_text("logged out")
    assert await page.evaluate("sessionStorage.getItem('deskhive.session')") is None

    await log_in(page, null_server, unique("barbara"))
    session = await session_of(page)
    await end_elsewhere(null_server, session)
    await expect(page.locator("#login-view")).to_be_visible()
    said = page.locator("#login-form-error")
    await expect(said).to_contain_text("ended")
    await expect(said).not_to_contain_text(re.compile(r"ended.*ended"))  # said once, with the reason
    await expect(page.get_by_label("Username")).to_be_focused()


# --------------------------------------------------------------------------
# Tests on the local sandbox


async def local_command_failure(base: str) -> str | None:
    """Why the local sandbox cannot run `true` on this machine, or None when it can."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/sessions", json={"username": unique("probe")}) as answer:
            session = await answer.json()
        stderr = []
        # A first command starts the session's jail: a while on a loaded machine, not forever.
        async with asyncio.timeout(45), http.ws_connect(f"{base}/ws") as ws:
            await ws.send_json({"type": "hello", "token": session["token"]})
            await ws.send_json({"type": "run_command", "id": "probe", "cmd": "true"})
            async for message in ws:
                frame = json.loads(message.data)
                if frame.get("type") == "output" and frame.get("stream") == "stderr":
                    stderr.append(frame["data"].strip())
                if frame.get("type") == "result" and frame.get("id") == "probe":
                    break
        async with http.delete(
            f"{base}/api/sessions/{session['session_id']}",
            headers={"Authorization": f"Bearer {session['token']}"},
        ):
            pass
    if frame.get("ok"):
        return None
    return " ".join(stderr) or json.dumps(frame.get("error"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local_commands(local_server: str) -> str:
    """The local server, once it is seen to run commands here; the test is skipped otherwise."""
    failure = await local_command_failure(local_server)
    if failure is not None:
        pytest.skip(f"the local sandbox cannot run commands on this machine: {failure}")
    return local_server


# True once some canvas of the page holds a pixel of the colour asked for:
# the VNC client has drawn that part of the remote screen.
CANVAS_SHOWS_JS = """([r, g, b]) => [...document.querySelectorAll('canvas')].some(canvas => {
    if (!canvas.width || !canvas.height) return false;
    const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
    for (let i = 0; i < data.length; i += 4 * 53) {
        if (data[i] === r && data[i + 1] === g && data[i + 2] === b) return true;
    }
    return false;
})"""
DESKTOP_BLUE = (0x3A, 0x6E, 0xA5)
XTERM_WHITE = (0xFF, 0xFF, 0xFF)
XTERM_TEXT = (0x00, 0x00, 0x00)


@pytest.mark.local
async def test_local_desktop_stream_draws(local_commands: str, tab: Tab) -> None:
    """On the local sandbox a started desktop shows in the page's noVNC frame, which draws what runs on it."""
    page = tab.page
    await log_in(page, local_commands, unique("desk"))

    await page.get_by_role("button", name="Start desktop").click()
    await expect(page.locator("#state-badge")).to_have_text("ready", timeout=40_000)
    await expect(page.locator("#desktop-frame")).to_be_visible()
    frame = page.frame_locator("#desktop-frame")
    await expect(frame.locator("canvas").first).to_be_visible(timeout=20_000)
    desktop = next(f for f in page.frames if "/desktop/" in f.url)

    # A bare X desktop is black, like a canvas that drew nothing: paint it.
    await run_command(page, "xsetroot -solid '#3a6ea5'")
    await desktop.wait_for_function(CANVAS_SHOWS_JS, arg=DESKTOP_BLUE, timeout=20_000)
    await screenshot(page, "desktop")

    # A window that stays open is a job that runs until it is cancelled.
    box = page.get_by_role("textbox", name="Command")
    await box.fill("xterm -geometry 96x26+40+40 -e top")
    await box.press("Enter")
    await desktop.wait_for_function(CANVAS_SHOWS_JS, arg=XTERM_WHITE, timeout=20_000)
    await desktop.wait_for_function(CANVAS_SHOWS_JS, arg=XTERM_TEXT, timeout=20_000)
    await screenshot(page, "desktop-busy")
    job = page.locator("#jobs .job", has_text="xterm")
    await job.get_by_role("button", name=re.compile("Cancel")).click()
    await expect(job).to_have_count(0)


@pytest.mark.local
async def test_stdout_stderr_and_exit_code_are_told_apart(local_commands: str, tab: Tab) -> None:
    """A command's stdout and stderr land in rows marked as such; a failing exit code shows as a warning."""
    page = tab.page
    await log_in(page, local_commands, unique("streams"))
    await run_command(page, "echo to-stdout; echo to-stderr >&2; exit 3")

    await expect(page.locator("#log .output.stdout")).to_contain_text("to-stdout")
    await expect(page.locator("#log .output.stderr")).to_contain_text("to-stderr")
    await expect(page.locator("#log .output.stderr .tag")).to_have_text("stderr")
    await expect(page.locator("#log .note-warn").last).to_contain_text("exited with code 3")
    await expect(page.locator("#command-feedback")).to_have_text("Exited with code 3.")
    await screenshot(page, "streams")


@pytest.mark.local
async def test_cancel_stops_a_running_job(local_commands: str, tab: Tab) -> None:
    """The Cancel button of a running job, still there after a reload, ends it with a cancelled result."""
    page = tab.page
    await log_in(page, local_commands, unique("cancel"))
    box = page.get_by_role("textbox", name="Command")
    await box.fill("sleep 30")
    await box.press("Enter")

    job = page.locator("#jobs .job", has_text="sleep 30")
    await expect(job).to_contain_text("running")
    await expect(page.locator("#state-badge")).to_have_text("busy")
    await expect(page.locator("#current-command")).to_contain_text("sleep 30")
    await screenshot(page, "job-running")

    await page.reload()
    await wait_connected(page)
    await expect(job).to_contain_text("running")
    await expect(page.locator("#current-command")).to_contain_text("sleep 30")
    await job.get_by_role("button", name=re.compile("Cancel")).click()

    await expect(job).to_have_count(0)
    await expect(page.locator("#command-feedback")).to_contain_text("Cancelled")
    await expect(page.locator("#log .note-cancelled").last).to_contain_text("sleep 30")
