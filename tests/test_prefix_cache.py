"""Prefix reuse across chat turns (`generation.prefix.PrefixCache`): greedy ids with reuse equal those without."""

from __future__ import annotations

import pytest
import torch

from qwenkit import QWenTokenizer
from qwenkit.generation.chat import chat, chat_stream
from qwenkit.generation.generate import TokenGenerator, generate, stream
from qwenkit.generation.prefix import PrefixCache
from qwenkit.generation.sampling import SamplingParams
from qwenkit.model.transformer import QWenLMHeadModel
from qwenkit.tokenizer.vocab import official_vocab_file

VALID_VOCAB = 151851
QUERIES = ["你好", "Tell me more about that.", "And then?", "x " * 20, "Summarise our chat.", "Thanks!"]


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer(official_vocab_file())


@pytest.fixture(scope="module")
def model(make_tiny_model) -> QWenLMHeadModel:
    # seq_length 4096: every prompt of these chats runs at NTK alpha 1, so turns reuse each other.
    return make_tiny_model(vocab_size=151936, seq_length=4096)


@pytest.fixture(scope="module")
def short_model(make_tiny_model) -> QWenLMHeadModel:
    # seq_length 48: the conversation crosses it, so alpha changes from 1 to 3 mid-chat.
    return make_tiny_model(vocab_size=151936, seq_length=48, seed=3)


def _conversation(model, tok, prefix, queries=QUERIES, **kw) -> list[str]:
    history, answers = [], []
    for query in queries:
        answer, history = chat(
            model, tok, query, history, prefix_cache=prefix, do_sample=False, max_new_tokens=12, **kw
        )
        answers.append(answer)
    return answers


def test_multi_turn_chat_with_reuse_equals_without(model, tok):
    prefix = PrefixCache()
    assert _conversation(model, tok, prefix) == _conversation(model, tok, False)
    # Turn 1 finds an empty cache; every later turn reuses the system prompt and the earlier turns.
    assert prefix.misses == 1 and prefix.hits == len(QUERIES) - 1
    assert prefix.reused_tokens > 100


def test_default_model_chat_reuses_its_own_prefix_cache(make_tiny_model, tok):
    fresh = make_tiny_model(vocab_size=151936, seq_length=4096)
    answers = _conversation(fresh, tok, None, QUERIES[:3])
    assert answers == _conversation(fresh, tok, False, QUERIES[:3])
    assert fresh.chat_prefix_cache.hits >= 2


def test_reuse_is_skipped_when_the_ntk_alpha_changes(short_model, tok):
    prefix = PrefixCache()
    queries = ["hi", "a b c d e f", "g h i j k l m n o p q r", "more"]
    assert _conversation(short_model, tok, prefix, queries) == _conversation(short_model, tok, False, queries)
    # The prompt crosses seq_length (alpha 1 -> 3) on some turn: that turn cannot reuse keys rotated at alpha 1.
    assert prefix.misses >= 2  # the first turn and the alpha switch
    assert prefix.hits >= 1  # later turns at the same alpha reuse


def test_chat_stream_with_reuse_equals_chat_stream_without(model, tok):
    prefix = PrefixCache()
    history: list[tuple[str, str]] = []
    for query in QUERIES[:3]:
        kw = dict(do_sample=False, max_new_tokens=10)
        *_, streamed = chat_stream(model, tok, query, history, prefix_cache=prefix, **kw)
        *_, plain = chat_stream(model, tok, query, history, prefix_cache=False, **kw)
        assert streamed == plain
        history.append((query, plain))
    assert prefix.hits >= 2


def test_reused_prefill_logits_match_a_full_prefill(model, tok):
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 8)
    params = SamplingParams(temperature=0, max_new_tokens=4)
    prefix = PrefixCache()
    first = generate(model, tok, prompt, params, prefix=prefix)
    kept = prefix.tokens
    assert kept == prompt + first.token_ids[:-1]  # the last sampled token was never fed
    longer = prompt + first.token_ids + tok.encode(" and again")
    gen = TokenGenerator(model, [longer], params, valid_vocab_size=VALID_VOCAB, prefix=prefix)
    assert gen.reused == len(kept)
    reused_logits = gen._prefill()
    gen.close()
    full = TokenGenerator(model, [longer], params, valid_vocab_size=VALID_VOCAB)._prefill()
    torch.testing.assert_close(reused_logits, full, rtol=1e-4, atol=1e-4)


def test_same_prompt_again_reuses_all_but_the_last_token(model, tok):
    prompt = tok.encode("hello world, hello prefix cache")
    params = SamplingParams(temperature=0, max_new_tokens=3)
    prefix = PrefixCache()
    a = generate(model, tok, prompt, params, prefix=prefix).token_ids
    gen = TokenGenerator(model, [prompt], params, valid_vocab_size=VALID_VOCAB, prefix=prefix)
    assert gen.reused == len(prompt) - 1
    gen.close()
    assert generate(model, tok, prompt, params, prefix=prefix).token_ids == a


def test_a_busy_prefix_cache_is_not_shared(model, tok):
    prompt = tok.encode("one two three")
    params = SamplingParams(temperature=0, max_new_tokens=3)
    prefix = PrefixCache()
    generate(model, tok, prompt, params, prefix=prefix)
    holder = TokenGenerator(model, [prompt], params, valid_vocab_size=VALID_VOCAB, prefix=prefix)
    other = TokenGenerator(model, [prompt], params, valid_vocab_size=VALID_VOCAB, prefix=prefix)
    assert holder.prefix is prefix and other.prefix is None and other.reused == 0
    assert other.cache is not holder.cache
    holder.close()
    holder.close()  # twice is harmless
    assert prefix.acquire()
    prefix.release()


def test_interrupted_stream_keeps_a_valid_prefix(model, tok):
    prompt = tok.encode("count with me: one two three four")
    params = SamplingParams(temperature=0, max_new_tokens=20)
    prefix = PrefixCache()
    chunks = stream(model, tok, prompt, params, prefix=prefix)
    taken = [next(chunks).token_id for _ in range(3)]
    chunks.close()  # the consumer walks away: the prefix cache is handed back
    assert prefix.tokens == prompt + taken[:2]
    assert (
        generate(model, tok, prompt, params, prefix=prefix).token_ids
        == generate(model, tok, prompt, params).token_ids
    )


def test_prefix_cache_grows_and_clears(model, tok):
    prefix = PrefixCache()
    params = SamplingParams(temperature=0, max_new_tokens=2)
    short = tok.encode("a short prompt")
    generate(model, tok, short, params, prefix=prefix)
    small = prefix._cache
    long_prompt = short + tok.encode(" word" * 2100)
    expected = generate(model, tok, long_prompt, params).token_ids
    assert generate(model, tok, long_prompt, params, prefix=prefix).token_ids == expected
    assert prefix._cache is not small and prefix._cache.max_seq_len >= len(long_prompt) + 2
    prefix.clear()
    assert prefix.tokens == [] and prefix._cache is None


def test_batch_prompts_cannot_share_a_prefix_cache(model):
    with pytest.raises(ValueError, match="one prompt"):
        TokenGenerator(
            model, [[1, 2], [3]], SamplingParams(), valid_vocab_size=VALID_VOCAB, prefix=PrefixCache()
        )
