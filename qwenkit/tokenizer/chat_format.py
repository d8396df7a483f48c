"""ChatML prompts for Qwen chat models: the official `make_context`, a messages API, and stop ids.

Every piece of chat content (system prompt, queries, responses) is tokenized as plain text, so special-token
text typed by a user stays text: a prompt holds exactly one `<|im_start|>` per real turn. Sampling and the
model are left to `generation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from .tokenization import IMEND, IMSTART, QWenTokenizer

ChatFormat = Literal["chatml", "raw"]
History = Sequence[tuple[str, str | None]]

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_WINDOW_SIZE = 6144


def _plain(tokenizer: QWenTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, allowed_special=set())


def make_context(
    tokenizer: QWenTokenizer,
    query: str,
    history: History | None = None,
    system: str = "",
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    chat_format: ChatFormat = "chatml",
) -> tuple[str, list[int]]:
    """Build `(raw_text, context_tokens)` exactly as the official `qwen_generation_utils.make_context`.

    History is walked newest first; a turn is kept while system + turn + kept turns stay under
    `max_window_size` tokens, stopping at the first turn that does not fit. The query is never truncated.
    Difference from the official code: `chat_format="raw"` also encodes the query as plain text.
    """
    _check_text("query", query)
    _check_text("system", system)
    if chat_format == "raw":
        return query, _plain(tokenizer, query)
    if chat_format != "chatml":
        raise ValueError(f"Unknown chat_format {chat_format!r}: use 'chatml' or 'raw'.")

    nl = _plain(tokenizer, "\n")
    start, end = [tokenizer.im_start_id], [tokenizer.im_end_id]

    def turn(role: str, content: str) -> tuple[str, list[int]]:
        # Role and content are separate pieces, joined by the ids of "\n" (not one encode of "role\ncontent").
        return f"{role}\n{content}", start + _plain(tokenizer, role) + nl + _plain(tokenizer, content) + end

    system_text, system_tokens = turn("system", system)
    raw_text, context_tokens = "", []
    for i, item in enumerate(reversed(list(history or []))):
        turn_query, turn_response = _history_item(item, len(history or []) - 1 - i)
        query_text, query_tokens = turn("user", turn_query)
        if turn_response is not None:
            response_text, response_tokens = turn("assistant", turn_response)
            next_tokens = nl + query_tokens + nl + response_tokens
            prev_chat = f"\n{IMSTART}{query_text}{IMEND}\n{IMSTART}{response_text}{IMEND}"
        else:
            next_tokens = nl + query_tokens + nl
            prev_chat = f"\n{IMSTART}{query_text}{IMEND}\n"
        if len(system_tokens) + len(next_tokens) + len(context_tokens) >= max_window_size:
            break
        context_tokens = next_tokens + context_tokens
        raw_text = prev_chat + raw_text

    context_tokens = system_tokens + context_tokens + nl + turn("user", query)[1] + nl + start
    context_tokens += _plain(tokenizer, "assistant") + nl
    raw_text = f"{IMSTART}{system_text}{IMEND}{raw_text}\n{IMSTART}user\n{query}{IMEND}\n{IMSTART}assistant\n"
    return raw_text, context_tokens


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")


def _history_item(item: object, index: int) -> tuple[str, str | None]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"history[{index}] must be a (query, response) pair, got {item!r}")
    query, response = item
    _check_text(f"history[{index}][0]", query)
    if response is not None:
        _check_text(f"history[{index}][1]", response)
    return query, response


def messages_to_history(
    messages: Sequence[Mapping[str, str]], default_system: str = DEFAULT_SYSTEM
) -> tuple[str, list[tuple[str, str]], str]:
    """Split OpenAI-style messages into `(system, history, query)` for `make_context`.

    An optional leading system message, then user/assistant turns alternating, ending with a user message.
    """
    if not messages:
        raise ValueError("messages is empty: send at least one message with role 'user'.")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'.")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role is {m['role']!r}; use 'system', 'user' or 'assistant'.")
        _check_text(f"messages[{i}].content", m["content"])
    system, rest = default_system, list(messages)
    if rest[0]["role"] == "system":
        system, rest = rest[0]["content"], rest[1:]
    if not rest or rest[-1]["role"] != "user":
        raise ValueError("The conversation must end with a message with role 'user'.")
    for i, m in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            index = i + len(messages) - len(rest)
            raise ValueError(
                f"messages[{index}].role is {m['role']!r} but {expected!r} was expected: after an optional "
                "first system message, user and assistant messages must alternate."
            )
    history = [(rest[i]["content"], rest[i + 1]["content"]) for i in range(0, len(rest) - 1, 2)]
    return system, history, rest[-1]["content"]


def messages_to_ids(
    tokenizer: QWenTokenizer,
    messages: Sequence[Mapping[str, str]],
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    default_system: str = DEFAULT_SYSTEM,
) -> list[int]:
    """Prompt ids for OpenAI-style messages; equal to `make_context` for the equivalent history."""
    system, history, query = messages_to_history(messages, default_system)
    return make_context(tokenizer, query, history, system, max_window_size)[1]


def stop_words_ids(tokenizer: QWenTokenizer, chat_format: ChatFormat = "chatml") -> list[list[int]]:
    """Token sequences that end a reply: `<|im_end|>`/`<|im_start|>` (chatml) or "Human:"/eod (raw)."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    raise ValueError(f"Unknown chat_format {chat_format!r}: use 'chatml' or 'raw'.")
