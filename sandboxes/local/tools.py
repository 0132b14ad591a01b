"""Small pieces of the local sandbox: setup steps, key names, the browser's argv.

``setup`` is honest about what a read-only system allows: Debian packages
cannot be installed into a sandbox, so each one asked for is checked on the
host and a missing one is reported (``scripts/install-system-packages.sh``
is where it belongs); ``pip:NAME`` packages are installed with
``pip install --user`` into the session's home by the jail's own
``/usr/bin/python3`` (never a ``python3`` the session's PATH finds), in the
session's usual jail: with the network of its own that ``--sandbox-network``
gives, or, without it, not at all.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Sequence
from typing import Protocol

from protocol import fields
from protocol.errors import ProtocolError, SandboxBroken
from sandboxes.base import OutputSink, StepReporter, Stream
from sandboxes.local.config import LocalConfig
from sandboxes.local.jail import HOME
from sandboxes.local.procs import reap

SCROLL_BUTTONS = {"up": "4", "down": "5", "left": "6", "right": "7"}
#: What ``launch terminal`` starts.
TERMINAL = "xterm"
BROWSER_NAMES = frozenset({"browser", "chromium", "chromium-browser", "google-chrome", "chrome", "firefox"})
_KEYS = {
    "enter": "Return", "return": "Return", "esc": "Escape", "escape": "Escape", "tab": "Tab",
    "backspace": "BackSpace", "delete": "Delete", "del": "Delete", "space": "space",
    "up": "Up", "down": "Down", "left": "Left", "right": "Right", "home": "Home", "end": "End",
    "pageup": "Prior", "pagedown": "Next", "insert": "Insert",
    "ctrl": "ctrl", "control": "ctrl", "alt": "alt", "shift": "shift", "super": "super",
    "meta": "super", "cmd": "super", "win": "super",
}  # fmt: skip
_KEY_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")
#: Debian's interpreter inside the jail (``/usr`` is the host's, read-only).
PYTHON = "/usr/bin/python3"
NO_NETWORK = (
    "pip packages need a network and this server gives its sandboxes none "
    "(the operator can start it with --sandbox-network true)"
)
BASHRC = f"""\
# Written by deskhive on the first setup; yours to change.
export PATH="{HOME}/.local/bin:$PATH"
PS1='\\u@sandbox:\\w\\$ '
"""


class Runner(Protocol):
    """What ``setup`` needs of a sandbox (``LocalSandbox`` is one; this module imports it not)."""

    @property
    def config(self) -> LocalConfig: ...

    async def exec(
        self, argv: Sequence[str], *, timeout: float, on_output: OutputSink, network: bool | None = None
    ) -> int: ...


def key_chord(keys: str | Sequence[str]) -> str:
    """xdotool's name for a key or a chord (``["ctrl", "c"]`` or ``"ctrl+c"``)."""
    parts = keys.split("+") if isinstance(keys, str) else list(keys)
    names = [_KEYS.get(part.lower(), part) for part in parts if part]
    if not names or not all(_KEY_NAME.fullmatch(n) for n in names):
        raise ProtocolError(f"not a key or key chord: {keys!r}")
    return "+".join(names)


def browser_argv(browser: str) -> list[str]:
    """The browser, quiet (no calls home), with its profile in the home."""
    return [
        browser,
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--password-store=basic",
        f"--user-data-dir={HOME}/.config/chromium",
        "--start-maximized",
    ]


async def setup(sandbox: Runner, packages: Sequence[str], report: StepReporter) -> None:
    """Prepare the home, check the browser, then each package; fail naming the missing."""
    await _prepare_home(sandbox)
    report("setup.home", path=HOME)
    browser = sandbox.config.browser
    report("setup.browser", browser=browser, present=shutil.which(browser) is not None)
    missing = []
    for name in packages:
        # The codec and the workflow loader already refused what is not a
        # package; this is the last check before a name reaches argv.
        package = fields.parse_package(name)
        if package is None:
            report("setup.package", package=name, status="invalid", expected=fields.DESCRIBE_PACKAGE)
            ok = False
        elif package.manager == "pip":
            ok = await _pip_install(sandbox, package.spec, report)
        else:
            ok = await _debian_present(package.spec, report)
        if not ok:
            missing.append(name)
    if missing:
        raise SandboxBroken(_missing(missing, network=sandbox.config.network_on))


def _missing(names: Sequence[str], *, network: bool) -> str:
    text = f"packages not available in the sandbox: {', '.join(names)}"
    if not network and any(name.startswith("pip:") for name in names):
        text += f" ({NO_NETWORK})"
    return text


async def _prepare_home(sandbox: Runner) -> None:
    # Done inside the jail as the session's user: the home is the session's
    # to change, and the server must not follow links a session left there.
    script = (
        f'mkdir -p "$HOME/.config/chromium" "$HOME/.local/bin" "$HOME/Desktop" && '
        f'{{ [ -e "$HOME/.bashrc" ] || printf %s {_quote(BASHRC)} > "$HOME/.bashrc"; }}'
    )
    errors: list[str] = []
    code = await sandbox.exec(
        ["/bin/sh", "-c", script], timeout=30, on_output=_collect(errors), network=False
    )
    if code != 0:
        raise SandboxBroken(f"preparing the home failed (exit {code}): {''.join(errors)[-300:]}")


async def _debian_present(name: str, report: StepReporter) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "dpkg-query", "-W", "-f=${Status}", "--", name, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(10):
            out, _ = await proc.communicate()
    except TimeoutError:
        raise SandboxBroken(f"dpkg-query did not answer about {name}") from None
    finally:
        await reap(proc)
    present = out.decode(errors="replace").endswith("installed")
    status = "present" if present else "missing"
    hint = None if present else "not installed on the host: add it to scripts/install-system-packages.sh"
    report("setup.package", package=name, manager="apt", status=status, **({"hint": hint} if hint else {}))
    return present


async def _pip_install(sandbox: Runner, name: str, report: StepReporter) -> bool:
    if not sandbox.config.network_on:
        report("setup.package", package=name, manager="pip", status="failed", reason=NO_NETWORK)
        return False
    # By absolute path and isolated (-I: no PYTHON* variables, no user site,
    # not the home on sys.path): the system's pip, whatever the home holds.
    argv = [PYTHON, "-I", "-m", "pip", "install", "--user", "--break-system-packages", "--no-input"]
    argv += ["--disable-pip-version-check", "--progress-bar", "off", "--", name]
    out: list[str] = []
    timeout = sandbox.config.pip_timeout
    # network=None: the session's own jail and network, as its commands have.
    code = await sandbox.exec(argv, timeout=timeout, on_output=_collect(out))
    status = "installed" if code == 0 else "failed"
    report(
        "setup.package", package=name, manager="pip", status=status, exit_code=code, tail="".join(out)[-400:]
    )
    return code == 0


def _collect(into: list[str]) -> OutputSink:
    async def sink(_stream: Stream, text: str) -> None:
        into.append(text)

    return sink


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
