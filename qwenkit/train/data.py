"""Finetuning data: the official `finetune.py` format and its `preprocess` (same ids, labels and padding).

Reads `[{"id", "conversations": [{"from": "user"|"assistant", "value"}]}]` (JSON) or OpenAI-style `{"messages":
[...]}` records (JSONL or a JSON list), validates every record (the error names its index), and turns
conversations into `input_ids` / `labels` / `attention_mask` `[N, max_len]`. Batching and the model are left to
`train.loop`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..tokenizer.tokenization import QWenTokenizer

IGNORE_TOKEN_ID = -100  # transformers' LabelSmoother.ignore_index, what the official code masks with
DEFAULT_SYSTEM = "You are a helpful assistant."
ROLES = ("user", "assistant")
_OPENAI_ROLES = {"user": "user", "assistant": "assistant"}

Conversation = list[dict[str, str]]


def _plain(tokenizer: QWenTokenizer, text: str) -> list[int]:
    # Special-token text inside a value stays plain text (the one deliberate difference from the official code).
    return tokenizer.encode(text, allowed_special=set(), disallowed_special=())


def preprocess(
    sources: Sequence[Conversation],
    tokenizer: QWenTokenizer,
    max_len: int,
    system_message: str = DEFAULT_SYSTEM,
) -> dict[str, torch.Tensor]:
    """Conversations -> `input_ids`, `labels` (int32) and `attention_mask` (bool) `[N, max_len]`, as the
    official `preprocess`.

    Each turn is `<|im_start|>role\\nvalue<|im_end|>\\n` after a fixed system turn; `<|im_start|>`, `<|im_end|>` and
    the newline after each turn are labels, and so is assistant content; role names, the newline after them and
    system/user content are `IGNORE_TOKEN_ID`. A leading non-user turn is dropped. Rows are right-padded with the
    eod id (labels ignored) and truncated to `max_len`; truncated rows are counted in one warning.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    nl = _plain(tokenizer, "\n")
    im_start, im_end, pad = tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id
    role_ids = {role: [im_start, *_plain(tokenizer, role)] for role in ("system", *ROLES)}
    system = role_ids["system"] + nl + _plain(tokenizer, system_message) + [im_end] + nl
    system_target = [im_start] + [IGNORE_TOKEN_ID] * (len(system) - 3) + [im_end] + nl
    rows_ids, rows_labels, truncated = [], [], 0
    for index, source in enumerate(sources):
        turns = check_conversation(source, index)
        if turns[0]["from"] != "user":
            turns = turns[1:]
        ids, labels = list(system), list(system_target)
        for turn in turns:
            role = role_ids[turn["from"]]
            value = _plain(tokenizer, turn["value"])
            turn_ids = role + nl + value + [im_end] + nl
            ids += turn_ids
            if turn["from"] == "user":  # all but im_start, im_end and the final newline masked
                labels += [im_start] + [IGNORE_TOKEN_ID] * (len(turn_ids) - 3) + [im_end] + nl
            else:  # role name and its newline masked, the answer learned
                labels += [im_start] + [IGNORE_TOKEN_ID] * len(role) + turn_ids[len(role) + 1 : -2] + [im_end] + nl
        truncated += len(ids) > max_len
        rows_ids.append((ids + [pad] * (max_len - len(ids)))[:max_len])
        rows_labels.append((labels + [IGNORE_TOKEN_ID] * (max_len - len(labels)))[:max_len])
    if truncated:
        warnings.warn(
            f"{truncated} of {len(rows_ids)} conversations are longer than max_len={max_len} tokens and were "
            "truncated (as the official finetune.py does); raise --max-len to keep them whole",
            stacklevel=2,
        )
    input_ids = torch.tensor(rows_ids, dtype=torch.int32).reshape(-1, max_len)
    return {
        "input_ids": input_ids,
        "labels": torch.tensor(rows_labels, dtype=torch.int32).reshape(-1, max_len),
        "attention_mask": input_ids.ne(pad),
    }


def check_conversation(source: Any, index: int) -> Conversation:
    """The turns of record `index`, or ValueError naming the record and what is wrong with it."""
    where = f"record {index}"
    if not isinstance(source, list) or not source:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of turns, got {_show(source)}")
    for j, turn in enumerate(source):
        if not isinstance(turn, dict) or set(turn) < {"from", "value"}:
            raise ValueError(f"{where}, turn {j}: expected {{'from': ..., 'value': ...}}, got {_show(turn)}")
        if turn["from"] not in ROLES:
            raise ValueError(
                f"{where}, turn {j}: 'from' must be 'user' or 'assistant', got {turn['from']!r} (the official "
                "format has a fixed system prompt; pass --system to change it)"
            )
        if not isinstance(turn["value"], str):
            raise ValueError(f"{where}, turn {j}: 'value' must be a string, got {_show(turn['value'])}")
    return source


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_conversations(path: str | os.PathLike[str]) -> list[Conversation]:
    """The conversations of a data file: the official JSON list, or OpenAI-style `messages` records (JSON list
    or JSONL). Every record is checked; an error names the file, the record index and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path}; pass the JSON (official format) or JSONL file to train on")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = _jsonl(text, path)
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty list of records (or JSONL, one record per line)")
    try:
        return [_record_conversation(record, i) for i, record in enumerate(records)]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _jsonl(text: str, path: Path) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON or JSONL ({e.msg})") from None
    return records


def _record_conversation(record: Any, index: int) -> Conversation:
    if isinstance(record, dict) and "conversations" in record:
        return check_conversation(record["conversations"], index)
    if isinstance(record, dict) and "messages" in record:
        return check_conversation(_from_messages(record["messages"], index), index)
    raise ValueError(f"record {index}: expected a 'conversations' (official) or 'messages' (OpenAI) record")


def _from_messages(messages: Any, index: int) -> Conversation:
    if not isinstance(messages, list):
        raise ValueError(f"record {index}: 'messages' must be a list, got {_show(messages)}")
    turns = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise ValueError(f"record {index}, message {j}: expected {{'role': ..., 'content': str}}, got {_show(m)}")
        if m["role"] == "system":
            raise ValueError(
                f"record {index}, message {j}: per-record system messages are not part of the official format "
                "(its system prompt is fixed); drop it and pass --system TEXT for all records"
            )
        if m["role"] not in _OPENAI_ROLES:
            raise ValueError(f"record {index}, message {j}: role must be 'user' or 'assistant', got {m['role']!r}")
        turns.append({"from": _OPENAI_ROLES[m["role"]], "value": m["content"]})
    return turns
