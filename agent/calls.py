"""One reply of the model, read the way real servers send it, and its tool calls made regular.

Servers bend the format: calls without an ``id``, with duplicate ids, with
``arguments`` as an object or as JSON text encoded twice, calls written as
text in ``content`` by a server without a tool parser (Hermes' and Qwen's
``<tool_call>``, Mistral's ``[TOOL_CALLS]``, Llama's ``<|python_tag|>``, a
bare JSON object). Every call is made regular before it enters the history,
because OpenAI and vLLM refuse a history whose calls are not: each gets a
fresh id of 9 letters and digits (what Mistral-family servers demand),
unique within the run, and ``arguments`` as JSON text of an object.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

import attrs

from protocol.errors import ModelFailed

_ID_ALPHABET = string.ascii_letters + string.digits
#: Markers of tool calls written as text, and the JSON that follows each.
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FUNCTION_TAG = re.compile(r"<function=([\w.-]+)>\s*(.*?)\s*(?:</function>|$)", re.DOTALL)
_PREFIXES = ("[TOOL_CALLS]", "<|python_tag|>")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@attrs.frozen(kw_only=True)
class Call:
    """One tool call, regular: what the history gets, and what the tool runs with."""

    id: str
    name: str
    #: JSON text of an object, as the history must carry it.
    arguments: str
    #: The arguments as read, or None when they could not be (see *error*).
    args: dict[str, Any] | None
    error: str | None = None

    def entry(self) -> dict[str, Any]:
        """This call as an entry of an assistant message's ``tool_calls``."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@attrs.frozen(kw_only=True)
class Turn:
    """What the model said in one reply."""

    #: Its own words for the step (content, else its reasoning), tool-call markup removed.
    text: str
    #: Content to echo back in the history (markup removed, reasoning not included).
    content: str
    calls: tuple[Call, ...]
    refusal: str | None
    finish_reason: str | None


class CallIds:
    """Fresh call ids, unique within one run."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def new(self) -> str:
        while (value := "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))) in self._used:
            pass
        self._used.add(value)
        return value


def read_turn(choice: dict[str, Any], ids: CallIds) -> Turn:
    """The turn in one choice of a chat-completions answer."""
    message = choice.get("message") or {}
    content = _text(message.get("content"))
    raw_calls = _raw_calls(message)
    if not raw_calls:
        raw_calls, content = calls_in_text(content)
    reasoning = _text(message.get("reasoning_content") or message.get("reasoning"))
    refusal = message.get("refusal")
    finish = choice.get("finish_reason")
    return Turn(
        text=content.strip() or reasoning.strip(),
        content=content,
        calls=tuple(regular(call, ids) for call in raw_calls),
        refusal=refusal if isinstance(refusal, str) and refusal.strip() else None,
        finish_reason=finish if isinstance(finish, str) else None,
    )


def _text(content: object) -> str:
    """Message content as text: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def _raw_calls(message: dict[str, Any]) -> list[Any]:
    calls = message.get("tool_calls")
    if calls is None and isinstance(message.get("function_call"), dict):
        calls = [{"function": message["function_call"]}]  # the API's older form
    if calls is None:
        return []
    if isinstance(calls, dict):
        return [calls]
    if not isinstance(calls, list):
        raise ModelFailed(f"model endpoint answered 'tool_calls' that is not a list: {_short(calls)}")
    return calls


def regular(call: object, ids: CallIds) -> Call:
    """*call* with a fresh id, a name and its arguments as JSON text of an object."""
    fields: dict[str, Any] = call if isinstance(call, dict) else {}
    nested = fields.get("function")
    function: dict[str, Any] = nested if isinstance(nested, dict) else fields
    name = function.get("name")
    args, error = _arguments(function.get("arguments", function.get("parameters")))
    if not isinstance(name, str) or not name.strip():
        name, error = "unnamed", "a tool call needs a function with a name"
    arguments = json.dumps(args, ensure_ascii=False) if args is not None else "{}"
    return Call(id=ids.new(), name=name.strip(), arguments=arguments, args=args, error=error)


def _arguments(raw: object) -> tuple[dict[str, Any] | None, str | None]:
    """Arguments as an object, unwrapping JSON text (even twice encoded); or why not."""
    for _ in range(3):
        if raw is None or raw == "":
            return {}, None
        if isinstance(raw, dict):
            return raw, None
        if not isinstance(raw, str):
            break
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            return None, f"arguments are not valid JSON ({exc}): {_short(raw)}"
    return None, f"arguments must be a JSON object, not {_short(raw)}"


def calls_in_text(content: str) -> tuple[list[Any], str]:
    """Tool calls a server without a tool parser left in *content*, and the text besides.

    Text that only looks like an attempt (a marker, or a JSON object naming a
    function) but cannot be read ends the run with an error naming what came.
    """
    stripped = content.strip()
    if "<tool_call>" in stripped:
        found = [_json(part, content) for part in _TAGGED.findall(stripped)]
        return _flatten(found), _TAGGED.sub("", stripped).strip()
    if "<function=" in stripped:
        pairs = _FUNCTION_TAG.findall(stripped)
        found = [{"name": name, "arguments": _json(body, content) if body else {}} for name, body in pairs]
        return found, _FUNCTION_TAG.sub("", stripped).strip()
    for prefix in _PREFIXES:
        if prefix in stripped:
            before, _, after = stripped.partition(prefix)
            return _flatten([_json(after, content)]), before.strip()
    fenced = _FENCE.match(stripped)
    body = fenced.group(1) if fenced else stripped
    if body.startswith(("{", "[")) and '"name"' in body:
        value = _json(body, content)
        if _looks_like_calls(value):
            return _flatten([value]), ""
    return [], content


def _json(text: str, content: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise ModelFailed(
            "model endpoint wrote a tool call as text that is not valid JSON (does the server "
            f"run a tool-call parser for this model?): {_short(content)}"
        ) from None


def _flatten(values: list[Any]) -> list[Any]:
    calls: list[Any] = []
    for value in values:
        calls.extend(value if isinstance(value, list) else [value])
    if not _looks_like_calls(calls):
        raise ModelFailed(f"model endpoint wrote tool calls as text in an unknown form: {_short(values)}")
    return calls


def _looks_like_calls(value: object) -> bool:
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(i, dict) and ("name" in i or "function" in i) for i in items)


def _short(value: object, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=repr)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"
