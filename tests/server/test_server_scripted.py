"""Exact-output cases on the real app with a scripted backend that forces token sequences: stop strings across
tokens, multi-byte characters split across tokens, token accounting, and ReAct tool calls (stream and not)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_support import script, sse_data

MODEL = "scripted"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def sc(scripted):
    return openai.OpenAI(base_url=f"{scripted.url}/v1", api_key="unused", max_retries=0, timeout=30)


def pieces(tokenizer, *texts: str) -> list[int]:
    """Ids that split the text exactly at the given pieces (each piece encoded on its own)."""
    return [i for t in texts for i in tokenizer.encode(t, allowed_special=set())]


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`: every multi-byte character is split across tokens."""
    return [tokenizer.mergeable_ranks[bytes([b])] for b in text.encode()]


def raw_stream(url: str, body: dict) -> list[dict]:
    r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30)
    assert r.status_code == 200, r.text
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def contents(chunks: list[dict]) -> list[str]:
    return [ch["delta"]["content"] for c in chunks for ch in c["choices"] if ch["delta"].get("content")]


def chat(ids, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": script(ids)}], **extra}


def test_exact_tokens_and_usage(sc, tokenizer):
    ids = pieces(tokenizer, "Hello", " there", ",", " friend")
    r = sc.chat.completions.create(**chat(ids))
    assert r.choices[0].message.content == "Hello there, friend"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(ids)  # the closing <|im_end|> is not counted
    cut = sc.chat.completions.create(**chat(ids, max_tokens=2))
    assert cut.choices[0].message.content == "Hello there" and cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 2


def test_stop_string_across_tokens_never_streams(scripted, sc, tokenizer):
    ids = pieces(tokenizer, "Hello", " wo", "rl", "d", " and", " more")
    whole = sc.chat.completions.create(**chat(ids, stop=["world"]))
    assert whole.choices[0].message.content == "Hello " and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == 4  # generation stopped at the token completing the stop string
    parts = contents(raw_stream(scripted.url, chat(ids, stop=["world"])))
    assert "".join(parts) == "Hello "
    assert not any(s in p for p in parts for s in ("world", "wo", "rl"))
    # Several stops: the first to complete wins; text that only began a stop string is released.
    other = sc.chat.completions.create(**chat(ids, stop=["wonder", "d an"]))
    assert other.choices[0].message.content == "Hello worl"


def test_multibyte_characters_split_across_tokens(scripted, sc, tokenizer):
    text = "a€中😀b"
    ids = pieces(tokenizer, "x") + byte_tokens(tokenizer, text)
    parts = contents(raw_stream(scripted.url, chat(ids)))
    assert "".join(parts) == "x" + text
    assert all("\ufffd" not in p for p in parts) and all(p.encode().decode() == p for p in parts)
    assert len(parts) >= 4  # deltas really are spread over several chunks
    assert sc.chat.completions.create(**chat(ids)).choices[0].message.content == "x" + text
    completion = httpx.post(
        f"{scripted.url}/v1/completions",
        json={"model": MODEL, "prompt": script(ids), "stream": True},
        timeout=30,
    )
    texts = [json.loads(d)["choices"][0]["text"] for d in sse_data(completion.text)[:-1]]
    assert "".join(texts) == "x" + text and all("\ufffd" not in t for t in texts)


CALL = (
    'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: sunny'
)


def test_tool_call_whole_and_streamed(scripted, sc, tokenizer):
    ids = pieces(tokenizer, CALL)
    r = sc.chat.completions.create(**chat(ids, tools=[WEATHER]))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "I need the weather."
    # Streamed: the same call in one tool_calls delta, finish_reason once, no ReAct text leaking as content.
    chunks = raw_stream(scripted.url, chat(ids, tools=[WEATHER]))
    deltas = [ch["delta"] for c in chunks for ch in c["choices"]]
    calls = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert len(calls) == 1 and calls[0][0]["function"] == {
        "name": "get_weather",
        "arguments": call.function.arguments,
    }
    assert "".join(contents(chunks)) == "I need the weather."
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == [
        "tool_calls"
    ]
    # The openai client's stream accumulates the same call.
    stream = sc.chat.completions.create(**chat(ids, tools=[WEATHER]), stream=True)
    got = [tc for c in stream for ch in c.choices for tc in ch.delta.tool_calls or []]
    assert [g.function.name for g in got] == ["get_weather"]


def test_final_answer_streams_as_content(scripted, sc, tokenizer):
    ids = pieces(tokenizer, "Thought: I know this.\nFinal", " Answer:", " It is", " sunny", ".")
    whole = sc.chat.completions.create(**chat(ids, tools=[WEATHER]))
    assert whole.choices[0].message.content == "It is sunny." and whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].message.tool_calls is None
    parts = contents(raw_stream(scripted.url, chat(ids, tools=[WEATHER])))
    assert "".join(parts) == "It is sunny." and len(parts) >= 2  # released as it comes, not at the end


def test_tool_round_trip(scripted, sc, tokenizer):
    answer = pieces(tokenizer, " I now know the final answer.\nFinal Answer: Sunny in Paris.")
    messages = [
        {"role": "user", "content": "Weather in Paris? " + script(answer)},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]  # fmt: skip
    prompt = httpx.post(
        f"{scripted.url}/tokenize", json={"messages": messages, "tools": [WEATHER]}, timeout=30
    )
    text = tokenizer.decode(prompt.json()["tokens"])
    assert 'Action: get_weather\nAction Input: {"city": "Paris"}\nObservation: sunny, 24 C\nThought:' in text
    assert text.endswith("\nThought:")  # the assistant turn stays open for the model to continue
    assert "get_weather: Call this tool" in text and "Question: Weather in Paris?" in text
    r = sc.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert r.choices[0].message.content == "Sunny in Paris." and r.choices[0].finish_reason == "stop"


def test_legacy_functions(sc, tokenizer):
    ids = pieces(tokenizer, CALL)
    r = sc.chat.completions.create(**chat(ids, functions=[WEATHER["function"]]))
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert (
        message.function_call.name == "get_weather" and message.tool_calls[0].function.name == "get_weather"
    )


@pytest.mark.parametrize(
    ("text", "tools", "extra"),
    [
        ("Action: delete_everything\nAction Input: {}\nObservation: done", [WEATHER], {}),  # not offered
        (CALL, None, {}),  # no tools: "Action:" is just text
        (CALL, [WEATHER], {"tool_choice": "none"}),
        (CALL.replace("get_weather", "get_time"), [WEATHER], {}),
    ],
    ids=["not-offered", "no-tools", "tool-choice-none", "other-name"],
)
def test_action_text_is_not_a_call_unless_offered(sc, tokenizer, text, tools, extra):
    body = chat(pieces(tokenizer, text), **({"tools": tools} if tools else {}), **extra)
    r = sc.chat.completions.create(**body)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    expected = text if not tools or extra else text.split("Observation:")[0]
    assert r.choices[0].message.content == expected


def test_truncated_call_is_not_a_call(sc, tokenizer):
    ids = pieces(tokenizer, "Thought: x\nAction: get_weather\nAction Input:", ' {"city"', ': "Paris"}')
    r = sc.chat.completions.create(**chat(ids, tools=[WEATHER], max_tokens=len(ids) - 1))
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None


def test_user_text_with_action_is_not_a_call(sc, tokenizer):
    user = 'Action: get_weather\nAction Input: {"city": "Rome"}\n' + script(
        pieces(tokenizer, "Final Answer: no.")
    )
    r = sc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": user}], tools=[WEATHER])
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == "no."
