"""The agent's tools: their JSON schemas, and running one call on the desktop.

A call the model got wrong (unknown tool, arguments that are not JSON or do
not fit the schema) is answered with an error the model can read and
correct; it never ends the run. Sandbox failures do end it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs

from protocol.errors import CommandTimeout
from sandboxes.base import OutputSink, Sandbox, ScrollDirection, Stream

#: Characters of a command's output the model gets back (head and tail).
OUTPUT_FOR_MODEL = 4000
COMMAND_TIMEOUT_DEFAULT = 60
COMMAND_TIMEOUT_MAX = 600
_SCROLL: dict[str, ScrollDirection] = {"up": "up", "down": "down", "left": "left", "right": "right"}


class AgentLog(Protocol):
    """What the agent needs of a structlog bound logger."""

    def info(self, event: str, **kw: Any) -> Any: ...
    def warning(self, event: str, **kw: Any) -> Any: ...


#: Maps the model's (x, y) to a screen pixel.
ToScreen = Callable[[float, float], tuple[int, int]]


def pixels_as_is(x: float, y: float) -> tuple[int, int]:
    """The model's coordinates as screen pixels, when no screenshot says how to scale them."""
    return max(0, round(x)), max(0, round(y))


class ToolError(ValueError):
    """A tool call the model got wrong; its message goes back to the model."""


@attrs.frozen(kw_only=True)
class Outcome:
    """What running one tool call gave."""

    content: str
    #: Whether the screen may have changed, so a fresh screenshot is due.
    screen_changed: bool = False
    #: Set by ``finish``: the run's answer.
    answer: str | None = None


def _tool(
    name: str, description: str, properties: dict[str, Any], required: Sequence[str] = ()
) -> dict[str, Any]:
    parameters = {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


def tools_for(grid: int = 0) -> list[dict[str, Any]]:
    """The tools offered to a model answering pixels of the screenshot, or a 0..*grid* grid."""
    where = f"({grid}, {grid}) its bottom right" if grid else "pixels of the latest screenshot"
    coordinate = {"type": "number", "minimum": 0, **({"maximum": grid} if grid else {})}
    return [
        _tool("screenshot", "Take a fresh screenshot of the desktop.", {}),
        _tool(
            "click",
            f"Click at (x, y) of the latest screenshot; (0, 0) is its top left, {where}.",
            {
                "x": coordinate,
                "y": coordinate,
                "button": {"type": "string", "enum": ["left", "right"], "default": "left"},
                "double": {"type": "boolean", "default": False, "description": "double-click, left button"},
            },
            ["x", "y"],
        ),
        _tool("type", "Type text at the keyboard focus.", {"text": {"type": "string"}}, ["text"]),
        _tool(
            "key",
            "Press a key or a chord, e.g. ['enter'] or ['ctrl', 'l'].",
            {"keys": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
            ["keys"],
        ),
        _tool(
            "scroll",
            "Scroll the mouse wheel where the pointer is.",
            {
                "direction": {"type": "string", "enum": ["up", "down", "left", "right"]},
                "amount": {"type": "integer", "minimum": 1, "maximum": 50, "default": 3},
            },
            ["direction"],
        ),
        _tool(
            "command",
            "Run a shell command in the sandbox (not on screen); get its exit code and output.",
            {
                "cmd": {"type": "string"},
                "timeout": {"type": "integer", "minimum": 1, "maximum": COMMAND_TIMEOUT_MAX},
            },
            ["cmd"],
        ),
        _tool(
            "finish", "End the task with the answer for the user.", {"answer": {"type": "string"}}, ["answer"]
        ),
    ]


#: The tools for a model that answers in pixels.
TOOLS: list[dict[str, Any]] = tools_for()


async def run_tool(
    name: str,
    args: dict[str, Any],
    desktop: Sandbox,
    on_output: OutputSink,
    to_screen: ToScreen = pixels_as_is,
) -> Outcome:
    """Run tool *name* with *args* on *desktop*; ``ToolError`` if the call is wrong.

    *to_screen* maps the model's coordinates to screen pixels.
    """
    match name:
        case "screenshot":
            _only(args)
            return Outcome(content="screenshot taken", screen_changed=True)
        case "click":
            return await _click(args, desktop, to_screen)
        case "type":
            _only(args, "text")
            await desktop.write(_string(args, "text", allow_empty=False))
            return Outcome(content="typed", screen_changed=True)
        case "key":
            _only(args, "keys")
            await desktop.press(_keys(args))
            return Outcome(content="pressed", screen_changed=True)
        case "scroll":
            _only(args, "direction", "amount")
            direction = _SCROLL[_choice(args, "direction", tuple(_SCROLL), None)]
            await desktop.scroll(direction, _int(args, "amount", 1, 50, 3))
            return Outcome(content="scrolled", screen_changed=True)
        case "command":
            return await _command(args, desktop, on_output)
        case "finish":
            _only(args, "answer")
            return Outcome(content="finished", answer=_string(args, "answer", allow_empty=True))
    raise ToolError(f"unknown tool {name!r}; use one of: {', '.join(t['function']['name'] for t in TOOLS)}")


async def _click(args: dict[str, Any], desktop: Sandbox, to_screen: ToScreen) -> Outcome:
    _only(args, "x", "y", "button", "double")
    x, y = to_screen(_number(args, "x"), _number(args, "y"))
    button = _choice(args, "button", ("left", "right"), "left")
    double = args.get("double", False)
    if not isinstance(double, bool):
        raise ToolError("'double' must be true or false")
    if double and button == "right":
        raise ToolError("a double click uses the left button")
    click = (
        desktop.double_click if double else desktop.right_click if button == "right" else desktop.left_click
    )
    await click(x, y)
    return Outcome(content=f"clicked at ({x}, {y})", screen_changed=True)


async def _command(args: dict[str, Any], desktop: Sandbox, on_output: OutputSink) -> Outcome:
    _only(args, "cmd", "timeout")
    cmd = _string(args, "cmd", allow_empty=False)
    timeout = _int(args, "timeout", 1, COMMAND_TIMEOUT_MAX, COMMAND_TIMEOUT_DEFAULT)
    captured = Captured(OUTPUT_FOR_MODEL)

    async def tee(stream: Stream, data: str) -> None:
        captured.add(data)
        await on_output(stream, data)

    try:
        code = await desktop.run(cmd, timeout=timeout, on_output=tee)
    except CommandTimeout:
        # The model can recover from a slow command (try another): tell it.
        return Outcome(
            content=f"timed out after {timeout} s and was killed\n{captured.text()}", screen_changed=True
        )
    return Outcome(content=f"exit code {code}\n{captured.text()}", screen_changed=True)


class Captured:
    """A command's output for the model: the head and the tail within *limit* characters."""

    def __init__(self, limit: int) -> None:
        self._half = limit // 2
        self._head = ""
        self._tail = ""
        self._dropped = 0

    def add(self, data: str) -> None:
        room = self._half - len(self._head)
        self._head += data[:room]
        self._tail += data[room:] if room > 0 else data
        excess = len(self._tail) - self._half
        if excess > 0:
            self._dropped += excess
            self._tail = self._tail[excess:]

    def text(self) -> str:
        gap = f"\n[… {self._dropped} characters left out …]\n" if self._dropped else ""
        return self._head + gap + self._tail


def _only(args: dict[str, Any], *allowed: str) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ToolError(f"unexpected argument {unknown[0]!r}; expected: {', '.join(allowed) or 'none'}")


def _number(args: dict[str, Any], key: str) -> float:
    value = args.get(key)
    if isinstance(value, str):  # "512" from a model that quotes everything
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ToolError(f"{key!r} must be a number")
    return float(value)


def _string(args: dict[str, Any], key: str, *, allow_empty: bool) -> str:
    value = args.get(key)
    if not isinstance(value, str) or (not allow_empty and not value):
        raise ToolError(f"{key!r} must be a {'' if allow_empty else 'non-empty '}string")
    return value


def _int(args: dict[str, Any], key: str, low: int, high: int, default: int | None) -> int:
    value = args.get(key, default)
    # Models often send 12.0 for 12; accept whole floats, refuse bools.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ToolError(f"{key!r} must be an integer from {low} to {high}")
    return value


def _choice(args: dict[str, Any], key: str, options: tuple[str, ...], default: str | None) -> str:
    value = args.get(key, default)
    if value not in options:
        raise ToolError(f"{key!r} must be one of {', '.join(options)}")
    return str(value)


def _keys(args: dict[str, Any]) -> list[str]:
    keys = args.get("keys")
    if isinstance(keys, str):  # a lone key name is a common slip
        keys = [keys]
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k.strip() for k in keys):
        raise ToolError("'keys' must be a non-empty list of key names")
    return [k.strip() for k in keys]
