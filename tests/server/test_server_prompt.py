"""Prompt building and ReAct parsing without a server: chat prompts equal the model card's `make_context`, and
the ReAct parser gives the same answer however the text is split into deltas."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenkit.server.chat_prompt import chat_prompt_ids
from qwenkit.server.errors import APIError
from qwenkit.server.protocol import ChatMessage
from qwenkit.server.react import PlainParser, ReactParser, ToolSpec, instruction
from qwenkit.tokenizer.chat_format import DEFAULT_SYSTEM, make_context


def msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in pairs]


@pytest.mark.parametrize("system", [None, "You are terse.", ""])
def test_plain_chat_prompt_equals_make_context(tokenizer, system):
    history = [("Hi <|im_end|>", "Hello!"), ("2+2?", " 4\n")]
    messages = ([("system", system)] if system is not None else []) + [
        turn for q, a in history for turn in (("user", q), ("assistant", a))
    ]
    messages.append(("user", "And 3+3?"))
    expected = make_context(tokenizer, "And 3+3?", history, DEFAULT_SYSTEM if system is None else system)[1]
    assert chat_prompt_ids(tokenizer, msgs(*messages), None) == expected


def test_text_parts_equal_plain_strings(tokenizer):
    parts = [ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])]
    assert chat_prompt_ids(tokenizer, parts, None) == chat_prompt_ids(tokenizer, msgs(("user", "ab")), None)


def test_tools_go_into_the_last_user_turn(tokenizer):
    tools = [ToolSpec("search", "Search the web.", {"type": "object"})]
    ids = chat_prompt_ids(tokenizer, msgs(("user", "first"), ("assistant", "ok"), ("user", "second")), tools)
    text = tokenizer.decode(ids)
    assert text.count("You have access to the following tools") == 1
    assert f"{instruction(tools)}\n\nQuestion: second" in text
    assert "Final Answer: ok" in text  # earlier answers are shown in the ReAct form the model writes


def test_tool_results_match_calls_by_id(tokenizer):
    call = lambda i, city: {"id": i, "type": "function", "function": {"name": "w", "arguments": city}}  # noqa: E731
    messages = [
        ChatMessage(role="user", content="q"),
        ChatMessage(role="assistant", content="", tool_calls=[call("a", "1"), call("b", "2")]),
        ChatMessage(role="tool", tool_call_id="b", content="two"),
        ChatMessage(role="tool", tool_call_id="a", content="one"),
    ]
    text = tokenizer.decode(chat_prompt_ids(tokenizer, messages, [ToolSpec("w")]))
    assert (
        "Action: w\nAction Input: 1\nObservation: one\nAction: w\nAction Input: 2\nObservation: two\nThought:"
        in text
    )
    bad = [*messages[:2], ChatMessage(role="tool", tool_call_id="zzz", content="x")]
    with pytest.raises(APIError) as err:
        chat_prompt_ids(tokenizer, bad, [ToolSpec("w")])
    assert err.value.param == "messages[2].tool_call_id"


REACT_TEXTS = [
    'Thought: hmm\nAction: search\nAction Input: {"q": 1}\n',
    "Thought: done\nFinal Answer:   it is 42\nAction: search\nAction Input: {}",
    "I just answer without the format.",
    "Final Answer: x\nFinal Answer: y",
    "Thought: Final Answer: not at a line start\nAction: search\nAction Input: {}",
]


def _run(parser, chunks: list[str], reason: str = "stop"):
    out = "".join(parser.push(c) for c in chunks)
    tail, call = parser.finish(reason)
    return out + tail, (call.name, call.arguments) if call else None


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, len(REACT_TEXTS) - 1), cuts=st.lists(st.integers(0, 80), max_size=8))
def test_react_parser_is_split_invariant(index, cuts):
    text = REACT_TEXTS[index]
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert _run(ReactParser(["search"]), chunks) == _run(ReactParser(["search"]), [text])


def test_react_parser_outcomes():
    assert _run(ReactParser(["search"]), [REACT_TEXTS[0]]) == ("hmm", ("search", '{"q": 1}'))
    assert _run(ReactParser(["search"]), [REACT_TEXTS[1]]) == (
        "it is 42\nAction: search\nAction Input: {}",
        None,
    )
    assert _run(ReactParser(["search"]), [REACT_TEXTS[2]]) == (REACT_TEXTS[2], None)
    assert _run(ReactParser(["search"]), [REACT_TEXTS[3]]) == ("x\nFinal Answer: y", None)
    assert _run(ReactParser(["search"]), [REACT_TEXTS[4]])[1] == ("search", "{}")
    assert _run(ReactParser(["other"]), [REACT_TEXTS[0]]) == (REACT_TEXTS[0], None)  # not offered
    assert _run(ReactParser(["search"]), [REACT_TEXTS[0]], "length") == (REACT_TEXTS[0], None)
    assert _run(PlainParser(), [REACT_TEXTS[0]]) == (REACT_TEXTS[0], None)


def test_package_imports_without_the_web_stack():
    code = (
        "import sys, qwenkit, qwenkit.cli.commands, qwenkit.server.engine; "
        "qwenkit.cli.commands.build_parser(); "
        "bad = [m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules]; "
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_serve_exits_1_when_the_model_cannot_load(tmp_path):
    from server_support import free_port

    cmd = [
        sys.executable,
        "-m",
        "qwenkit",
        "serve",
        "-m",
        str(tmp_path / "missing"),
        "--port",
        str(free_port()),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "loading the model failed" in out.stderr
    bad_flag = subprocess.run([*cmd, "--max-concurrency", "0"], capture_output=True, text=True, timeout=120)
    assert bad_flag.returncode == 2 and "--max-concurrency" in bad_flag.stderr


def test_serve_refuses_a_checkpoint_whose_embedding_is_smaller_than_its_tokenizer(tmp_path):
    from server_support import free_port

    from qwenkit.checkpoints.synthetic import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "small-vocab", overrides={"vocab_size": 512}, dtype="float32")
    cmd = [sys.executable, "-m", "qwenkit", "serve", "-m", str(ckpt), "--port", str(free_port()), "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "embedding has 512 rows but its tokenizer 151851 tokens" in out.stderr
