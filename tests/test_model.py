"""Model, KV cache and config tests: parity with transformers' Qwen2 (same math, different code) on tiny random
weights in fp32, cached decode and chunked prefill against full recompute, output_index, bf16, and user errors."""

from __future__ import annotations

import json

import pytest
import torch

from qwenkit.checkpoints.interop import qwen2_config_kwargs, to_qwen2_state_dict
from qwenkit.model.config import PRESET_NAMES, QwenConfig, preset
from qwenkit.model.kv_cache import KVCache
from qwenkit.model.transformer import QWenLMHeadModel

ATOL = 1e-4


def _hf_model(model: QWenLMHeadModel, attn: str = "eager"):
    """transformers' Qwen2ForCausalLM carrying our weights (c_attn split, w2 is the gate)."""
    transformers = pytest.importorskip("transformers")
    c = model.config
    hf_config = transformers.Qwen2Config(**{**qwen2_config_kwargs(c), "tie_word_embeddings": False})
    hf_config._attn_implementation = attn
    hf = transformers.Qwen2ForCausalLM(hf_config).eval()
    sd = to_qwen2_state_dict(model.state_dict(), c)
    hf.load_state_dict(sd, strict=True)
    return hf


@torch.no_grad()
def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=ids).logits.float()


def _ids(gen: torch.Generator, *shape: int, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=gen)


# ---- parity with transformers -------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("seq_length", [8192, 32])
@torch.no_grad()
def test_parity_single_sequence(make_tiny_model, attn, seq_length):
    # seq_length 32 with 32 tokens: dynamic NTK and logn are on but must not change anything within seq_length.
    model = make_tiny_model(seq_length=seq_length)
    hf = _hf_model(model, attn)
    ids = _ids(torch.Generator().manual_seed(1), 1, 32)
    ours = model(ids)
    assert ours.dtype == torch.float32 and ours.shape == (1, 32, 1000)
    assert (ours - _hf_logits(hf, ids)).abs().max() <= ATOL


@torch.no_grad()
def test_parity_right_padded_batch(make_tiny_model):
    model = make_tiny_model()
    hf = _hf_model(model)
    gen = torch.Generator().manual_seed(2)
    lengths = [5, 17, 11]
    ids = _ids(gen, len(lengths), max(lengths))  # the tail of each short row is padding garbage
    ours = model(ids)
    for row, n in enumerate(lengths):
        ref = _hf_logits(hf, ids[row : row + 1, :n])[0]
        assert (ours[row, :n] - ref).abs().max() <= ATOL


@torch.no_grad()
def test_cached_prefill_then_decode_matches_full(make_tiny_model):
    model = make_tiny_model()
    hf = _hf_model(model)
    ids = _ids(torch.Generator().manual_seed(3), 1, 24)
    full = _hf_logits(hf, ids)
    cache = model.new_cache(1, 64)
    prefill = model(ids[:, :10], cache=cache)
    assert (prefill - full[:, :10]).abs().max() <= ATOL
    for t in range(10, 24):
        step = model(ids[:, t : t + 1], positions=torch.tensor([[t]]), cache=cache)
        assert (step[:, 0] - full[:, t]).abs().max() <= ATOL


@torch.no_grad()
def test_cached_batch_with_different_lengths(make_tiny_model):
    # Right-padded prefill, then decode where every row sits at its own position.
    model = make_tiny_model()
    hf = _hf_model(model)
    gen = torch.Generator().manual_seed(4)
    lengths = torch.tensor([3, 12, 7])
    total = 20
    seqs = _ids(gen, 3, total)
    cache = model.new_cache(4, 32)
    prefill_len = int(lengths.max())
    prefill = model(seqs[:, :prefill_len], cache=cache, ntk_alpha=1.0)
    refs = [_hf_logits(hf, seqs[row : row + 1])[0] for row in range(3)]
    for row in range(3):
        n = int(lengths[row])
        assert (prefill[row, :n] - refs[row][:n]).abs().max() <= ATOL
    for i in range(total - prefill_len):
        pos = lengths + i  # [B], each row continues right after its own prompt
        step = model(seqs.gather(1, pos[:, None]), positions=pos[:, None], cache=cache, ntk_alpha=1.0)
        for row in range(3):
            assert (step[row, 0] - refs[row][int(pos[row])]).abs().max() <= ATOL


@torch.no_grad()
def test_chunked_prefill_matches_full(make_tiny_model):
    model = make_tiny_model()
    ids = _ids(torch.Generator().manual_seed(5), 2, 30)
    full = model(ids)
    cache = model.new_cache(2, 30)
    chunks = []
    for start, stop in ((0, 7), (7, 19), (19, 30)):
        pos = torch.arange(start, stop).expand(2, -1)
        chunks.append(model(ids[:, start:stop], positions=pos, cache=cache))
    assert (torch.cat(chunks, dim=1) - full).abs().max() <= ATOL


@torch.no_grad()
def test_output_index(make_tiny_model):
    model = make_tiny_model()
    ids = _ids(torch.Generator().manual_seed(6), 3, 9)
    full = model(ids)
    index = torch.tensor([0, 8, 4])
    picked = model(ids, output_index=index)
    assert picked.shape == (3, 1000) and picked.dtype == torch.float32
    assert (picked - full[torch.arange(3), index]).abs().max() <= ATOL
    cache = model.new_cache(3, 16)
    assert (model(ids, cache=cache, output_index=index) - picked).abs().max() <= ATOL


@torch.no_grad()
@pytest.mark.parametrize("kv", [None, "fp32", "bf16", "int8", "int8-logn"])
def test_input_lengths_skip_the_padding(make_tiny_model, kv, monkeypatch):
    """Right-padded rows with `input_lengths`: each row's logits (all positions, or at output_index) and cache
    entries equal that row run alone; the linear layers see only the real tokens; the padding's cache is zeros.
    int8-logn: seq_length 4, so positions past it take logn scaling and NTK alpha (given per row)."""
    logn = kv == "int8-logn"
    kv = "int8" if logn else kv
    model = make_tiny_model(**({"seq_length": 4} if logn else {}))
    assert not logn or (model.config.use_logn_attn and model.config.use_dynamic_ntk)
    ids = _ids(torch.Generator().manual_seed(11), 3, 9)
    lengths = torch.tensor([9, 4, 6])
    rows_seen: list[int] = []
    real_forward = type(model.lm_head).forward
    monkeypatch.setattr(
        type(model.transformer.h[0].mlp.w1), "forward",
        lambda self, x: rows_seen.append(x.reshape(-1, x.shape[-1]).shape[0]) or real_forward(self, x),
    )  # fmt: skip
    positions = torch.arange(9).expand(3, -1)
    if kv is None:
        out = model(ids, input_lengths=lengths)
        assert out.shape == (3, 9, 1000)
        for b, n in enumerate(lengths.tolist()):
            assert (out[b, :n] - model(ids[b : b + 1, :n])[0]).abs().max() <= ATOL
    else:
        cache = model.new_cache(3, 16, dtype=kv)
        alpha = torch.tensor([model.ntk_alpha(n) for n in lengths.tolist()])
        rows_seen.clear()
        out = model(ids, positions, cache, alpha, output_index=lengths - 1, input_lengths=lengths)
        assert rows_seen[0] == int(lengths.sum())  # the first linear layer ran on the 19 real tokens, not 27
        for b, n in enumerate(lengths.tolist()):
            alone = model.new_cache(1, 16, dtype=kv)
            last = torch.tensor([n - 1])
            ref = model(ids[b : b + 1, :n], cache=alone, ntk_alpha=alpha[b : b + 1], output_index=last)
            assert (out[b] - ref[0]).abs().max() <= ATOL
            for part, part_alone in zip(cache.parts, alone.parts, strict=True):
                assert (part[:, b, :, :n].float() - part_alone[:, 0, :, :n].float()).abs().max() <= ATOL
                assert (part[:, b, :, n:9] == 0).all()  # padding: zeros, never attended by real queries
    # A row with no real tokens in this chunk (its prompt ended in an earlier one): finite, ignored output.
    empty = model(ids, input_lengths=torch.tensor([0, 4, 6]), output_index=torch.tensor([0, 3, 5]))
    assert torch.isfinite(empty).all()


@pytest.mark.parametrize(
    "lengths, match",
    [
        (torch.tensor([9, 10, 1]), r"input_lengths must be in \[0, 9\]"),
        (torch.tensor([-1, 2, 3]), r"input_lengths must be in \[0, 9\]"),
        (torch.tensor([1, 2]), r"input_lengths must be an integer tensor \[B\]"),
        (torch.tensor([1.0, 2.0, 3.0]), r"input_lengths must be an integer tensor \[B\]"),
    ],
)
def test_input_lengths_errors(make_tiny_model, lengths, match):
    with pytest.raises(ValueError, match=match):
        make_tiny_model()(_ids(torch.Generator().manual_seed(1), 3, 9), input_lengths=lengths)


@torch.no_grad()
def test_bf16_close_to_fp32(make_tiny_model):
    # Metric: relative error norm(bf16 - fp32) / norm(fp32) over all logits of the batch.
    model = make_tiny_model()
    ids = _ids(torch.Generator().manual_seed(7), 2, 16)
    ref = model(ids)
    low = model.to(torch.bfloat16)(ids)
    assert low.dtype == torch.float32
    assert ((low - ref).norm() / ref.norm()).item() <= 2e-2
    # On CPU the cache defaults to fp32 (faster attention, same values); an explicit bf16 cache works too.
    assert model.new_cache(2, 16).k.dtype == torch.float32
    for cache in (model.new_cache(2, 16), model.new_cache(2, 16, dtype=torch.bfloat16)):
        cached = model(ids, cache=cache)
        assert ((cached - ref).norm() / ref.norm()).item() <= 2e-2


@torch.no_grad()
def test_logits_depend_on_context(make_tiny_model):
    model = make_tiny_model(init="checkpoint")
    ids = _ids(torch.Generator().manual_seed(8), 1, 12)
    changed = ids.clone()
    changed[0, 1] = (ids[0, 1] + 1) % 1000
    assert (model(ids)[0, -1] - model(changed)[0, -1]).abs().max() > 1e-6


def test_tied_embeddings_share_weight(make_tiny_model):
    model = make_tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_meta_construction_has_official_names_and_shapes():
    model = QWenLMHeadModel(preset("1.8b"), device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["transformer.wte.weight"] == (151936, 2048)
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (6144, 2048)
    assert shapes["transformer.h.0.attn.c_attn.bias"] == (6144,)
    assert shapes["transformer.h.23.mlp.w1.weight"] == (5504, 2048)
    assert shapes["transformer.h.23.mlp.c_proj.weight"] == (2048, 5504)
    assert shapes["lm_head.weight"] == (151936, 2048)
    assert "transformer.h.0.attn.c_proj.bias" not in shapes
    assert len(shapes) == 3 + 24 * 8
    assert 1.8e9 < sum(p.numel() for p in model.parameters()) < 1.9e9


def test_ntk_alpha(make_tiny_model):
    model = make_tiny_model(seq_length=32)
    assert [model.ntk_alpha(n) for n in (1, 32, 33, 64, 65, 130)] == [1.0, 1.0, 3.0, 3.0, 7.0, 15.0]
    assert make_tiny_model(seq_length=32, use_dynamic_ntk=False).ntk_alpha(130) == 1.0


# ---- errors ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_user_errors(make_tiny_model):
    model = make_tiny_model()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 1000\)"):
        model(torch.tensor([[1, 1000]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"ids\[None\]"):
        model(torch.tensor([1, 2]))
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="max_seq_len >= 10"):
        model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len >= 9"):
        model(torch.zeros(1, 1, dtype=torch.long), positions=torch.tensor([[8]]), cache=cache)
    with pytest.raises(ValueError, match="max_batch_size >= 2"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="output_index"):
        model(torch.zeros(1, 3, dtype=torch.long), output_index=torch.tensor([3]))
    with pytest.raises(ValueError, match="positions must be an integer tensor with the shape"):
        model(torch.zeros(1, 3, dtype=torch.long), positions=torch.zeros(1, 2, dtype=torch.long))


def test_kv_cache_update_contract():
    cache = KVCache(2, 3, 2, 8, 4)
    k = torch.randn(2, 2, 3, 4)  # [B, H, T, D]
    v = torch.randn(2, 2, 3, 4)
    pos = torch.tensor([[0, 1, 2], [4, 5, 6]])
    k_out, v_out = cache.update(1, pos, k, v)
    assert k_out.shape == (2, 2, 7, 4)  # S_used = largest position written + 1
    assert torch.equal(k_out[1, :, 4:7], k[1]) and torch.equal(v_out[0, :, 0:3], v[0])
    assert torch.equal(cache.k[1][1, :, 4:7], k[1]) and cache.k[0].abs().sum() == 0
    with pytest.raises(ValueError, match="max_batch_size >= 4"):
        cache.update(0, torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 2, 1, 4), torch.zeros(4, 2, 1, 4))
    with pytest.raises(ValueError, match="max_seq_len >= 9"):
        cache.update(0, torch.tensor([[8]]), torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    cache.reset()
    assert cache.k.abs().sum() == 0


# ---- config -------------------------------------------------------------------------------------------------


def test_config_round_trip_and_official_keys(tmp_path):
    config = preset("1.8b")
    d = config.to_dict()
    assert d["architectures"] == ["QWenLMHeadModel"] and d["model_type"] == "qwen"
    assert d["use_flash_attn"] == "auto" and d["scale_attn_weights"] is True
    assert d["kv_channels"] == 128 and d["seq_length"] == 8192 and d["intermediate_size"] == 11008
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**d, "some_future_key": 1}))
    assert QwenConfig.from_file(path) == config
    assert QwenConfig.from_file(tmp_path) == config
    assert (config.head_dim, config.rotary_dim, config.ffn_hidden) == (128, 128, 5504)
    assert [preset(n).num_hidden_layers for n in PRESET_NAMES] == [2, 24, 32, 40, 80]


def test_config_errors(tmp_path):
    d = preset("1.8b").to_dict()
    with pytest.raises(ValueError, match="missing required keys.*hidden_size"):
        QwenConfig.from_dict({k: v for k, v in d.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="not divisible"):
        QwenConfig.from_dict({**d, "hidden_size": 2050})
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive integer"):
        QwenConfig.from_dict({**d, "num_hidden_layers": "24"})
    no_kv = QwenConfig.from_dict({k: v for k, v in d.items() if k != "kv_channels"})
    assert no_kv.kv_channels == 128
    with pytest.raises(ValueError, match="valid presets: tiny, 1.8b"):
        preset("3b")
    with pytest.raises(FileNotFoundError):
        QwenConfig.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        QwenConfig.from_file(tmp_path / "bad.json")


def test_cache_rows_view_prefills_one_slot(make_tiny_model):
    model = make_tiny_model()
    cache = model.new_cache(3, 32)
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        via_slot = model(ids, cache=cache.rows(2, 3))[0, -1]
        full = model(ids)[0, -1]
    torch.testing.assert_close(via_slot, full, atol=1e-5, rtol=0)
    assert cache.k[:, 2, :, :5].abs().sum() > 0 and cache.k[:, :2].abs().sum() == 0
    with pytest.raises(ValueError, match="rows"):
        cache.rows(2, 4)
