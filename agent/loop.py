"""The agent loop: ask the model, run the tools it calls, show it the screen, repeat.

Each step is one model round trip. The model sees the task, the tool results
and a screenshot after every step that may have changed the screen. Only the
latest screenshots are kept in the history (they are by far its largest
part), and the oldest steps are dropped past a bound, so a long run costs the
same per step as a short one.
"""

from __future__ import annotations

import base64
from typing import Any

import aiohttp

from actors.jobs import png_size
from agent.model import ModelConfig, complete
from agent.tools import TOOLS, AgentLog, Outcome, ToolError, parse_call, run_tool
from protocol.errors import ModelFailed
from sandboxes.base import OutputSink, Sandbox

#: Screenshots kept in the history; older ones are replaced by a note.
KEEP_SCREENSHOTS = 2
#: Messages kept after the task itself; older steps are dropped whole.
KEEP_MESSAGES = 40

SYSTEM_PROMPT = """\
You operate a Linux desktop to do a task for a user. You see the screen as \
screenshots and act only through the tools: click, type, key, scroll, \
screenshot, command (a shell command in the same machine, not shown on the \
screen) and finish. Coordinates are pixels of the latest screenshot, with \
(0, 0) at its top left. Act one small step at a time and check the next \
screenshot before going on. When the task is done, or cannot be done, call \
finish with a short, complete answer for the user."""

NUDGE = "Continue with a tool call. When the task is done, call finish with the answer."


async def run_agent(
    query: str,
    desktop: Sandbox,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    log: AgentLog,
    on_output: OutputSink,
) -> str:
    """Drive *desktop* with the model until it finishes *query*; its answer."""
    transcript = Transcript(query)
    transcript.add_screenshot(await desktop.screenshot(), "The screen at the start.")
    for step in range(1, model.max_steps + 1):
        log.info("agent.step", step=step, messages=len(transcript.messages))
        reply = await complete(http, model, transcript.messages, TOOLS)
        calls = reply.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ModelFailed("model endpoint answered 'tool_calls' that is not a list")
        transcript.add_assistant(reply.get("content"), calls)
        if not calls:
            transcript.add_user(NUDGE)
            continue
        screen_changed = False
        for number, call in enumerate(calls):
            call_id, outcome = await _one_call(call, f"call_{step}_{number}", desktop, on_output, log, step)
            if outcome.answer is not None:
                log.info("agent.finished", steps=step, answer_chars=len(outcome.answer))
                return outcome.answer
            transcript.add_tool_result(call_id, outcome.content)
            screen_changed |= outcome.screen_changed
        if screen_changed:
            transcript.add_screenshot(await desktop.screenshot(), f"The screen after step {step}.")
    log.warning("agent.gave_up", steps=model.max_steps)
    raise ModelFailed(f"the agent did not finish the task within {model.max_steps} steps")


async def _one_call(
    call: object, fallback_id: str, desktop: Sandbox, on_output: OutputSink, log: AgentLog, step: int
) -> tuple[str, Outcome]:
    """Run one tool call; a wrong call gives an error result the model can read."""
    fields = call if isinstance(call, dict) else {}
    call_id = fields.get("id")
    call_id = call_id if isinstance(call_id, str) and call_id else fallback_id
    name = None
    try:
        name, args = parse_call(fields)
        log.info("agent.tool", step=step, tool=name, args=_summary(args))
        return call_id, await run_tool(name, args, desktop, on_output)
    except ToolError as exc:
        log.warning("agent.tool_error", step=step, tool=name, error=str(exc))
        return call_id, Outcome(content=f"error: {exc}")


def _summary(args: dict[str, Any]) -> dict[str, Any]:
    """Arguments as logged: long strings cut short (typed text can be long)."""
    return {k: (v[:80] + "…" if isinstance(v, str) and len(v) > 80 else v) for k, v in args.items()}


class Transcript:
    """The chat history sent to the model, kept within bounds."""

    def __init__(self, query: str) -> None:
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Task: {query}"},
        ]

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_assistant(self, content: object, calls: list[Any]) -> None:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if isinstance(content, str) else "",
        }
        if calls:  # endpoints refuse an empty tool_calls list
            message["tool_calls"] = calls
        self.messages.append(message)

    def add_tool_result(self, call_id: str, content: str) -> None:
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": content})

    def add_screenshot(self, png: bytes, caption: str) -> None:
        width, height = png_size(png)
        size = f" It is {width}x{height} pixels." if width else ""
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        content = [{"type": "text", "text": caption + size}, {"type": "image_url", "image_url": {"url": url}}]
        self.messages.append({"role": "user", "content": content})
        self._prune()

    def _prune(self) -> None:
        images = [m for m in self.messages if _has_image(m)]
        for message in images[:-KEEP_SCREENSHOTS]:
            caption = message["content"][0]["text"]
            message["content"] = caption + " (screenshot no longer shown)"
        head, body = self.messages[:2], self.messages[2:]
        if len(body) > KEEP_MESSAGES:
            body = body[-KEEP_MESSAGES:]
            # Start at an assistant message: a tool result must follow its call.
            while body and body[0]["role"] != "assistant":
                body.pop(0)
            self.messages = head + body


def _has_image(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(part.get("type") == "image_url" for part in content)
