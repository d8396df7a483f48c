"""Tool calling through Qwen's ReAct prompting: the text the chat models were trained on, both ways.

Prompt side: `instruction(tools)` describes the tools and the Thought / Action / Action Input / Observation /
Final Answer format; `call_text` and `final_answer_text` render earlier assistant turns the same way. Output side:
`ReactParser` reads the model's text as it streams and yields only the final answer as content; at the end it
returns a tool call when the model wrote an Action of an offered tool and stopped at "Observation:". Building the
ChatML prompt around these pieces is chat_prompt.py's job.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

OBSERVATION = "Observation:"  # stop string: the tool's result is the caller's to supply
_ACTION = "Action:"
_ACTION_INPUT = "Action Input:"
_FINAL_ANSWER = "Final Answer:"
_THOUGHT = "Thought:"
NEXT_THOUGHT = "\nThought:"  # ends a prompt that continues after a tool result

_TOOL_DESC = (
    "{name}: Call this tool to interact with the {name} API. What is the {name} API useful for? "
    "{description} Parameters: {parameters} Format the arguments as a JSON object."
)
_INSTRUCTION = """Answer the following questions as best you can. You have access to the following tools:

{descriptions}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""


@dataclass(frozen=True)
class ToolSpec:
    """One offered function: its name, description and JSON-schema parameters."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class ParsedCall:
    """A tool call read from the model's text: `arguments` is the Action Input text (a JSON object, normally)."""

    id: str
    name: str
    arguments: str


def instruction(tools: Sequence[ToolSpec]) -> str:
    """The ReAct instruction that precedes the last user question ("...\\n\\nQuestion: <text>")."""
    descriptions = "\n\n".join(
        _TOOL_DESC.format(
            name=t.name,
            description=t.description.strip(),
            parameters=json.dumps(t.parameters or {"type": "object", "properties": {}}, ensure_ascii=False),
        )
        for t in tools
    )
    return _INSTRUCTION.format(descriptions=descriptions, names=", ".join(t.name for t in tools))


def question_text(tools: Sequence[ToolSpec], user_text: str) -> str:
    """The last user turn's content when tools are offered."""
    return f"{instruction(tools)}\n\nQuestion: {user_text.strip()}"


def thought_text(content: str) -> str:
    """An assistant turn that calls tools starts with its thought (the message content)."""
    content = content.strip()
    return content if content.startswith(_THOUGHT) else f"{_THOUGHT} {content}"


def call_text(name: str, arguments: str) -> str:
    """One Action step of an earlier assistant turn (its Observation follows when the result is known)."""
    return f"\n{_ACTION} {name}\n{_ACTION_INPUT} {arguments.strip()}"


def observation_text(result: str) -> str:
    return f"\n{OBSERVATION} {result.strip()}"


def final_answer_text(content: str) -> str:
    """An earlier plain assistant answer, in the form the model writes answers when tools are offered."""
    return f"{_THOUGHT} I now know the final answer.\n{_FINAL_ANSWER} {content.strip()}"


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _line_start(text: str, marker: str, start: int = 0) -> int:
    """Index of the first `marker` at the start of a line, at or after `start`; -1 if none."""
    i = text.find(marker, start)
    while i > 0 and text[i - 1] != "\n":
        i = text.find(marker, i + 1)
    return i


class PlainParser:
    """No tools: every delta is content."""

    def push(self, text: str) -> str:
        return text

    def finish(self, finish_reason: str) -> tuple[str, ParsedCall | None]:
        return "", None


class ReactParser:
    """Read ReAct output incrementally; the same object serves streamed and whole responses, so they agree.

    Until a line starts with "Final Answer:", text is held. From then on, what follows it is content (leading
    whitespace dropped) and is released as it comes. If no final answer appears, `finish` decides: an
    "Action: <name>" line followed by an "Action Input:" line, `name` among the offered tools, and generation that
    stopped (at "Observation:" or the end of the turn, not at the length limit) make a tool call whose content is
    the thought before it; anything else is returned whole as content.
    """

    def __init__(self, tool_names: Sequence[str]) -> None:
        self._names = set(tool_names)
        self._held = ""
        self._scan = 0
        self._answering = False
        self._started = False

    def push(self, text: str) -> str:
        if self._answering:
            return self._release(text)
        self._held += text
        i = _line_start(self._held, _FINAL_ANSWER, self._scan)
        if i < 0:
            # A marker can only still begin in the last len(marker) - 1 characters.
            self._scan = max(0, len(self._held) - len(_FINAL_ANSWER) + 1)
            return ""
        self._answering = True
        return self._release(self._held[i + len(_FINAL_ANSWER) :])

    def _release(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text

    def finish(self, finish_reason: str) -> tuple[str, ParsedCall | None]:
        """Content still to release, and the tool call if the text is one."""
        if self._answering:
            return "", None
        call, thought = self._parse_call() if finish_reason == "stop" else (None, "")
        if call is None:
            return self._held, None
        return thought, call

    def _parse_call(self) -> tuple[ParsedCall | None, str]:
        text = self._held
        i = _line_start(text, _ACTION)
        if i < 0:
            return None, ""
        name_end = text.find("\n", i)
        j = _line_start(text, _ACTION_INPUT, max(name_end, i))
        if name_end < 0 or j < 0:
            return None, ""
        name = text[i + len(_ACTION) : name_end].strip()
        if name not in self._names:  # never a call of a tool that was not offered
            return None, ""
        arguments = text[j + len(_ACTION_INPUT) :].strip() or "{}"
        thought = text[:i].strip()
        if thought.startswith(_THOUGHT):
            thought = thought[len(_THOUGHT) :].strip()
        return ParsedCall(new_call_id(), name, arguments), thought
