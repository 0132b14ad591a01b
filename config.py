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
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("json", "console", "auto")
#: Secrets that may also be read from a file (``--model-key-file``); argv is
#: readable by every local user through ``/proc/<pid>/cmdline``.
SECRET_OPTIONS: Final = ("admin_token", "model_key")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, not {text}")
    return value


def _at_least(kind: Callable[[str], Any], least: int, why: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least} ({why}), not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    """One of *choices* (any case), else a message naming them all."""

    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, not {text!r}")
        return text.lower()

    parse.__name__ = "choice"
    return parse


def _origins(text: str) -> tuple[str, ...]:
    """``https://a.example,http://b:8080``: each a scheme://host[:port], nothing more."""
    found = []
    for item in filter(None, (part.strip().rstrip("/").lower() for part in text.split(","))):
        scheme, sep, rest = item.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            raise argparse.ArgumentTypeError(f"an origin is scheme://host[:port], not {item!r}")
        found.append(item)
    return tuple(found)


_UNITS: Final = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _home_quota(text: str) -> tuple[int, int]:
    """``5GiB`` or ``5GiB:500000`` (bytes, then inodes); ``0`` leaves homes unbounded."""
    size, _, inodes = text.strip().lower().partition(":")
    number = size.rstrip("kmgtib")
    unit = size[len(number) :].removesuffix("ib").removesuffix("b")
    if not number.isdigit() or unit not in _UNITS or (inodes and not inodes.isdigit()):
        raise argparse.ArgumentTypeError(f"expected SIZE[:INODES] such as 5GiB:500000, not {text!r}")
    value = int(number) * _UNITS[unit]
    if 0 < value < 64 * 1024**2:
        raise argparse.ArgumentTypeError(f"a home needs at least 64 MiB, not {text!r}")
    return value, int(inodes) if inodes else 500_000


def _flag(text: str) -> bool:
    if text.lower() in {"1", "true", "yes", "on"}:
        return True
    if text.lower() in {"0", "false", "no", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _store_url(text: str) -> str:
    if text != "memory" and not (text.startswith("sqlite://") and len(text) > len("sqlite://")):
        raise argparse.ArgumentTypeError(f"expected memory or sqlite:///PATH, not {text!r}")
    return text


def default_data_dir() -> Path:
    """``/var/lib/deskhive`` for a root server, ``./var`` otherwise.

    Any folder works, ``/root`` included: sandboxed processes reach their
    folders through a mount of their own (``sandboxes.local.portal``).
    """
    return Path("/var/lib/deskhive") if os.geteuid() == 0 else Path("var")


@attrs.frozen(kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    sandbox: str = "local"
    idle_timeout: float = 3600.0
    sweep_interval: float = 300.0
    admin_token: str | None = attrs.field(default=None, repr=False)
    journal_size: int = 1000
    users_file: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    data_dir: Path = attrs.field(factory=lambda: default_data_dir(), converter=Path)
    #: Where sessions are kept; ``None``: ``sqlite://<data_dir>/deskhive.db``.
    store: str | None = None
    mailbox_size: int = 1000
    sessions_per_user: int = 3
    #: Limits of SPEC 1.1 ("Limits"); 0 turns one off.
    max_sessions: int = 50_000
    max_desktops: int = 16
    desktops_per_user: int = 3
    frames_per_second: int = 2000
    logins_per_minute: int = 0
    #: ``/metrics`` and the per-frame counts (off only to measure what they cost).
    metrics: bool = True
    command_timeout: float = 600.0
    output_limit: int = 10 * 1024 * 1024
    workflows_dir: Path = attrs.field(default=Path(__file__).parent / "workflows", converter=Path)
    model_url: str | None = None
    model: str = "gpt-4o"
    model_key: str | None = attrs.field(default=None, repr=False)
    sandbox_network: bool = False
    command_cpu_seconds: int = 600
    command_memory: int = 2 * 1024**3
    command_processes: int = 256
    command_file_size: int = 1024**3
    log_level: str = "info"
    log_format: str = "auto"
    #: Origins besides this server's own that may open ``/ws`` and desktop streams.
    allowed_origins: tuple[str, ...] = ()
    #: Seconds a connection may take to send a complete request head.
    header_timeout: float = 30.0
    #: Open connections at once; 0 derives it from the descriptor limit, keeping a reserve.
    max_connections: int = 0
    #: Secret options given as flags, for a warning at start-up (never their values).
    secrets_on_command_line: tuple[str, ...] = ()
    agent_max_steps: int = 30
    agent_timeout: float = 1800.0
    model_timeout: float = 120.0
    model_retries: int = 2
    agent_images: int = 1
    agent_image_width: int = 1280
    agent_image_height: int = 1280
    agent_image_format: str = "jpeg"
    agent_coordinate_grid: int = 0
    #: Largest file ``PUT /api/sessions/{id}/files/{path}`` takes, bytes.
    upload_limit: int = 100 * 1024 * 1024
    #: Bytes and inodes of each local sandbox's home; (0, n) leaves homes unbounded.
    home_quota: tuple[int, int] = (5 * 1024**3, 500_000)


#: (option, parser, help); the default comes from ``Settings``.
_OPTIONS: Final[Sequence[tuple[str, Callable[[str], Any], str]]] = (
    ("host", str, "address to listen on"),
    ("port", _port, "port to listen on (0: any free port)"),
    ("sandbox", _choice(SANDBOX_KINDS), "sandbox backend: local, e2b or null"),
    ("idle_timeout", _positive(float), "seconds without a client frame or job before a session is reaped"),
    ("sweep_interval", _positive(float), "seconds between sweeps for idle sessions"),
    ("admin_token", str, "bearer token for /status (random and printed when unset); prefer the variable"),
    ("journal_size", _positive(int), "events kept per session for replay"),
    ("users_file", Path, "file of 'username:scrypt$...' lines; unset means demo mode"),
    ("data_dir", Path, "folder for per-session data (default /var/lib/deskhive as root, else ./var)"),
    ("store", _store_url, "sqlite:///PATH (default <data-dir>/deskhive.db) or memory (nothing kept)"),
    ("mailbox_size", _positive(int), "messages a session's mailbox holds before 'busy'"),
    ("sessions_per_user", _positive(int), "sessions one username may hold at once"),
    ("max_sessions", _at_least(int, 0, "0 turns it off"), "sessions on this server at once (0: no limit)"),
    (
        "max_desktops",
        _at_least(int, 0, "0 turns it off"),
        "desktops running on this server at once (0: no limit)",
    ),
    (
        "desktops_per_user",
        _at_least(int, 0, "0 turns it off"),
        "desktops one username runs at once (0: no limit)",
    ),
    (
        "frames_per_second",
        _at_least(int, 0, "0 turns it off"),
        "client frames per socket per second, bursts of twice that (0: no limit)",
    ),
    (
        "logins_per_minute",
        _at_least(int, 0, "0 turns it off"),
        "logins per client address per minute, bursts of as many (0: no limit)",
    ),
    ("metrics", _flag, "serve /metrics and count frames (on by default)"),
    ("command_timeout", _positive(float), "default command timeout, seconds"),
    ("output_limit", _positive(int), "bytes of output kept per job"),
    ("workflows_dir", Path, "folder of workflow files (*.toml)"),
    ("model_url", str, "OpenAI-compatible endpoint for run_task (e.g. https://host/v1)"),
    ("model", str, "model name for run_task"),
    ("model_key", str, "API key for the model endpoint; prefer the variable or --model-key-file"),
    ("sandbox_network", _flag, "give local sandboxes an outbound-only network of their own (off by default)"),
    ("command_cpu_seconds", _positive(int), "CPU seconds a local sandbox command may use"),
    ("command_memory", _positive(int), "bytes of memory (data segment) a local sandbox command may use"),
    ("command_processes", _positive(int), "processes a local sandbox session may run at once"),
    (
        "command_file_size",
        _at_least(int, 64 * 1024, "the sandbox writes its own start-up files under it"),
        "largest file a local sandbox command may write, bytes",
    ),
    ("log_level", _choice(LOG_LEVELS), "debug, info, warning or error"),
    ("log_format", _choice(LOG_FORMATS), "json, console or auto (console on a terminal)"),
    (
        "allowed_origins",
        _origins,
        "other sites (scheme://host:port, comma-separated) whose pages may use this server",
    ),
    ("header_timeout", _positive(float), "seconds a connection may take to send a request head"),
    (
        "max_connections",
        _at_least(int, 0, "0 derives it from the descriptor limit"),
        "open connections at once (0: the descriptor limit less a reserve)",
    ),
    ("agent_max_steps", _positive(int), "model round trips one run_task may take"),
    ("agent_timeout", _positive(float), "seconds one run_task may take in all"),
    ("model_timeout", _positive(float), "seconds one model request may take"),
    ("model_retries", _at_least(int, 0, "0 sends each request once"), "retries of a failed model request"),
    ("agent_images", _positive(int), "screenshots sent per model request (vLLM often takes 1)"),
    ("agent_image_width", _positive(int), "screenshots are scaled down to this width or less"),
    ("agent_image_height", _positive(int), "screenshots are scaled down to this height or less"),
    ("agent_image_format", _choice(("jpeg", "png")), "how screenshots are sent to the model: jpeg or png"),
    (
        "agent_coordinate_grid",
        _at_least(int, 0, "0 means screenshot pixels"),
        "0: the model answers screenshot pixels; N: a 0..N grid (1000 for Qwen-VL, UI-TARS)",
    ),
    ("upload_limit", _positive(int), "largest file one upload to a session's home may be, bytes"),
    ("home_quota", _home_quota, "size[:inodes] of each local sandbox's home (default 5GiB:500000; 0: none)"),
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="deskhive", description="A multi-user sandbox gateway.")
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the gateway")
    for name, kind, text in _OPTIONS:
        env = f"DESKHIVE_{name.upper()}"
        serve.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=f"{text} [{env}]")
    for name in SECRET_OPTIONS:
        flag = name.replace("_", "-")
        serve.add_argument(
            f"--{flag}-file",
            dest=f"{name}_file",
            type=Path,
            help=f"read --{flag} from this file (first line) [DESKHIVE_{name.upper()}_FILE]",
        )
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
    values.update(_secret_files(args, environ, values))
    flagged = tuple(n.replace("_", "-") for n in SECRET_OPTIONS if getattr(args, n, None) is not None)
    return Settings(**values, secrets_on_command_line=flagged)


def _secret_files(
    args: argparse.Namespace, environ: Mapping[str, str], values: Mapping[str, Any]
) -> dict[str, str]:
    """Secrets read from ``--*-file`` (or ``DESKHIVE_*_FILE``) where no value was given."""
    found = {}
    for name in SECRET_OPTIONS:
        path = getattr(args, f"{name}_file", None) or environ.get(f"DESKHIVE_{name.upper()}_FILE")
        if not path:
            continue
        if name in values:
            raise SystemExit(f"deskhive: give --{name.replace('_', '-')} or its file, not both")
        try:
            secret = Path(path).read_text().strip()
        except OSError as exc:
            raise SystemExit(f"deskhive: cannot read {path}: {exc.strerror}") from None
        if not secret:
            raise SystemExit(f"deskhive: {path} is empty")
        found[name] = secret
    return found
