"""Workflows: named step lists kept in TOML files, loaded and checked once.

A workflow file ``NAME.toml`` in the workflows folder looks like::

    description = "Start the desktop, set up the environment, run the task."

    [[steps]]
    kind = "desktop"

    [[steps]]
    kind = "setup"
    packages = ["jq"]          # optional

    [[steps]]
    kind = "command"
    cmd = "uname -a"
    timeout = 60               # optional, seconds (default 600)

    [[steps]]
    kind = "open"
    url = "https://example.com"

    [[steps]]
    kind = "task"
    query = "Summarise {query}"  # optional: without it, the request's query

Every field is checked at load time, so a bad file stops the server at
start-up with a message naming the file and the step, instead of failing a
user's job later. This module is data and validation only: the session actor
runs the steps.
"""

from __future__ import annotations

import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, get_args
from urllib.parse import urlsplit

import attrs

from protocol import fields

StepKind = Literal["desktop", "setup", "command", "task", "open"]
STEP_KINDS: Final[tuple[str, ...]] = get_args(StepKind)

#: The folder of workflows shipped with deskhive.
SHIPPED_FOLDER: Final = Path(__file__).resolve().parent.parent / "workflows"
DEFAULT_COMMAND_TIMEOUT: Final = 600.0
MAX_COMMAND_TIMEOUT: Final = fields.MAX_TIMEOUT_S
MAX_STEPS: Final = 100

# Names, packages and text follow protocol.fields, as requests do: a step
# may hold exactly what a client could have asked for.
_NAME = fields.NAME
#: Fields each kind of step may carry, beyond ``kind``; the first are required.
_FIELDS: Final[Mapping[str, tuple[frozenset[str], frozenset[str]]]] = {
    "desktop": (frozenset(), frozenset()),
    "setup": (frozenset(), frozenset({"packages"})),
    "command": (frozenset({"cmd"}), frozenset({"timeout"})),
    "task": (frozenset(), frozenset({"query"})),
    "open": (frozenset({"url"}), frozenset()),
}


class WorkflowError(ValueError):
    """A workflow file that cannot be used; the message names the file and step."""


@attrs.frozen(kw_only=True)
class Step:
    """One step of a workflow; only the fields of its ``kind`` are set."""

    kind: StepKind
    #: ``setup``: packages to install (``NAME`` for Debian, ``pip:REQ`` for pip).
    packages: tuple[str, ...] = ()
    #: ``command``: the shell command and its timeout in seconds.
    cmd: str = ""
    timeout: float = DEFAULT_COMMAND_TIMEOUT
    #: ``task``: the agent's query; ``{query}`` is the request's query, and an
    #: empty one means the request's query itself.
    query: str = ""
    #: ``open``: an http(s) URL opened on the desktop.
    url: str = ""


@attrs.frozen(kw_only=True)
class Workflow:
    """A named list of steps, run in order by a session's actor."""

    name: str
    description: str
    steps: tuple[Step, ...]

    @property
    def needs_query(self) -> bool:
        """Whether running it needs the request to carry a ``query``."""
        return any(s.kind == "task" and (not s.query or "{query}" in s.query) for s in self.steps)


def describe(workflow: Workflow) -> dict[str, Any]:
    """A workflow as plain JSON-ready data, for listing to clients."""
    return {
        "name": workflow.name,
        "description": workflow.description,
        "needs_query": workflow.needs_query,
        "steps": [_describe_step(step) for step in workflow.steps],
    }


def _describe_step(step: Step) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": step.kind}
    match step.kind:
        case "setup":
            data["packages"] = list(step.packages)
        case "command":
            data |= {"cmd": step.cmd, "timeout": step.timeout}
        case "task":
            data["query"] = step.query
        case "open":
            data["url"] = step.url
    return data


def load_workflows(folder: Path) -> dict[str, Workflow]:
    """Every ``*.toml`` workflow in *folder*, by name; ``WorkflowError`` for a bad one."""
    if not folder.is_dir():
        raise WorkflowError(f"{folder}: not a folder of workflows")
    workflows = {}
    for path in sorted(folder.glob("*.toml")):
        workflow = load_workflow(path)
        workflows[workflow.name] = workflow
    return workflows


def load_workflow(path: Path) -> Workflow:
    """The workflow in the TOML file *path*, named after the file."""
    name = path.stem
    if not _NAME.fullmatch(name):
        raise WorkflowError(f"{path}: a workflow's file name must match {_NAME.pattern}.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise WorkflowError(f"{path}: cannot read it as TOML: {exc}") from exc
    return parse_workflow(name, data, where=str(path))


def parse_workflow(name: str, data: Mapping[str, Any], *, where: str) -> Workflow:
    """Check the decoded TOML *data* of workflow *name*; errors start with *where*."""
    _no_unknown(data, {"description", "steps"}, where)
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise WorkflowError(f"{where}: 'description' must be a non-empty string")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise WorkflowError(f"{where}: 'steps' must be a non-empty list of [[steps]] tables")
    if len(steps) > MAX_STEPS:
        raise WorkflowError(f"{where}: at most {MAX_STEPS} steps, found {len(steps)}")
    parsed = tuple(_parse_step(raw, f"{where}: step {n}") for n, raw in enumerate(steps, 1))
    return Workflow(name=name, description=description.strip(), steps=parsed)


def _parse_step(raw: object, where: str) -> Step:
    if not isinstance(raw, dict):
        raise WorkflowError(f"{where}: must be a table with a 'kind'")
    kind = raw.get("kind")
    if kind not in STEP_KINDS:
        raise WorkflowError(f"{where}: 'kind' must be one of {', '.join(STEP_KINDS)}, got {kind!r}")
    where = f"{where} ({kind})"
    required, optional = _FIELDS[kind]
    _no_unknown(raw, required | optional | {"kind"}, where)
    missing = sorted(required - raw.keys())
    if missing:
        raise WorkflowError(f"{where}: missing {', '.join(repr(m) for m in missing)}")
    fields: dict[str, Any] = {}
    if "packages" in raw:
        fields["packages"] = _packages(raw["packages"], where)
    if "cmd" in raw:
        fields["cmd"] = _text(raw["cmd"], "cmd", where)
    if "timeout" in raw:
        fields["timeout"] = _timeout(raw["timeout"], where)
    if "query" in raw:
        fields["query"] = _query(raw["query"], where)
    if "url" in raw:
        fields["url"] = _url(raw["url"], where)
    return Step(kind=kind, **fields)


def _no_unknown(table: Mapping[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        # Usually a typo; silently ignoring it would run something else.
        expected = ", ".join(sorted(allowed)) or "nothing"
        raise WorkflowError(f"{where}: unknown field {unknown[0]!r} (expected: {expected})")


def _text(value: object, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise WorkflowError(f"{where}: {field!r} must be a non-empty string")
    return _sandbox_text(value, field, where)


def _sandbox_text(value: str, field: str, where: str) -> str:
    # TOML can spell NUL ("\u0000"), which no shell or model can take.
    problem = fields.text_problem(value)
    if problem is not None:
        raise WorkflowError(f"{where}: {field!r} must be {problem}")
    return value


def _packages(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > fields.MAX_PACKAGES:
        raise WorkflowError(f"{where}: 'packages' must be a list of at most {fields.MAX_PACKAGES} packages")
    for package in value:
        if not fields.is_package(package):
            expected = fields.DESCRIBE_PACKAGE
            raise WorkflowError(f"{where}: {package!r} is not a package name; expected {expected}")
    return tuple(value)


def _timeout(value: object, where: str) -> float:
    # bool is an int to Python, but `timeout = true` is a mistake; NaN fails the range.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_COMMAND_TIMEOUT:
        raise WorkflowError(f"{where}: 'timeout' must be a number of seconds in (0, {MAX_COMMAND_TIMEOUT:g}]")
    return float(value)


def _query(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise WorkflowError(f"{where}: 'query' must be a string")
    _sandbox_text(value, "query", where)
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value)]
    except ValueError as exc:
        raise WorkflowError(
            f"{where}: 'query' has unbalanced braces ({exc}); write {{{{ }}}} for literal ones"
        ) from exc
    for name, spec, conv in fields:
        if name is not None and (name != "query" or spec or conv):
            raise WorkflowError(f"{where}: 'query' may only use the placeholder {{query}}, found {{{name}}}")
    return value


def _url(value: object, where: str) -> str:
    url = _text(value, "url", where)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in url):
        raise WorkflowError(f"{where}: 'url' must be an http or https URL, got {url!r}")
    return url
