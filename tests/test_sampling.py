"""Sampling: validation, each logits processor against a plain restatement (and transformers), and sample()."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwenkit.generation import sampling
from qwenkit.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    build_seen_mask,
    make_generator,
    mask_invalid,
    process_logits,
    sample,
    update_seen_mask,
)

# generation_config.json of Qwen/Qwen-1.8B-Chat.
QWEN_1_8B_CHAT = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
    "transformers_version": "4.31.0",
}
VALID_VOCAB, MODEL_VOCAB = 151851, 151936


def random_logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed))


def kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


# --- SamplingParams ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", True),
        ("temperature", "0.7"),
        ("temperature", None),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_k", True),
        ("top_k", "5"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("top_p", math.nan),
        ("top_p", False),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.1),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", math.nan),
        ("repetition_penalty", "1.1"),
        ("max_new_tokens", 0),
        ("max_new_tokens", -5),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", False),
        ("max_new_tokens", None),
        ("stop_token_ids", 151645),
        ("stop_token_ids", [1, -2]),
        ("stop_token_ids", [1, True]),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", "12"),
        ("stop", [""]),
        ("stop", ""),
        ("stop", ["ok", 3]),
        ("stop", 3),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.0),
        ("seed", True),
    ],
)
def test_invalid_field_rejected_with_field_value_and_range(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be") as info:
        SamplingParams(**{field: value})
    assert repr(value) in str(info.value)


def test_defaults_and_normalisation():
    params = SamplingParams()
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (1.0, 0, 1.0, 1.0)
    assert (params.max_new_tokens, params.stop_token_ids, params.stop, params.seed) == (512, (), (), None)
    params = SamplingParams(temperature=1, top_p=1, stop_token_ids=[151645, 151644], stop=["x", "y"], seed=7)
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert params.stop_token_ids == (151645, 151644) and params.stop == ("x", "y")
    assert SamplingParams(stop="Observation:").stop == ("Observation:",)
    hash(params)  # frozen, hashable after normalisation
    with pytest.raises(AttributeError):
        params.top_k = 3  # type: ignore[misc]


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-3).greedy


def test_from_qwen_1_8b_chat_generation_config():
    params = SamplingParams.from_generation_config(QWEN_1_8B_CHAT)
    assert params == SamplingParams(
        temperature=1.0,
        top_k=0,
        top_p=0.8,
        repetition_penalty=1.1,
        max_new_tokens=512,
        stop_token_ids=(151643,),
    )
    assert not params.greedy


def test_from_generation_config_overrides():
    params = SamplingParams.from_generation_config(
        QWEN_1_8B_CHAT,
        top_p=0.5,
        top_k=20,
        temperature=0.7,
        repetition_penalty=1.0,
        max_new_tokens=8,
        seed=3,
        stop=["Observation:"],
        max_window_size=2048,
    )
    assert (params.top_p, params.top_k, params.temperature, params.repetition_penalty) == (0.5, 20, 0.7, 1.0)
    assert (params.max_new_tokens, params.seed, params.stop) == (8, 3, ("Observation:",))
    assert SamplingParams.from_generation_config(QWEN_1_8B_CHAT, do_sample=False).greedy
    assert SamplingParams.from_generation_config(
        {**QWEN_1_8B_CHAT, "do_sample": False}, temperature=0.7
    ).greedy
    assert SamplingParams.from_generation_config(QWEN_1_8B_CHAT, top_p=None).top_p == 0.8  # None: not given
    assert SamplingParams.from_generation_config(QWEN_1_8B_CHAT, stop_token_ids=[1]).stop_token_ids == (1,)


def test_from_generation_config_absent_keys_take_transformers_defaults():
    params = SamplingParams.from_generation_config({"eos_token_id": [1, 2]}, do_sample=True)
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (1.0, 50, 1.0, 1.0)
    assert params.stop_token_ids == (1, 2) and params.max_new_tokens == 512
    assert SamplingParams.from_generation_config({}).greedy  # transformers: do_sample defaults to False


def test_from_generation_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match="unknown sampling option.*'topp'.*valid options: do_sample"):
        SamplingParams.from_generation_config(QWEN_1_8B_CHAT, topp=0.5)
    with pytest.raises(ValueError, match="do_sample must be True or False"):
        SamplingParams.from_generation_config(QWEN_1_8B_CHAT, do_sample="yes")
    with pytest.raises(ValueError, match="SamplingParams.top_p must be"):
        SamplingParams.from_generation_config(QWEN_1_8B_CHAT, top_p=2.0)
    with pytest.raises(ValueError, match="SamplingParams.temperature must be"):
        SamplingParams.from_generation_config(QWEN_1_8B_CHAT, do_sample=False, temperature=-1.0)


# --- processors -------------------------------------------------------------------------------------------------


def test_mask_invalid():
    logits = random_logits(2, 10)
    out = mask_invalid(logits, 7)
    assert torch.equal(out[:, :7], logits[:, :7]) and torch.all(out[:, 7:] == -math.inf)
    assert torch.isfinite(logits).all()  # input untouched
    assert mask_invalid(logits, 10) is logits
    with pytest.raises(ValueError, match="valid_vocab_size"):
        mask_invalid(logits, 0)


def penalty_loop(logits: torch.Tensor, context: list[list[int]], penalty: list[float]) -> torch.Tensor:
    out = logits.clone()
    for row, ids in enumerate(context):
        for token in set(ids):
            value = out[row, token]
            out[row, token] = value / penalty[row] if value > 0 else value * penalty[row]
    return out


def test_repetition_penalty_matches_loop_and_transformers():
    logits = random_logits(3, 40)
    logits[0, 5] = 0.0
    context = [[5, 5, 7, 39, 7], [0, 1, 2, 3, 4], [12, 12, 12, 12, 12]]
    ids = torch.tensor(context)
    seen = build_seen_mask(ids, 40)
    expected = penalty_loop(logits, context, [1.3] * 3)
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected, rtol=0, atol=0)
    hf = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), hf, rtol=0, atol=0)
    per_row = apply_repetition_penalty(logits, seen, torch.tensor([1.3, 0.5, 2.0]))
    torch.testing.assert_close(per_row, penalty_loop(logits, context, [1.3, 0.5, 2.0]), rtol=0, atol=0)
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_seen_mask_padding_and_incremental_update():
    pad = 9
    ids = torch.tensor([[1, 2, pad, pad], [pad, 3, 3, 0]])
    seen = build_seen_mask(ids, 10, pad_id=pad)
    assert seen.tolist() == [
        [i in (1, 2) for i in range(10)],
        [i in (0, 3) for i in range(10)],
    ]
    update_seen_mask(seen, torch.tensor([4, 3]))  # one new token per row, in place
    assert seen.nonzero().tolist() == [[0, 1], [0, 2], [0, 4], [1, 0], [1, 3]]
    full = torch.tensor([[1, 2, 4], [0, 3, 3]])
    assert torch.equal(seen, build_seen_mask(full, 10))


def test_temperature_matches_transformers_softmax():
    logits = random_logits(2, 50)
    for t in (0.3, 1.0, 1.7):
        hf = TemperatureLogitsWarper(t)(None, logits.clone())
        torch.testing.assert_close(apply_temperature(logits, t).softmax(-1), hf.softmax(-1))
    per_row = apply_temperature(logits, torch.tensor([0.3, 1.7]))
    torch.testing.assert_close(per_row.softmax(-1)[1], (logits[1] / 1.7).softmax(-1))
    tiny = apply_temperature(logits, 1e-40)  # would overflow to +inf without the max shift
    assert not tiny.softmax(-1).isnan().any()
    assert torch.equal(tiny.softmax(-1).argmax(-1), logits.argmax(-1))


@settings(max_examples=60, deadline=None)
@given(vocab=st.integers(1, 30), k=st.integers(0, 35), seed=st.integers(0, 10_000), ties=st.booleans())
def test_top_k_keeps_exactly_k_best_lowest_ids_on_ties(vocab, k, seed, ties):
    logits = random_logits(2, vocab, seed)
    if ties:
        logits = logits.round()
    out = apply_top_k(logits, k)
    expect = min(k, vocab) if k > 0 else vocab
    assert (kept(out).sum(-1) == expect).all()
    for row in range(2):
        # The kept set is the first `expect` ids in (logit descending, id ascending) order.
        order = sorted(range(vocab), key=lambda i: (-logits[row, i].item(), i))
        assert set(kept(out[row]).nonzero().view(-1).tolist()) == set(order[:expect])
    assert torch.equal(out[kept(out)], logits[kept(out)])


def test_top_k_matches_transformers_without_ties_and_per_row():
    logits = random_logits(3, 100)
    for k in (1, 5, 50):
        hf = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(apply_top_k(logits, k), hf)
    per_row = apply_top_k(logits, torch.tensor([1, 0, 7]))
    for row, k in enumerate([1, 0, 7]):
        assert torch.equal(per_row[row], apply_top_k(logits[row : row + 1], k)[0])


def top_p_reference(logits: torch.Tensor, p: float) -> set[int]:
    probs = logits.softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    chosen, total = [], 0.0
    for i in order:
        chosen.append(i)
        total += probs[i]
        if total >= p:
            break
    return set(chosen)


@settings(max_examples=60, deadline=None)
@given(vocab=st.integers(1, 30), p=st.floats(0.01, 1.0), seed=st.integers(0, 10_000), ties=st.booleans())
def test_top_p_keeps_smallest_nucleus(vocab, p, seed, ties):
    logits = random_logits(1, vocab, seed)
    if ties:
        logits = logits.round()
    out = apply_top_p(logits, p)
    kept_ids = set(kept(out[0]).nonzero().view(-1).tolist())
    assert len(kept_ids) >= 1
    probs = logits[0].softmax(-1)
    # Smallest set: dropping the least likely kept id would leave less than p (up to rounding).
    mass = probs[sorted(kept_ids)].sum().item()
    assert mass >= p - 1e-5 or len(kept_ids) == vocab
    assert mass - probs[sorted(kept_ids)].min().item() < p + 1e-5
    if not ties:
        assert kept_ids == top_p_reference(logits[0], p) or abs(mass - p) < 1e-5


def test_top_p_ties_are_deterministic_lower_ids_first():
    logits = torch.zeros(1, 10)  # ten equally likely ids
    out = apply_top_p(logits, 0.25)
    assert kept(out[0]).nonzero().view(-1).tolist() == [0, 1, 2]


def test_top_p_matches_transformers_and_per_row():
    logits = random_logits(3, 200)
    for p in (0.1, 0.5, 0.8, 0.95):
        hf = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(kept(apply_top_p(logits, p)), kept(hf))
    assert apply_top_p(logits, 1.0) is logits
    per_row = apply_top_p(logits, torch.tensor([0.5, 1.0, 0.9]))
    for row, p in enumerate([0.5, 1.0, 0.9]):
        assert torch.equal(per_row[row], apply_top_p(logits[row : row + 1], p)[0])


def test_process_logits_follows_transformers_order():
    logits = random_logits(2, 300, seed=4)
    ids = torch.tensor([[3, 17, 17, 250], [1, 2, 3, 4]])
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.8, repetition_penalty=1.1)
    ours = process_logits(logits, params, seen_mask=build_seen_mask(ids, 300), valid_vocab_size=290)
    hf = logits.clone()
    hf[:, 290:] = -math.inf
    hf = RepetitionPenaltyLogitsProcessor(1.1)(ids, hf)
    for warp in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.8)):
        hf = warp(ids, hf)
    assert torch.equal(kept(ours), kept(hf))
    torch.testing.assert_close(ours.softmax(-1), hf.softmax(-1))


# --- sample() ---------------------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_and_consumes_no_randomness():
    logits = random_logits(4, 1000)
    generator = make_generator(0, "cpu")
    state = generator.get_state()
    tokens = sample(logits, SamplingParams(temperature=0, top_k=5, top_p=0.3), generator)
    assert torch.equal(tokens, logits.argmax(-1)) and tokens.dtype == torch.long
    assert torch.equal(generator.get_state(), state)


def test_greedy_with_repetition_penalty_is_argmax_of_penalised_logits():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = build_seen_mask(torch.tensor([[0]]), 3)
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=1.1), seen_mask=seen).item() == 1
    with pytest.raises(ValueError, match="needs seen_mask"):
        sample(logits, SamplingParams(temperature=0, repetition_penalty=1.1))


def many_draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    # n independent draws from the same distribution, in one batched call.
    return sample(logits.expand(n, -1), params, make_generator(seed, "cpu"))


def test_top_k_never_samples_a_removed_token():
    logits = random_logits(1, 100, seed=1)
    draws = many_draws(logits, SamplingParams(top_k=3, temperature=2.0), 5000)
    assert set(draws.tolist()) == set(logits[0].topk(3).indices.tolist())


def test_top_p_never_samples_a_removed_token():
    logits = random_logits(1, 100, seed=2)
    allowed = top_p_reference(logits[0], 0.6)
    draws = many_draws(logits, SamplingParams(top_p=0.6), 5000)
    assert set(draws.tolist()) <= allowed and len(set(draws.tolist())) > 1


def test_draw_frequencies_follow_renormalised_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = many_draws(logits, SamplingParams(top_k=2), 20_000)
    expected = torch.tensor([2.0, 1.0]).softmax(-1)
    observed = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert observed[2:].sum() == 0
    torch.testing.assert_close(observed[:2], expected, atol=0.02, rtol=0)


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(1, 500, seed=3)
    params = SamplingParams(temperature=1.5)
    assert torch.equal(many_draws(logits, params, 200, seed=5), many_draws(logits, params, 200, seed=5))
    assert not torch.equal(many_draws(logits, params, 200, seed=5), many_draws(logits, params, 200, seed=6))


def test_padding_ids_never_chosen_even_with_highest_logit():
    logits = random_logits(2, MODEL_VOCAB)
    logits[:, VALID_VOCAB:] = 1e4
    greedy = sample(logits, SamplingParams(temperature=0), valid_vocab_size=VALID_VOCAB)
    assert (greedy < VALID_VOCAB).all()
    logits[:, VALID_VOCAB - 1] = 1e4 - 5  # the best valid id; every padding id beats it
    draws = sample(
        logits[:1].expand(64, -1),
        SamplingParams(temperature=3.0),
        make_generator(0, "cpu"),
        valid_vocab_size=VALID_VOCAB,
    )
    assert (draws == VALID_VOCAB - 1).all()


def test_per_row_params_and_generators_match_rows_run_alone():
    logits = random_logits(4, 300, seed=9)
    ids = torch.tensor([[5, 6, 7]] * 4)
    rows = [
        SamplingParams(temperature=0.8, top_p=0.8, repetition_penalty=1.1, seed=1),
        SamplingParams(temperature=0, repetition_penalty=1.3),
        SamplingParams(temperature=1.2, top_k=5, seed=2),
        SamplingParams(temperature=0.5, top_k=50, top_p=0.9, seed=3),
    ]
    seen = build_seen_mask(ids, 300)
    for _ in range(5):
        generators = [make_generator(p.seed, "cpu") for p in rows]
        batch = sample(logits, rows, generators, seen_mask=seen, valid_vocab_size=290)
        alone = [
            sample(
                logits[i : i + 1],
                p,
                make_generator(p.seed, "cpu"),
                seen_mask=seen[i : i + 1],
                valid_vocab_size=290,
            )
            for i, p in enumerate(rows)
        ]
        assert batch.tolist() == torch.cat(alone).tolist()
        logits = logits.roll(1, dims=-1)


def test_per_row_batch_with_one_generator_is_reproducible():
    logits = random_logits(3, 100)
    rows = [SamplingParams(top_k=1), SamplingParams(temperature=0), SamplingParams(top_p=0.01)]
    tokens = sample(logits, rows, make_generator(0, "cpu"))
    assert torch.equal(tokens, logits.argmax(-1))  # each row's setting leaves only the argmax


def test_params_count_must_match_batch():
    with pytest.raises(ValueError, match="2 SamplingParams for a batch of 3"):
        sample(random_logits(3, 10), [SamplingParams()] * 2)


def test_make_generator_unseeded_differs():
    a, b = make_generator(None, "cpu"), make_generator(None, "cpu")
    assert a.initial_seed() != b.initial_seed()
    assert make_generator(7, "cpu").initial_seed() == 7


@pytest.mark.parametrize(("peak", "fast_path"), [(0.0, False), (20.0, True), (30.0, True)])
def test_top_p_candidate_path_equals_full_sort(monkeypatch, peak, fast_path):
    # Wide rows (the real vocabulary) with peaked, mildly peaked and flat distributions, plus exact ties.
    gen = torch.Generator().manual_seed(int(peak))
    logits = torch.randn(3, 151936, generator=gen)
    logits[:, :50] += peak * torch.rand(3, 50, generator=gen)
    logits[:, 100:110] = logits[:, 0:1]  # ties with a top id
    for top_p in (0.5, 0.8, 0.95, torch.tensor([0.3, 0.8, 0.99])):
        assert (
            sampling._top_p_among_candidates(logits, logits.softmax(-1), sampling._per_row(top_p, logits)) is not None
        ) == fast_path
        fast = sampling.apply_top_p(logits, top_p)
        with monkeypatch.context() as m:
            m.setattr(sampling, "_TOP_P_CANDIDATES", (10**9,))  # forces the full sort
            full = sampling.apply_top_p(logits, top_p)
        assert torch.equal(torch.isinf(fast), torch.isinf(full))


@pytest.mark.parametrize("scale", [2.5, 3.0, 3.5])
def test_top_p_wider_candidates_equal_full_sort(monkeypatch, scale):
    """Nuclei of a few thousand ids (beyond the first 1,024 candidates): the wider candidate set must give the
    full sort's answer, and must be what runs for them (the full sort costs ~15 ms a row)."""
    gen = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(2, 151936, generator=gen) * scale
    logits[:, 5000:5020] = logits[:, 7:8]  # a tie group
    for top_p in (0.5, 0.8, torch.tensor([0.6, 0.9])):
        rows = sampling._per_row(top_p, logits)
        fast = sampling.apply_top_p(logits, top_p)
        with monkeypatch.context() as m:
            m.setattr(sampling, "_TOP_P_CANDIDATES", (10**9,))
            full = sampling.apply_top_p(logits, top_p)
        assert torch.equal(fast, full)
        kept = (~torch.isinf(full)).sum(-1)
        with monkeypatch.context() as m:
            m.setattr(sampling, "_TOP_P_CANDIDATES", (1024,))  # the first width alone
            narrow = sampling._top_p_among_candidates(logits, logits.softmax(-1), rows)
        wide = sampling._top_p_among_candidates(logits, logits.softmax(-1), rows)
        if bool((kept > 1024).any()) and bool((kept < 8192).all()):
            assert narrow is None and wide is not None  # the second width took it


def test_top_p_candidates_equal_full_sort_random_rows(monkeypatch):
    """Rows of the real width with nuclei from one id to tens of thousands, ties and -inf ids: the candidate
    paths give exactly the full sort's output, whichever width (or none) takes the row."""
    gen = torch.Generator().manual_seed(11)
    for case in range(12):
        scale = float(torch.empty(1).uniform_(0.5, 6.0, generator=gen))
        logits = torch.randn(3, 151936, generator=gen) * scale
        logits[:, 1000:1200] = logits[:, 3:4]  # a tie group with a likely member of the nucleus
        logits[1, 50000:] = -math.inf  # a masked tail (as mask_invalid leaves it)
        top_p = torch.empty(3).uniform_(0.05, 0.999, generator=gen) if case % 2 else 0.8
        fast = sampling.apply_top_p(logits, top_p)
        with monkeypatch.context() as m:
            m.setattr(sampling, "_TOP_P_CANDIDATES", (10**9,))
            full = sampling.apply_top_p(logits, top_p)
        assert torch.equal(fast, full), (case, scale)


def test_top_p_flat_row_skips_the_wider_candidates(monkeypatch):
    # A flat row's first candidates cannot grow into 0.8 of the mass within the next width: one topk only.
    logits = torch.randn(1, 151936, generator=torch.Generator().manual_seed(3))
    widths = []
    real_topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda t, k, **kw: widths.append(k) or real_topk(t, k, **kw))
    assert sampling._top_p_among_candidates(logits, logits.softmax(-1), sampling._per_row(0.8, logits)) is None
    assert widths == [sampling._TOP_P_CANDIDATES[0]]


def test_draw_over_kept_ids_has_the_rows_distribution():
    """The draw runs torch.multinomial over the ids the filters kept: same distribution, never a removed id,
    reproducible per seed; dense rows (most ids kept) take the whole-row draw."""
    vocab = 151936
    probs = torch.zeros(vocab)
    kept = torch.tensor([3, 77, 5000, 151935])
    probs[kept] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sampling._draw_one(probs, gen) for _ in range(4000)])
    assert set(draws.tolist()) <= set(kept.tolist())
    freq = torch.stack([(draws == k).float().mean() for k in kept])
    assert torch.allclose(freq, probs[kept], atol=0.03)  # ~5 sigma at 4,000 draws
    again = torch.Generator().manual_seed(0)
    assert torch.equal(draws[:50], torch.cat([sampling._draw_one(probs, again) for _ in range(50)]))
    dense = torch.rand(1000, generator=gen)
    dense[::7] = 0
    picks = torch.cat([sampling._draw_one(dense / dense.sum(), gen) for _ in range(500)])
    assert bool((dense[picks] > 0).all())


def test_batch_draws_with_one_generator_are_reproducible_and_per_row_generators_independent():
    logits = random_logits(3, 151936) * 8
    params = SamplingParams(top_p=0.8)
    a = sample(logits, params, make_generator(5, "cpu"))
    b = sample(logits, params, make_generator(5, "cpu"))
    assert torch.equal(a, b)
    rows = [make_generator(s, "cpu") for s in (1, 2, 3)]
    alone = sample(logits[1:2], params, [make_generator(2, "cpu")])
    assert sample(logits, params, rows)[1] == alone[0]
