"""Settings of ``deskhive serve``: each option also an environment variable.

``--idle-timeout`` is ``DESKHIVE_IDLE_TIMEOUT``, and so on: the command line
wins over the environment, the environment over the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs

SANDBOX_KINDS: Final = ("local", "e2b", "null")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _at_least(kind: Callable[[str], Any], least: int, why: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least} ({why}), not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _flag(text: str) -> bool:
    if text.lower() in {"1", "true", "yes", "on"}:
        return True
    if text.lower() in {"0", "false", "no", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def default_data_dir() -> Path:
    """``/var/lib/deskhive`` for a root server, ``./var`` otherwise.

    Sandboxed processes run as other, unprivileged users, and bubblewrap opens
    their folders as those users: every folder above the data folder must be
    enterable by them, which a checkout under ``/root`` is not.
    """
    return Path("/var/lib/deskhive") if os.geteuid() == 0 else Path("var")


@attrs.frozen(kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    sandbox: str = "local"
    idle_timeout: float = 3600.0
    sweep_interval: float = 300.0
    admin_token: str | None = None
    journal_size: int = 1000
    users_file: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    data_dir: Path = attrs.field(factory=lambda: default_data_dir(), converter=Path)
    mailbox_size: int = 1000
    sessions_per_user: int = 3
    command_timeout: float = 600.0
    output_limit: int = 10 * 1024 * 1024
    workflows_dir: Path = attrs.field(default=Path(__file__).parent / "workflows", converter=Path)
    model_url: str | None = None
    model: str = "gpt-4o"
    model_key: str | None = None
    sandbox_network: bool = False
    command_cpu_seconds: int = 600
    command_memory: int = 2 * 1024**3
    command_processes: int = 256
    command_file_size: int = 1024**3
    log_level: str = "info"
    log_format: str = "auto"


#: (option, parser, help); the default comes from ``Settings``.
_OPTIONS: Final[Sequence[tuple[str, Callable[[str], Any], str]]] = (
    ("host", str, "address to listen on"),
    ("port", int, "port to listen on (0: any free port)"),
    ("sandbox", str, "sandbox backend: local, e2b or null"),
    ("idle_timeout", _positive(float), "seconds without a client frame or job before a session is reaped"),
    ("sweep_interval", _positive(float), "seconds between sweeps for idle sessions"),
    ("admin_token", str, "bearer token for /status (random and printed when unset)"),
    ("journal_size", _positive(int), "events kept per session for replay"),
    ("users_file", Path, "file of 'username:scrypt$...' lines; unset means demo mode"),
    ("data_dir", Path, "folder for per-session data (default /var/lib/deskhive as root, else ./var)"),
    ("mailbox_size", _positive(int), "messages a session's mailbox holds before 'busy'"),
    ("sessions_per_user", _positive(int), "sessions one username may hold at once"),
    ("command_timeout", _positive(float), "default command timeout, seconds"),
    ("output_limit", _positive(int), "bytes of output kept per job"),
    ("workflows_dir", Path, "folder of workflow files (*.toml)"),
    ("model_url", str, "OpenAI-compatible endpoint for run_task (e.g. https://host/v1)"),
    ("model", str, "model name for run_task"),
    ("model_key", str, "API key for the model endpoint"),
    ("sandbox_network", _flag, "give local sandboxes a network (off by default)"),
    ("command_cpu_seconds", _positive(int), "CPU seconds a local sandbox command may use"),
    ("command_memory", _positive(int), "bytes of memory (data segment) a local sandbox command may use"),
    ("command_processes", _positive(int), "processes a local sandbox session may run at once"),
    (
        "command_file_size",
        _at_least(int, 64 * 1024, "the sandbox writes its own start-up files under it"),
        "largest file a local sandbox command may write, bytes",
    ),
    ("log_level", str, "debug, info, warning or error"),
    ("log_format", str, "json, console or auto (console on a terminal)"),
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="deskhive", description="A multi-user sandbox gateway.")
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the gateway")
    for name, kind, text in _OPTIONS:
        env = f"DESKHIVE_{name.upper()}"
        serve.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=f"{text} [{env}]")
    serve.set_defaults(command="serve")
    commands.add_parser("hash-password", help="read a password on stdin, print a users-file hash")
    return top


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed arguments, then ``DESKHIVE_*`` variables, then defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, kind, _ in _OPTIONS:
        value = getattr(args, name, None)
        env = environ.get(f"DESKHIVE_{name.upper()}")
        if value is None and env:
            try:
                value = kind(env)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise SystemExit(f"deskhive: DESKHIVE_{name.upper()}={env!r}: {exc}") from None
        if value is not None:
            values[name] = value
    settings = Settings(**values)
    if settings.sandbox not in SANDBOX_KINDS:
        raise SystemExit(
            f"deskhive: --sandbox must be one of {', '.join(SANDBOX_KINDS)}, not {settings.sandbox!r}"
        )
    return settings
