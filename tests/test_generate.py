"""Generation and the chat API against a reference greedy loop written from the official decode semantics."""

from __future__ import annotations

import pytest
import torch

from qwenkit import QWenTokenizer
from qwenkit.generation.chat import chat, chat_stream, generate_ids
from qwenkit.generation.generate import CacheReuse, TokenGenerator, generate, generate_batch, stream
from qwenkit.generation.sampling import SamplingParams
from qwenkit.model.transformer import QWenLMHeadModel
from qwenkit.tokenizer.chat_format import make_context
from qwenkit.tokenizer.vocab import official_vocab_file

VALID_VOCAB = 151851


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer(official_vocab_file())


@pytest.fixture(scope="module")
def model(make_tiny_model) -> QWenLMHeadModel:
    # Full Qwen vocabulary (the tokenizer's ids must exist), tiny everything else; seq_length 32 so that prompts
    # and decodes cross it (dynamic NTK and logn become active).
    return make_tiny_model(vocab_size=151936, seq_length=32)


@torch.inference_mode()
def reference_greedy(
    model: QWenLMHeadModel, prompt: list[int], max_new: int, penalty: float, stop_ids: set[int]
) -> list[int]:
    """The official decode, written plainly: recompute the whole sequence every step with the NTK alpha fixed at
    the prompt length, penalise every id of prompt + output (divide positive logits, multiply negative ones),
    never pick padding ids, take the argmax, stop at a stop id (not output) or after max_new tokens."""
    alpha = model.ntk_alpha(len(prompt))
    seq, out = list(prompt), []
    for _ in range(max_new):
        logits = model(torch.tensor([seq]), ntk_alpha=alpha)[0, -1].clone()
        logits[VALID_VOCAB:] = float("-inf")
        for i in set(seq):
            logits[i] = logits[i] / penalty if logits[i] > 0 else logits[i] * penalty
        token = int(logits.argmax())
        if token in stop_ids:
            break
        out.append(token)
        seq.append(token)
    return out


CASES = [
    ("你好", None, "You are a helpful assistant."),
    ("What is 1+1?", [("hi", "hello there"), ("again", "yes")], "Be brief."),
    ("x " * 30, [("long " * 10, "reply " * 5)], ""),  # prompt longer than seq_length (32)
]


@pytest.mark.parametrize("penalty", [1.0, 1.1])
@pytest.mark.parametrize(("query", "history", "system"), CASES)
def test_chat_greedy_equals_reference(model, tok, query, history, system, penalty):
    max_new = 24  # the shortest prompt (20 tokens) decodes across seq_length = 32
    prompt = make_context(tok, query, history, system)[1]
    expected = reference_greedy(model, prompt, max_new, penalty, {tok.im_end_id, tok.im_start_id, tok.eod_id})
    response, new_history = chat(
        model,
        tok,
        query,
        history,
        system,
        do_sample=False,
        repetition_penalty=penalty,
        max_new_tokens=max_new,
    )
    assert response == tok.decode(expected).strip()
    assert new_history == [*(history or []), (query, response)]


def test_chat_does_not_modify_history(model, tok):
    history = [("a", "b")]
    _, new_history = chat(model, tok, "c", history, do_sample=False, max_new_tokens=3)
    assert history == [("a", "b")] and len(new_history) == 2


def test_length_limit_keeps_the_last_token(model, tok):
    prompt = make_context(tok, "hi")[1]
    result = generate(model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=7))
    expected = reference_greedy(model, prompt, 7, 1.0, set())
    assert result.finish_reason == "length" and result.token_ids == expected and len(expected) == 7


def test_stop_token_ends_generation(model, tok):
    prompt = make_context(tok, "hi")[1]
    free = reference_greedy(model, prompt, 10, 1.0, set())
    stop_at = 4
    result = generate(
        model, tok, prompt, SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[free[stop_at]])
    )
    assert result.finish_reason == "stop"
    assert result.token_ids == free[: free.index(free[stop_at])]


def test_stop_string_across_tokens_never_leaks(model, tok):
    prompt = make_context(tok, "hi")[1]
    free = reference_greedy(model, prompt, 12, 1.0, set())
    pieces = [tok.decode([t]) for t in free]
    full = "".join(pieces)
    # A stop string made of the end of token 5 and the start of token 6.
    stop = pieces[5][-2:] + pieces[6][:2]
    cut = full.index(stop)
    params = SamplingParams(temperature=0, max_new_tokens=12, stop=[stop])
    chunks = list(stream(model, tok, prompt, params))
    streamed = "".join(c.text for c in chunks)
    assert streamed == full[:cut]
    assert all(stop not in c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert [c.finish_reason for c in chunks].count("stop") == 1
    assert generate(model, tok, prompt, params).text == full[:cut]


def test_stream_equals_generate_and_chat_stream_equals_chat(model, tok):
    prompt = make_context(tok, "hello")[1]
    params = SamplingParams(temperature=0, max_new_tokens=10)
    assert (
        "".join(c.text for c in stream(model, tok, prompt, params))
        == generate(model, tok, prompt, params).text
    )
    cumulative = list(chat_stream(model, tok, "hello", do_sample=False, max_new_tokens=10))
    assert all(b.startswith(a) for a, b in zip(cumulative, cumulative[1:], strict=False))
    assert cumulative[-1].strip() == chat(model, tok, "hello", do_sample=False, max_new_tokens=10)[0]


def test_seeds(model, tok):
    def run(seed):
        return chat(model, tok, "hi", seed=seed, max_new_tokens=16, top_p=1.0)[0]

    assert run(1) == run(1)
    assert len({run(1), run(2), run(3)}) > 1


def test_padding_ids_are_never_sampled(model, tok):
    biased = QWenLMHeadModel(model.config, dtype=torch.float32).eval()
    biased.load_state_dict(model.state_dict())
    with torch.no_grad():
        biased.lm_head.weight[VALID_VOCAB:] *= 1000  # padding rows dominate the logits
    result = generate(biased, tok, [1, 2, 3], SamplingParams(temperature=1.0, max_new_tokens=20, seed=0))
    assert all(t < VALID_VOCAB for t in result.token_ids)
    assert all(
        t < VALID_VOCAB for t in generate(biased, tok, [1], SamplingParams(temperature=0)).token_ids[:5]
    )


def test_batch_greedy_equals_one_by_one(model, tok):
    prompts = [[5], list(range(100, 107)), list(range(1000, 1040))]
    params = SamplingParams(temperature=0, max_new_tokens=9, repetition_penalty=1.1)
    batch = generate_batch(model, tok, prompts, params)
    for prompt, result in zip(prompts, batch, strict=True):
        alone = generate(model, tok, prompt, params)
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text and result.finish_reason == alone.finish_reason


def test_batches_sharing_one_cache_equal_one_by_one(model, tok):
    """CacheReuse: a longer batch, then a smaller and shorter one (a view of the same cache, stale keys from the
    first batch beyond every row's prompt), then one that needs more rows (a new cache): every row equals the
    prompt generated alone."""
    reuse = CacheReuse()
    params = SamplingParams(temperature=0, max_new_tokens=6)
    batches = [
        [list(range(400, 440)), list(range(500, 530)), list(range(600, 625))],
        [[9, 8, 7], list(range(700, 712))],
        [[3], [4, 4], [5, 5, 5], [6] * 7],
    ]
    caches = []
    for prompts in batches:
        results = generate_batch(model, tok, prompts, params, reuse=reuse)
        caches.append(reuse.cache)
        for prompt, result in zip(prompts, results, strict=True):
            assert result.token_ids == generate(model, tok, prompt, params).token_ids
    assert caches[0] is caches[1] and caches[2] is not caches[0]
    assert caches[2].max_batch_size == 4


def test_batch_rows_finish_independently(model, tok):
    prompts = [[5, 6], [7, 8, 9]]
    params = [
        SamplingParams(temperature=0, max_new_tokens=3),
        SamplingParams(temperature=0, max_new_tokens=8),
    ]
    short, long = generate_batch(model, tok, prompts, params)
    assert len(short.token_ids) == 3 and len(long.token_ids) == 8
    assert long.token_ids == generate(model, tok, prompts[1], params[1]).token_ids


def test_generate_ids_shapes(model, tok):
    out = generate_ids(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), do_sample=False, max_new_tokens=4)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    assert out[:, :3].tolist() == [[1, 2, 3], [4, 5, 6]]
    single = generate_ids(model, [1, 2, 3], do_sample=False, max_new_tokens=4)
    assert single == out[0].tolist()


def test_errors(model, tok):
    with pytest.raises(ValueError, match="at least one token"):
        TokenGenerator(model, [[]], SamplingParams(), valid_vocab_size=VALID_VOCAB)
    with pytest.raises(ValueError, match="context"):
        TokenGenerator(model, [[1] * 10], SamplingParams(), valid_vocab_size=VALID_VOCAB, max_context=10)
    with pytest.raises(ValueError, match="unknown sampling option"):
        chat(model, tok, "hi", temprature=0.5)
    with pytest.raises(ValueError, match="top_p"):
        chat(model, tok, "hi", top_p=1.5)


def test_model_methods_delegate(model, tok):
    assert model.chat(tok, "hi", do_sample=False, max_new_tokens=5) == chat(
        model, tok, "hi", do_sample=False, max_new_tokens=5
    )
    assert list(model.chat_stream(tok, "hi", do_sample=False, max_new_tokens=5)) == list(
        chat_stream(model, tok, "hi", do_sample=False, max_new_tokens=5)
    )
    assert model.generate([1, 2], do_sample=False, max_new_tokens=3) == generate_ids(
        model, [1, 2], tokenizer=tok, do_sample=False, max_new_tokens=3
    )


def test_batch_prefills_a_shared_prefix_once(model, tok, monkeypatch):
    system = list(range(2000, 2040))  # longer than seq_length 32: NTK and logn are active in the prefix
    prompts = [system + [5, 6], system + list(range(300, 309)), system + [7]]
    params = SamplingParams(temperature=0, max_new_tokens=6)
    fed: list[int] = []
    forward = type(model).forward

    def counting(self, input_ids, *args, **kwargs):
        fed.append(input_ids.numel())
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    gen = TokenGenerator(model, prompts, params, valid_vocab_size=VALID_VOCAB)
    gen.step()
    assert gen.shared == 40 and fed[0] == 40  # the prefix once, in one row
    assert fed[1] == 3 * (len(prompts[1]) - 40)  # then only the rest, batched
    monkeypatch.setattr(type(model), "forward", forward)
    batch = generate_batch(model, tok, prompts, params)
    for prompt, result in zip(prompts, batch, strict=True):
        assert result.token_ids == generate(model, tok, prompt, params).token_ids
    # Rows that share less than MIN_SHARED_PREFIX tokens are prefilled together as before.
    gen = TokenGenerator(model, [[1] * 10 + [2], [1] * 10 + [3]], params, valid_vocab_size=VALID_VOCAB)
    gen.step()
    assert gen.shared == 0
