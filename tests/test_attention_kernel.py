"""Attention over a KV cache: the C++ decode kernel (csrc/attention.cpp) and its PyTorch fallback against fp64
reference math, and the model with the kernel against the model without it.

Reference: SDPA in fp64 over the values the cache holds (bf16/fp16 widened, int8 dequantized with its scales), so
the int8 case checks that the kernel applies the scales exactly, not the quantizer. Tolerances (outputs are
softmax averages of N(0, 1) values, |out| < ~4): fp32/bf16/fp16 caches, max abs error <= 2e-5 at every length
from 1 to 9,000 keys (measured <= ~4e-7); int8 caches <= 2e-4 (q is quantized to int16 per row for the int32 key
dot products: score error ~|q|max * sum|k| / 65534; measured <= 7e-5, against ~1e-2 for the int8 cache's own
rounding); bf16 queries give a bf16 output, held to bf16 rounding (2**-8 relative). The
kernel tests run once per kernel set this CPU executes (avx512 is skipped on an AVX2-only machine) and are
skipped where the extension does not build; the fallback tests run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from qwenkit import kernels
from qwenkit.kernels import cpu, isa
from qwenkit.model.kv_cache import KVCache, quantize_int8

RUNNABLE = isa.runnable_sets(isa.cpu_flags())
FAST = cpu.available()
BUILT = [name for name in RUNNABLE if FAST and cpu.ops_for(name) is not None]
needs_fast = pytest.mark.skipif(not BUILT, reason="qwenkit C++ CPU kernels not built here")
ATOL = 2e-5
ATOL_INT8 = 2e-4
LENGTHS = [1, 2, 63, 64, 65, 1000, 4097, 9000]
KINDS = ["fp32", "bf16", "fp16", "int8"]


@pytest.fixture(params=[*BUILT, *(n for n in isa.BY_NAME if n not in BUILT)])
def kset(request, monkeypatch):
    """Each kernel set: run where built for this CPU, skipped (with the reason) where not."""
    if request.param not in RUNNABLE:
        missing = ", ".join(isa.missing_flags(request.param, isa.cpu_flags()))
        pytest.skip(f"kernel set {request.param}: this CPU lacks {missing}")
    if request.param not in BUILT:
        pytest.skip(f"kernel set {request.param} did not build here")
    monkeypatch.setenv(isa.ISA_ENV, request.param)
    assert cpu.kernel_set() == request.param
    return request.param


def _cache_window(kind: str, b: int, h: int, s: int, d: int, seed: int):
    """Random keys/values stored as `kind`: (k, v, k_scale, v_scale) as the kernel takes them, and the fp64
    values they stand for."""
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, h, s, d, generator=gen), torch.randn(b, h, s, d, generator=gen)
    if kind == "int8":
        (k8, ks), (v8, vs) = quantize_int8(k), quantize_int8(v)
        exact = kernels.dequantize_int8_rows(k8, ks).double(), kernels.dequantize_int8_rows(v8, vs).double()
        return (k8, v8, ks, vs), exact
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
    k, v = k.to(dtype), v.to(dtype)
    return (k, v, None, None), (k.double(), v.double())


def _expected(q, exact, lengths):
    return kernels.reference_cached_attention(q.double(), *exact, lengths)


def _lengths(b: int, t: int, s: int, seed: int) -> torch.Tensor:
    """Row 0 ends at the window (queries at s - t .. s - 1, like a decode of t tokens); other rows end earlier
    at random (rows of different lengths), each row's queries at consecutive positions."""
    gen = torch.Generator().manual_seed(seed)
    ends = [s, *torch.randint(1, s + 1, (b - 1,), generator=gen).tolist()]
    return torch.tensor([[max(1, e - t + 1 + i) for i in range(t)] for e in ends])


@needs_fast
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("s", LENGTHS)
def test_kernel_equals_sdpa(kset, kind, s):
    for t in (1, 3):
        (k, v, ks, vs), exact = _cache_window(kind, 2, 3, s, 128, seed=s + t)
        q = torch.randn(2, 3, t, 128, generator=torch.Generator().manual_seed(t))
        lengths = _lengths(2, t, s, seed=s)
        out = cpu.decode_attention(q, k, v, lengths, ks, vs)
        assert out is not None and out.shape == q.shape and out.dtype == q.dtype
        err = (out.double() - _expected(q, exact, lengths)).abs().max().item()
        tol = ATOL_INT8 if kind == "int8" else ATOL
        assert err <= tol, f"{kset} {kind} S={s} T={t}: max abs error {err:.2e}"


@needs_fast
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_kernel_masks_padded_rows_and_many_queries(kset, kind):
    """Per-query lengths in any order, a row of zero length (a padded row: zeros), T up to 16 (two passes over
    the keys), head sizes that are not a multiple of the vector width (scalar tails)."""
    for d, t in ((128, 16), (40, 5), (16, 9), (8, 1)):
        (k, v, ks, vs), exact = _cache_window(kind, 3, 2, 300, d, seed=d)
        q = torch.randn(3, 2, t, d)
        lengths = torch.randint(1, 301, (3, t))
        lengths[1] = 0  # padded row
        lengths[2, 0] = 300
        out = cpu.decode_attention(q, k, v, lengths, ks, vs)
        assert (out[1] == 0).all()
        err = (out.double() - _expected(q, exact, lengths)).abs().max().item()
        tol = ATOL_INT8 if kind == "int8" else ATOL
        assert err <= tol, f"{kset} {kind} D={d} T={t}: max abs error {err:.2e}"


@needs_fast
def test_int8_kernel_takes_prefill_chunks(kset):
    """Over an int8 cache the kernel takes any number of queries (a prefill chunk: causal lengths, a padded row,
    a row that starts mid-window), and a query's result does not depend on the others in its call: the same
    positions give the same bits whether they come as one chunk or as several (what prefix reuse relies on)."""
    (k, v, ks, vs), exact = _cache_window("int8", 3, 2, 700, 128, seed=7)
    t = 200
    lengths = torch.stack([torch.arange(501, 701), torch.arange(1, 201), torch.arange(301, 501)])
    lengths[1, 150:] = 0  # padding past row 1's end
    q = torch.randn(3, 2, t, 128, generator=torch.Generator().manual_seed(8))
    out = cpu.decode_attention(q, k, v, lengths, ks, vs)
    assert out is not None and out.shape == q.shape
    assert (out[1, :, 150:] == 0).all()
    err = (out.double() - _expected(q, exact, lengths)).abs().max().item()
    assert err <= ATOL_INT8, f"{kset} T={t}: max abs error {err:.2e}"
    parts = [
        cpu.decode_attention(q[:, :, a:b], k, v, lengths[:, a:b].contiguous(), ks, vs)
        for a, b in ((0, 7), (7, 120), (120, 200))
    ]
    assert torch.equal(torch.cat(parts, dim=2), out)


@needs_fast
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_kernel_reads_cache_views(kset, kind):
    """The model's case: a window of a longer KVCache (strided rows and heads), bf16 queries as a transposed
    view of [B, T, H, D], per-row positions."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[kind]
    cache = KVCache(2, 3, 4, 512, 64, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    positions = torch.stack([torch.arange(0, 200), torch.arange(0, 200), torch.arange(0, 200)])
    cache.write_tokens(
        1, positions, torch.randn(3, 4, 200, 64, generator=gen), torch.randn(3, 4, 200, 64, generator=gen)
    )
    k, v, *scales = cache.layer_view(1, 3, 200)
    exact = (
        (kernels.dequantize_int8_rows(k, scales[0]), kernels.dequantize_int8_rows(v, scales[1]))
        if scales
        else (k, v)
    )
    exact = tuple(x.double() for x in exact)
    q = torch.randn(3, 1, 4, 64, generator=gen).bfloat16().transpose(1, 2)  # [B, H, T, D], not contiguous
    lengths = torch.tensor([[200], [7], [1]])
    out = cpu.decode_attention(q, k, v, lengths, *scales)
    ref = _expected(q, exact, lengths)
    atol = ATOL_INT8 if kind == "int8" else ATOL
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=atol)  # bf16 rounding: <= 2**-9 relative


@needs_fast
def test_kernel_rejects_lengths_past_the_window(kset):
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 10, 16)
    with pytest.raises(RuntimeError, match="lengths must lie in"):
        cpu.decode_attention(q, k, k, torch.tensor([[11]]))


def test_kernel_does_not_apply(monkeypatch):
    """Where the kernel is not used (None): prefill-sized T over a float cache, autograd, the extension off. The
    dispatcher's fallback then gives the reference result (and gradients)."""
    (k, v, _, _), exact = _cache_window("fp32", 1, 2, 50, 16, seed=0)
    lengths = torch.full((1, 17), 50)
    q = torch.randn(1, 2, 17, 16)
    assert cpu.decode_attention(q, k, v, lengths) is None
    qg = torch.randn(1, 2, 1, 16, requires_grad=True)
    assert cpu.decode_attention(qg, k, v, lengths[:, :1]) is None
    kernels.cached_attention(qg, k, v, lengths[:, :1]).sum().backward()
    assert qg.grad is not None
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    assert cpu.decode_attention(q[:, :, :1], k, v, lengths[:, :1]) is None


@pytest.mark.parametrize("kind", KINDS)
def test_fallback_without_extension_equals_sdpa(monkeypatch, kind):
    """QWENKIT_DISABLE_EXT=1: `cached_attention` is SDPA in the cache's dtype (fp32 over a dequantized int8
    window), zeros for a row that sees no key. bf16/fp16 caches run SDPA in that dtype: bf16/fp16 rounding."""
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    (k, v, ks, vs), exact = _cache_window(kind, 2, 3, 1000, 64, seed=1)
    q = torch.randn(2, 3, 2, 64)
    lengths = torch.tensor([[999, 1000], [0, 0]])
    out = kernels.cached_attention(q, k, v, lengths, ks, vs)
    assert (out[1] == 0).all()
    tol = {"fp32": ATOL, "int8": ATOL, "bf16": 2e-2, "fp16": 2e-3}[kind]
    assert (out.double() - _expected(q, exact, lengths)).abs().max().item() <= tol


# ---------------------------------------------------------------- the model with and without the kernel


@torch.inference_mode()
def _decode_logits(model, kind):
    """Logits of a 40-token prefill and 12 decode steps of two rows at different positions."""
    ids = torch.randint(0, 1000, (2, 60), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2, 80, dtype=kind)
    out = [model(ids[:, :40], cache=cache)[:, -1]]
    for step in range(12):
        pos = torch.tensor([[40 + step], [30 + step]])
        out.append(model(ids[:, 40 + step : 41 + step], pos, cache, ntk_alpha=1.0)[:, 0])
    return torch.stack(out)


@needs_fast
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_model_with_kernel_equals_without(make_tiny_model, greedy_ids, monkeypatch, kind):
    """Greedy ids identical with the kernel and with the dispatcher's SDPA path (prompts of different lengths, a
    prompt crossing seq_length: NTK + logn); decode logits (std ~1) within 1e-4 for the fp32 cache, 5e-3 for
    int8 (the kernel's int16 q; measured 1.7e-3, against 0.024 between the int8 and fp32 caches) and 2e-2 for
    bf16 (the SDPA path runs in bf16)."""
    model = make_tiny_model(seq_length=64)
    prompts = [list(range(5, 45)), list(range(100, 170)), [7, 8, 9]]
    calls = []
    real = cpu.decode_attention
    monkeypatch.setattr(cpu, "decode_attention", lambda *a: calls.append(1) or real(*a))
    with_kernel, logits_kernel = greedy_ids(model, prompts, kind), _decode_logits(model, kind)
    assert calls, "the model did not take the kernel"
    monkeypatch.setattr(cpu, "decode_attention", lambda *a: None)
    without, logits_sdpa = greedy_ids(model, prompts, kind), _decode_logits(model, kind)
    assert with_kernel == without
    tol = {"fp32": 1e-4, "int8": 5e-3, "bf16": 2e-2}[kind]
    assert (logits_kernel - logits_sdpa).abs().max().item() <= tol
