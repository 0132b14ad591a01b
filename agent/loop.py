"""The agent loop: ask the model, run the tools it calls, show it the screen, repeat.

Each step is one model round trip. The model sees the task, the tool results
and a screenshot after every step that may have changed the screen. Only the
latest screenshots are kept in the history (they are by far its largest
part, and servers such as vLLM take one image per request by default), and
the oldest steps are dropped past a bound, so a long run costs the same per
step as a short one.

A run ends when the model calls ``finish``, answers with text and no tool
call (its text is the answer), refuses (the run fails with its refusal), or
runs out of steps or time. Each step reaches the session's log as one
``agent.step`` event: the model's words, the action, its outcome and a
thumbnail of the screen it acted on.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import attrs

from agent.calls import Call, CallIds, Turn, read_turn
from agent.model import ModelConfig, complete
from agent.screen import Frame, frame
from agent.tools import AgentLog, Outcome, ToolError, pixels_as_is, run_tool, tools_for
from protocol.errors import CommandTimeout, ModelFailed
from sandboxes.base import OutputSink, Sandbox

#: Messages kept after the task itself; older steps are dropped whole.
KEEP_MESSAGES = 40
#: Characters of the model's text and of each outcome in a step's log event.
TEXT_IN_LOG = 300

SYSTEM_PROMPT = """\
You operate a Linux desktop to do a task for a user. You see the screen as \
screenshots and act only through the tools: click, type, key, scroll, \
screenshot, command (a shell command in the same machine, not shown on the \
screen) and finish. Coordinates are those of the latest screenshot, with \
(0, 0) at its top left. Say in a sentence what you see and plan, then act one \
small step at a time and check the next screenshot before going on. When the \
task is done, or cannot be done, call finish with a short, complete answer \
for the user."""

NUDGE = "Continue with a tool call. When the task is done, call finish with the answer."
CUT_OFF = "Your reply was cut off at the length limit. Answer shorter, with one tool call."


@attrs.frozen(kw_only=True)
class AgentResult:
    """What a finished run gives the user."""

    answer: str
    #: Model round trips the run took.
    steps: int


async def run_agent(
    query: str,
    desktop: Sandbox,
    model: ModelConfig,
    http: aiohttp.ClientSession,
    log: AgentLog,
    on_output: OutputSink,
) -> AgentResult:
    """Drive *desktop* with the model until it finishes *query*, within the task's time."""
    agent = _Agent(query, desktop, model, http, log, on_output)
    try:
        async with asyncio.timeout(model.task_timeout) as scope:
            return await agent.run()
    except TimeoutError as exc:
        if not scope.expired():
            raise
        log.warning("agent.gave_up", steps=agent.steps, reason="timeout")
        raise CommandTimeout(f"the agent did not finish the task within {model.task_timeout:g} s") from exc


class _Agent:
    """One run: the transcript, the latest screen, and the step count."""

    def __init__(
        self,
        query: str,
        desktop: Sandbox,
        model: ModelConfig,
        http: aiohttp.ClientSession,
        log: AgentLog,
        on_output: OutputSink,
    ) -> None:
        self.desktop, self.model, self.http, self.log, self.on_output = desktop, model, http, log, on_output
        self.transcript = Transcript(query, model.keep_images)
        self.tools = tools_for(model.coordinate_grid)
        self.ids = CallIds()
        self.screen: Frame | None = None
        self.steps = 0

    async def run(self) -> AgentResult:
        await self._look("The screen at the start.")
        for step in range(1, self.model.max_steps + 1):
            self.steps = step
            choice = await complete(self.http, self.model, self.transcript.messages, self.tools, self.log)
            answer = await self._step(step, read_turn(choice, self.ids))
            if answer is not None:
                self.log.info("agent.finished", steps=step, answer_chars=len(answer))
                return AgentResult(answer=answer, steps=step)
        self.log.warning("agent.gave_up", steps=self.model.max_steps, reason="steps")
        raise ModelFailed(f"the agent did not finish the task within {self.model.max_steps} steps")

    async def _step(self, step: int, turn: Turn) -> str | None:
        """Act on one turn; the answer if it ends the run."""
        acted_on = self.screen
        if turn.refusal is not None:
            self._report(step, turn.refusal, "refuse", "the task ended", acted_on)
            raise ModelFailed(f"the model declined the task: {_cut(turn.refusal, 1000)}")
        self.transcript.add_assistant(turn.content, [call.entry() for call in turn.calls])
        if not turn.calls:
            return self._without_calls(step, turn, acted_on)
        actions, outcomes, changed = [], [], False
        for call in turn.calls:
            outcome = await self._one(call)
            actions.append(_action(call))
            outcomes.append(_cut(outcome.content.splitlines()[0] if outcome.content else "", TEXT_IN_LOG))
            if outcome.answer is not None:
                self._report(step, turn.text, "; ".join(actions), "finished", acted_on)
                return outcome.answer
            self.transcript.add_tool_result(call.id, outcome.content)
            changed |= outcome.screen_changed
        self._report(step, turn.text, "; ".join(actions), "; ".join(outcomes), acted_on)
        if changed:
            await self._look(f"The screen after step {step}.")
        return None

    def _without_calls(self, step: int, turn: Turn, acted_on: Frame | None) -> str | None:
        if turn.finish_reason == "content_filter":
            self._report(step, turn.text, "none", "reply withheld by the endpoint's filter", acted_on)
            raise ModelFailed("the model endpoint withheld its reply (finish_reason content_filter)")
        if turn.finish_reason != "length" and turn.content.strip():
            # A model that stops with text and no call is done: its text is the answer.
            self._report(step, turn.text, "answer", "finished", acted_on)
            return turn.content.strip()
        self.transcript.add_user(CUT_OFF if turn.finish_reason == "length" else NUDGE)
        self._report(step, turn.text, "none", f"no tool call ({turn.finish_reason or 'no reason'})", acted_on)
        return None

    async def _one(self, call: Call) -> Outcome:
        """Run one call; a wrong call gives an error result the model can read."""
        if call.args is None or call.error is not None:
            return Outcome(content=f"error: {call.error}")
        to_screen = self.screen.to_screen if self.screen is not None else pixels_as_is
        try:
            return await run_tool(call.name, call.args, self.desktop, self.on_output, to_screen)
        except ToolError as exc:
            return Outcome(content=f"error: {exc}")

    async def _look(self, caption: str) -> None:
        self.screen = await frame(await self.desktop.screenshot(), self.model)
        self.transcript.add_screenshot(self.screen, caption)

    def _report(self, step: int, text: str, action: str, outcome: str, acted_on: Frame | None) -> None:
        fields: dict[str, Any] = {"text": _cut(text, TEXT_IN_LOG), "action": action, "outcome": outcome}
        if acted_on is not None and acted_on.thumbnail is not None:
            fields["thumbnail"] = acted_on.thumbnail
        self.log.info("agent.step", step=step, **fields)


def _action(call: Call) -> str:
    """A call as one short readable phrase, e.g. ``click(x=10, y=20)``."""
    args = call.args or {}
    shown = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items())
    return _cut(f"{call.name}({shown})", 120)


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


class Transcript:
    """The chat history sent to the model, kept within bounds."""

    def __init__(self, query: str, keep_images: int = 1) -> None:
        self.keep_images = keep_images
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Task: {query}"},
        ]

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_assistant(self, content: str, calls: list[dict[str, Any]]) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:  # endpoints refuse an empty tool_calls list
            message["tool_calls"] = calls
        self.messages.append(message)

    def add_tool_result(self, call_id: str, content: str) -> None:
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": content})

    def add_screenshot(self, screen: Frame, caption: str) -> None:
        text = f"{caption} {screen.describe()}".strip()
        image = {"type": "image_url", "image_url": {"url": screen.url}}
        self.messages.append({"role": "user", "content": [{"type": "text", "text": text}, image]})
        self._prune()

    def _prune(self) -> None:
        images = [m for m in self.messages if _has_image(m)]
        for message in images[: -self.keep_images]:
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
