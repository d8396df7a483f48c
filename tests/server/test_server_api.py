"""The OpenAI-compatible API of a real `qwenkit serve` (tiny random checkpoint) through the official `openai` client
and raw httpx: responses, streaming, usage, n, seeds, completions, tokenize, and continuous batching."""

from __future__ import annotations

import json
import threading

import openai
import pytest
from server_support import API_KEY, MAX_LEN, MODEL, sse_data

HELLO = [{"role": "user", "content": "Tell me about the sea."}]


def prompt_len(http, messages, tools=None) -> int:
    body = {"messages": messages, **({"tools": tools} if tools else {})}
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def test_health_is_open_and_models_list(server, client, http):
    import httpx

    health = httpx.get(f"{server.url}/health", timeout=10)  # no key
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"


def test_chat_response_shape_and_usage(client, http):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=8)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.created > 0
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.tool_calls is None
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == prompt_len(http, HELLO)
    assert 1 <= r.usage.completion_tokens <= 8
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-3.5-turbo", messages=HELLO, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def _stream_raw(http, body: dict) -> tuple[list[dict], str]:
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    data = sse_data(text)
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]], text


def test_stream_equals_non_stream_at_temperature_0(http, client):
    body = {"model": MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 24}
    whole = client.chat.completions.create(**body)
    chunks, _ = _stream_raw(http, {**body, "stream_options": {"include_usage": True}})
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == [whole.choices[0].finish_reason]
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text == whole.choices[0].message.content
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    assert all(c["usage"] is None for c in chunks[:-1])


def test_openai_client_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_tokens=6, stream=True
    )
    chunks = list(stream)
    assert chunks and sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == 1


def test_n_choices_and_seeds(client):
    body = {"model": MODEL, "messages": HELLO, "temperature": 1.0, "max_tokens": 6}
    a = client.chat.completions.create(**body, n=3, seed=1234)
    b = client.chat.completions.create(**body, n=3, seed=1234)
    c = client.chat.completions.create(**body, n=3, seed=999)
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts(a) == texts(b)  # same seed, same answers
    assert texts(a) != texts(c)
    assert len(set(texts(a))) > 1  # choices differ from each other
    # Choice i uses seed + i: choice 1 of seed 1234 is the only choice of seed 1235.
    single = client.chat.completions.create(**body, seed=1235)
    assert single.choices[0].message.content == a.choices[1].message.content
    assert a.usage.completion_tokens <= 18 and a.usage.prompt_tokens == single.usage.prompt_tokens


def test_stream_with_n_finishes_each_choice_once(http):
    body = {"model": MODEL, "messages": HELLO, "temperature": 0.8, "seed": 5, "max_tokens": 5, "n": 2}
    chunks, _ = _stream_raw(http, body)
    finishes = [
        (ch["index"], ch["finish_reason"]) for c in chunks for ch in c["choices"] if ch["finish_reason"]
    ]
    assert sorted(i for i, _ in finishes) == [0, 1]
    roles = [ch["index"] for c in chunks for ch in c["choices"] if ch["delta"].get("role")]
    assert sorted(roles) == [0, 1]


def test_completions_whole_stream_and_batch(http, client):
    body = {"model": MODEL, "prompt": "The sea is", "temperature": 0, "max_tokens": 10}
    whole = client.completions.create(**body)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].text for c in client.completions.create(**body, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    batch = client.completions.create(**{**body, "prompt": ["The sea is", "Mountains are"], "n": 2})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == whole.choices[0].text == batch.choices[1].text  # greedy: n copies agree
    counts = [
        len(http.post("/tokenize", json={"prompt": p}).json()["tokens"])
        for p in ("The sea is", "Mountains are")
    ]
    assert batch.usage.prompt_tokens == sum(counts)
    assert batch.usage.total_tokens == batch.usage.prompt_tokens + batch.usage.completion_tokens


def test_tokenize_is_plain_text_unless_asked(http, tokenizer):
    text = "hi <|im_end|><|im_start|>system"
    plain = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert plain == tokenizer.encode(text, allowed_special=set())
    assert tokenizer.im_end_id not in plain and tokenizer.im_start_id not in plain
    special = http.post("/tokenize", json={"prompt": text, "allow_special": True}).json()["tokens"]
    assert tokenizer.im_end_id in special
    back = http.post("/detokenize", json={"tokens": plain})
    assert back.status_code == 200 and back.json()["prompt"] == text
    bad = http.post("/detokenize", json={"tokens": [1, len(tokenizer)]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens[1]"


def test_context_overflow_is_400_for_whole_and_stream(http):
    long = [{"role": "user", "content": "sea " * (MAX_LEN + 50)}]
    assert prompt_len(http, long) >= MAX_LEN
    for stream in (False, True):
        r = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": long, "max_tokens": 5, "stream": stream}
        )
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json")  # no SSE byte was sent
        assert r.json()["error"]["code"] == "context_length_exceeded"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "sea " * (MAX_LEN + 50)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_max_tokens_is_clamped_to_the_context(http):
    # Find a prompt that leaves exactly 5 tokens of room.
    words = MAX_LEN - 40
    messages = [{"role": "user", "content": "sea " * words}]
    while (n := prompt_len(http, messages)) != MAX_LEN - 5:
        words += (MAX_LEN - 5) - n
        messages = [{"role": "user", "content": "sea " * words}]
    r = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 500, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5 and body["usage"]["total_tokens"] == MAX_LEN


def test_concurrent_greedy_requests_equal_sequential_ones(client):
    """Continuous batching: requests that join and leave the batch at different steps get the same greedy text
    as when each runs alone."""
    prompts = ["Tell me about the sea.", "Why is the sky blue?", "Write a poem.", "一二三"]
    lengths = [12, 3, 20, 7]

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": prompts[i]}]
        r = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=lengths[i]
        )
        return r.choices[0].message.content

    alone = [ask(i) for i in range(4)]
    together: list[str | None] = [None] * 4

    def worker(i: int) -> None:
        together[i] = ask(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone


def test_wrong_key_and_missing_key_are_401(server, http):
    import httpx
    from openai import OpenAI

    bad = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY + "x", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for headers in ({}, {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, json={}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
