"""The server's shared prefix cache (`server.prefix_cache.PrefixStore` in the engine): same greedy output with and
without it across requests, slots, prompts past seq_length, rows of different lengths and eviction."""

from __future__ import annotations

import asyncio

import pytest
import torch

from qwenkit import QWenTokenizer
from qwenkit.generation.sampling import SamplingParams
from qwenkit.model.transformer import QWenLMHeadModel
from qwenkit.server.backend import ModelBackend
from qwenkit.server.engine import Engine
from qwenkit.server.prefix_cache import PrefixStore
from qwenkit.tokenizer.vocab import official_vocab_file

GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer(official_vocab_file())


@pytest.fixture(scope="module")
def model(make_tiny_model) -> QWenLMHeadModel:
    # seq_length 160: the long prompts below cross it (alpha 3), the short ones do not (alpha 1).
    return make_tiny_model(vocab_size=151936, seq_length=160, seed=5)


def _serve(model, tok, batches, store: PrefixStore | None, slots: int = 4) -> list[list[tuple[str, int]]]:
    """Run each batch of prompts concurrently (one request per prompt), batches one after another; return
    (text, completion tokens) per prompt, per batch."""
    engine = Engine(ModelBackend(model, slots, 1024), tok, max_queue=16, prefix_store=store)
    engine.start()

    async def one(prompt: list[int]) -> tuple[str, int]:
        handle = engine.submit([(prompt, GREEDY)], asyncio.get_running_loop())
        text, n = "", 0
        async for event in handle.events():
            assert event.error is None, event.error
            text, n = text + event.text, event.completion_tokens
        return text, n

    async def run_all():
        return [await asyncio.gather(*(one(p) for p in batch)) for batch in batches]

    try:
        return asyncio.run(run_all())
    finally:
        engine.shutdown()


def _prompts(tok):
    system = tok.encode("You are a helpful assistant who answers in detail. " * 6)  # ~60 tokens
    return system, [system + tok.encode(f" Question {i}: " + "why? " * (3 * i)) for i in range(4)]


def test_shared_prefix_requests_equal_without_store(model, tok):
    system, prompts = _prompts(tok)
    store = PrefixStore(max_bytes=64 << 20, block_size=16)
    batches = [prompts, prompts[::-1], [system + tok.encode(" again")] * 3]
    with_store = _serve(model, tok, batches, store)
    assert with_store == _serve(model, tok, batches, None)
    stats = store.stats()
    assert stats["prefix_cache_hits"] >= 7 and stats["prefix_cache_reused_tokens"] >= 7 * 48
    assert stats["prefix_cache_hits"] + stats["prefix_cache_misses"] == 4 + 4 + 3


def test_conversation_continues_from_a_previous_answer(model, tok):
    system, prompts = _prompts(tok)
    store = PrefixStore(max_bytes=64 << 20, block_size=16)
    (first,) = _serve(model, tok, [[prompts[2]]], store)[0]
    # The next turn starts with the whole previous prompt + answer (as a chat client sends it).
    follow = prompts[2] + tok.encode(first[0]) + tok.encode(" and more?")
    assert _serve(model, tok, [[follow]], store) == _serve(model, tok, [[follow]], None)
    assert store.reused_tokens >= len(prompts[2]) - 16


def test_prompts_across_seq_length_never_mix_alphas(model, tok):
    # Same first 200 tokens, one prompt of 210 (alpha 3: > 160) and one of 150 (alpha 1).
    base = tok.encode(" lorem ipsum dolor sit amet" * 60)
    long_a, long_b, short = base[:210], base[:230], base[:150]
    assert (
        model.ntk_alpha(len(long_a)) == model.ntk_alpha(len(long_b)) == 3 and model.ntk_alpha(len(short)) == 1
    )
    store = PrefixStore(max_bytes=64 << 20, block_size=16)
    batches = [[long_a], [short], [long_b], [short]]
    assert _serve(model, tok, batches, store) == _serve(model, tok, batches, None)
    # short reuses nothing from long_a (other alpha); long_b reuses long_a's blocks; the 2nd short its twin's.
    assert store.misses == 2 and store.hits == 2


def test_eviction_under_memory_pressure_stays_exact(model, tok):
    system, prompts = _prompts(tok)
    probe = ModelBackend(model, 1, 64).read_kv(0, 0, 16)
    block_bytes = sum(t.numel() * t.element_size() for t in probe)
    store = PrefixStore(max_bytes=5 * block_bytes, block_size=16)  # fewer blocks than one prompt needs
    batches = [[p] for p in prompts] + [[p] for p in prompts]
    assert _serve(model, tok, batches, store) == _serve(model, tok, batches, None)
    assert store.evictions > 0 and store.bytes <= store.max_bytes and len(store) <= 5


def test_int8_cache_with_store_equals_int8_without(make_tiny_model, tok):
    model = make_tiny_model(vocab_size=151936, seq_length=160, seed=5)
    model.set_kv_cache_dtype("int8")
    system, prompts = _prompts(tok)
    store = PrefixStore(max_bytes=64 << 20, block_size=16)
    batches = [prompts[:2], prompts[2:]]
    assert _serve(model, tok, batches, store) == _serve(model, tok, batches, None)
    assert store.hits >= 3


def test_store_lookup_and_lru_order():
    store = PrefixStore(max_bytes=10 * 8, block_size=2)
    data = (torch.zeros(2),)  # 8 bytes a block

    def read(a, b):
        return data

    store.insert([1, 2, 3, 4, 5, 6], 1.0, read)
    assert [pos for pos, _ in store.lookup([1, 2, 3, 4, 5, 6, 7], 1.0)] == [0, 2, 4]
    assert store.lookup([1, 2, 3, 4, 5, 6], 1.0)[-1][0] == 2  # the block with the last token is never served
    assert store.lookup([1, 2, 3, 4, 5, 6, 7], 3.0) == []  # other alpha
    assert [p for p, _ in store.lookup([1, 2, 9, 9, 5, 6, 7], 1.0)] == [0]  # a changed block ends the match
    assert [p for p, _ in store.lookup([1, 2, 3, 4, 5, 6, 7], 1.0, start=2)] == [2, 4]
    store.insert(list(range(100, 116)), 1.0, read)  # 8 more blocks: over budget, oldest leaves go first
    assert store.bytes <= store.max_bytes and store.evictions == 1
    with pytest.raises(ValueError):
        PrefixStore(max_bytes=0)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_engine_serves_a_model_with_a_quantized_lm_head(make_tiny_model, tok, bits):
    """`qwenkit quantize` quantizes lm_head by default, and a quantized linear has no `.weight`: the backend must
    take the model's device from the model, and serve the same greedy tokens as the generation API."""
    from qwenkit.generation.generate import generate
    from qwenkit.quant import quantize_model

    model = quantize_model(make_tiny_model(vocab_size=151936, seed=9), bits)
    assert not hasattr(model.lm_head, "weight")
    prompt = tok.encode("Tell me about the weather today.")
    (served,) = _serve(model, tok, [[prompt]], None)[0]
    direct = generate(model, tok, prompt, GREEDY)
    assert served == (direct.text, len(direct.token_ids))


def test_a_request_that_fails_admission_fails_alone(make_tiny_model, tok):
    """A prompt the model cannot take (here an id past a 1000-row embedding) ends that request with an error
    event; the engine's worker goes on serving the others (before, it died and every request hung)."""
    model = make_tiny_model(seed=2)  # vocab 1000
    engine = Engine(ModelBackend(model, 2, 256), tok, max_queue=4)
    engine.start()

    async def one(prompt: list[int]):
        handle = engine.submit([(prompt, GREEDY)], asyncio.get_running_loop())
        return [event async for event in handle.events()]

    async def run_all():
        bad = await asyncio.wait_for(one([5, 1500, 7]), 30)
        good = await asyncio.wait_for(one([5, 6, 7]), 30)
        return bad, good

    try:
        bad, good = asyncio.run(run_all())
    finally:
        engine.shutdown()
    assert bad[-1].error is not None and "generation failed" in bad[-1].error
    assert all(event.error is None for event in good) and good[-1].completion_tokens == GREEDY.max_new_tokens
