"""OpenAI chat messages (+ offered tools) -> ChatML prompt ids, every piece of content encoded as plain text.

The layout equals `chat_format.make_context` (system turn, then turns joined by "\\n", then an open assistant
turn), so a plain conversation gets exactly the ids the model card's `chat()` builds, without its silent history
truncation: an overlong prompt is refused by the caller instead. Tool turns are rendered in Qwen's ReAct format
(react.py). Special-token text in any message, tool call or tool result stays text: no role can inject a turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..tokenizer.chat_format import DEFAULT_SYSTEM
from ..tokenizer.tokenization import QWenTokenizer
from . import react
from .errors import bad_request
from .protocol import ChatMessage


@dataclass
class _Call:
    id: str | None
    text: str  # "\nAction: ...\nAction Input: ..."
    result: str | None = None


@dataclass
class _Turn:
    role: str  # "user" | "assistant"
    pieces: list[str | _Call] = field(default_factory=list)

    def render(self) -> str:
        out = []
        for piece in self.pieces:
            if isinstance(piece, str):
                out.append(piece)
            else:
                out.append(piece.text)
                if piece.result is not None:
                    out.append(react.observation_text(piece.result))
        return "".join(out)


@dataclass
class Conversation:
    """A conversation reduced to ChatML: the system prompt, user/assistant turns, and whether the last
    assistant turn is left open for the model to continue (after a tool result, or an assistant prefix)."""

    system: str
    turns: list[_Turn]
    open_assistant: bool


def build_conversation(
    messages: Sequence[ChatMessage], tools: Sequence[react.ToolSpec] | None
) -> Conversation:
    """Validate the message sequence and render it; `tools` (None: no tool use) adds the ReAct instruction."""
    system_parts: list[str] = []
    turns: list[_Turn] = []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            if turns:
                raise bad_request(
                    f"messages[{i}] has role '{m.role}' after the conversation started; put system messages "
                    "first.",
                    param=f"messages[{i}].role",
                )
            system_parts.append(m.text())
        elif m.role == "user":
            turns.append(_Turn("user", [m.text()]))
        elif m.role == "assistant":
            _add_assistant(turns, m, i, tools is not None)
        else:
            _add_result(turns, m, i)
    if not turns or all(t.role != "user" for t in turns):
        raise bad_request("messages needs at least one message with role 'user'.", param="messages")
    if tools:
        last_user = next(t for t in reversed(turns) if t.role == "user")
        last_user.pieces = [react.question_text(tools, last_user.render())]
    last = messages[-1]
    if last.role == "assistant" and (last.tool_calls or last.function_call):
        raise bad_request(
            "The last message calls tools; append a message with role 'tool' holding each call's result.",
            param=f"messages[{len(messages) - 1}]",
        )
    open_assistant = last.role != "user"
    if last.role in ("tool", "function"):
        turns[-1].pieces.append(react.NEXT_THOUGHT)
    system = "\n\n".join(system_parts) if system_parts else DEFAULT_SYSTEM
    return Conversation(system, turns, open_assistant)


def _add_assistant(turns: list[_Turn], m: ChatMessage, index: int, tools_on: bool) -> None:
    if not turns:
        raise bad_request(
            f"messages[{index}] is an assistant message before any user message; start with a user message.",
            param=f"messages[{index}].role",
        )
    calls = [(c.id, c.function) for c in m.tool_calls or []]
    if m.function_call is not None:
        calls.append((None, m.function_call))
    pieces: list[str | _Call] = []
    if calls:
        pieces.append(react.thought_text(m.text()))
        for call_id, function in calls:
            pieces.append(_Call(call_id, react.call_text(function.name, function.arguments)))
    elif m.content is None:
        raise bad_request(
            f"messages[{index}] (assistant) needs 'content' or 'tool_calls'.",
            param=f"messages[{index}].content",
        )
    else:
        pieces.append(react.final_answer_text(m.text()) if tools_on else m.text())
    if turns[-1].role == "assistant":  # continuing a tool loop: one assistant turn in ChatML
        turns[-1].pieces += ["\n", *pieces]
    else:
        turns.append(_Turn("assistant", pieces))


def _add_result(turns: list[_Turn], m: ChatMessage, index: int) -> None:
    pending = [p for p in (turns[-1].pieces if turns else []) if isinstance(p, _Call) and p.result is None]
    if not pending or turns[-1].role != "assistant":
        raise bad_request(
            f"messages[{index}] (role '{m.role}') must follow an assistant message with tool_calls whose "
            "results are not all given yet.",
            param=f"messages[{index}].role",
        )
    target = pending[0]
    if m.role == "tool" and m.tool_call_id is not None:
        matching = [p for p in pending if p.id == m.tool_call_id]
        if not matching:
            raise bad_request(
                f"messages[{index}].tool_call_id matches no pending tool call of the previous assistant message.",
                param=f"messages[{index}].tool_call_id",
            )
        target = matching[0]
    target.result = m.text()


def encode_conversation(tokenizer: QWenTokenizer, conv: Conversation) -> list[int]:
    """ChatML ids: `<|im_start|>role\\ncontent<|im_end|>` turns joined by "\\n", then the assistant's turn."""

    def plain(text: str) -> list[int]:
        return tokenizer.encode(text, allowed_special=set())  # special-token text stays text

    nl = plain("\n")
    start, end = [tokenizer.im_start_id], [tokenizer.im_end_id]

    def head(role: str) -> list[int]:
        return start + plain(role) + nl

    ids = head("system") + plain(conv.system) + end
    closed = conv.turns[:-1] if conv.open_assistant else conv.turns
    for turn in closed:
        ids += nl + head(turn.role) + plain(turn.render()) + end
    ids += nl + head("assistant")
    if conv.open_assistant:
        ids += plain(conv.turns[-1].render())
    return ids


def chat_prompt_ids(
    tokenizer: QWenTokenizer, messages: Sequence[ChatMessage], tools: Sequence[react.ToolSpec] | None
) -> list[int]:
    """Prompt ids for a chat request (validation errors are 400s naming the message)."""
    return encode_conversation(tokenizer, build_conversation(messages, tools))
