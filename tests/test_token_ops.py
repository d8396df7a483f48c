"""The token-wise C++ kernels (csrc/token_ops.cpp): RMSNorm, and rotary + the KV cache write.

RMSNorm against the official formula (`kernels.reference_rms_norm`): fp32 within 1e-6 relative (the sum of squares
runs in another order), bf16 equal but for one-ulp differences where the fp32 values sit at a rounding boundary.
rotary_kv against the model's own path (apply_rotary, then KVCache.write_tokens): bit for bit, the rotated q and
every cache buffer, for fp32/bf16/fp16/int8 caches, the logn factor, packed tokens, a cache row view and zero
vectors. Each test runs once per kernel set this CPU executes and is skipped where the extension does not build.
"""

from __future__ import annotations

import math

import pytest
import torch

from qwenkit import kernels
from qwenkit.kernels import cpu, isa
from qwenkit.model.kv_cache import KVCache
from qwenkit.model.transformer import apply_rotary, logn_scale, rotary_cos_sin

RUNNABLE = isa.runnable_sets(isa.cpu_flags())
FAST = cpu.available()
BUILT = [name for name in RUNNABLE if FAST and cpu.ops_for(name) is not None]
needs_fast = pytest.mark.skipif(not BUILT, reason="qwenkit C++ CPU kernels not built here")
CACHE_KINDS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


@pytest.fixture(params=BUILT or ["none"])
def kset(request, monkeypatch):
    if request.param == "none":
        pytest.skip("qwenkit C++ CPU kernels not built here")
    monkeypatch.setenv(isa.ISA_ENV, request.param)
    assert cpu.kernel_set() == request.param
    return request.param


@pytest.mark.parametrize("shape", [(1, 2048), (3, 5, 96), (17, 200), (2, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_formula(kset, shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 30).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(dtype)
    y = cpu.rms_norm(x, w, 1e-6)
    ref = kernels.reference_rms_norm(x, w, 1e-6)
    assert y is not None and y.dtype == dtype and y.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    else:  # one bf16 ulp where the fp32 value sits at a rounding boundary; almost all bit-equal
        diff = (y.float() - ref.float()).abs()
        assert (diff <= ref.float().abs() * 2**-7 + 1e-30).all()
        assert (diff == 0).float().mean().item() >= 0.99


def test_rms_norm_edge_values(kset):
    x = torch.tensor([[0.0] * 32, [1e30] * 32, [float("nan")] + [1.0] * 31, [3e-39] * 32])
    w = torch.ones(32)
    torch.testing.assert_close(
        cpu.rms_norm(x, w, 1e-6), kernels.reference_rms_norm(x, w, 1e-6), equal_nan=True
    )


def test_rms_norm_falls_back(kset):
    x = torch.randn(2, 64, requires_grad=True)
    w = torch.ones(64)
    assert cpu.rms_norm(x, w, 1e-6) is None  # autograd: the PyTorch formula, which has a backward
    kernels.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None
    assert cpu.rms_norm(x.detach(), w.bfloat16(), 1e-6) is None  # weight of another dtype


def _rotary_case(dtype, n_tokens, logn, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, d, seq = 4, 64, 16
    qkv = (torch.randn(n_tokens, 3, h, d, generator=g) * 3).to(dtype)
    qkv[0, 1, 2] = 0  # a zero key head: int8 scale 0
    positions = torch.randint(0, 40, (n_tokens,), generator=g)
    alpha = torch.tensor([3.0])
    cos, sin = rotary_cos_sin(positions[None], d, 10000.0, alpha)  # [1, N, 1, D]
    cos, sin = cos[0, :, 0].contiguous(), sin[0, :, 0].contiguous()
    q_scale = logn_scale(positions[None], seq)[0].contiguous() if logn else None
    return qkv, cos, sin, q_scale, positions


def _reference(qkv, cos, sin, q_scale, rows, positions, cache, layer):
    """The model's path for the same tokens: apply_rotary on q|k, then KVCache.write_tokens, token by token."""
    scale = None
    if q_scale is not None:
        scale = torch.stack((q_scale, torch.ones_like(q_scale)), dim=1)[:, :, None, None]  # [N, 2, 1, 1]
    qk = apply_rotary(qkv[:, :2], cos[:, None, None], sin[:, None, None], scale)  # [N, 2, H, D]
    for n in range(qkv.shape[0]):
        r = int(rows[n])
        k, v = qk[n, 1][None, :, None], qkv[n, 2][None, :, None]  # [1, H, 1, D]
        sub = cache.rows(r, r + 1)
        sub.write_tokens(layer, positions[n].view(1, 1), k, v)
    return qk[:, 0]


@pytest.mark.parametrize("kind", list(CACHE_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logn", [False, True])
def test_rotary_kv_is_the_model_path_bit_for_bit(kset, kind, dtype, logn):
    qkv, cos, sin, q_scale, positions = _rotary_case(dtype, 37, logn)
    rows = torch.randint(0, 3, (37,), generator=torch.Generator().manual_seed(1))
    positions = torch.randperm(40, generator=torch.Generator().manual_seed(2))[
        :37
    ]  # no write overlaps another
    ours, ref = (KVCache(2, 3, 4, 40, 64, dtype=CACHE_KINDS[kind]) for _ in range(2))
    q = kernels.rotary_kv(qkv, cos, sin, q_scale, rows, positions, tuple(b[1] for b in ours.parts))
    q_ref = _reference(qkv, cos, sin, q_scale, rows, positions, ref, 1)
    assert q is not None and q.dtype == dtype
    assert torch.equal(q, q_ref)
    for a, b in zip(ours.parts, ref.parts, strict=True):
        assert torch.equal(a, b)


def test_rotary_kv_into_a_row_view(kset):
    """A server slot's view of the cache (KVCache.rows): only that slot's rows change."""
    qkv, cos, sin, _, positions = _rotary_case(torch.bfloat16, 5, False)
    full = KVCache(1, 4, 4, 40, 64, dtype=torch.int8)
    before = [b.clone() for b in full.parts]
    view = full.rows(2, 4)
    rows = torch.tensor([0, 1, 1, 0, 1])
    positions = torch.tensor([3, 4, 5, 6, 7])
    assert (
        kernels.rotary_kv(qkv, cos, sin, None, rows, positions, tuple(b[0] for b in view.parts)) is not None
    )
    for a, b in zip(full.parts, before, strict=True):
        assert torch.equal(a[:, :2], b[:, :2])
        assert not torch.equal(a[:, 2:], b[:, 2:])


def test_rotary_kv_rejects_tokens_outside_the_cache(kset):
    qkv, cos, sin, _, _ = _rotary_case(torch.float32, 2, False)
    cache = KVCache(1, 2, 4, 8, 64)
    parts = tuple(b[0] for b in cache.parts)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.rotary_kv(qkv, cos, sin, None, torch.tensor([0, 2]), torch.tensor([0, 1]), parts)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.rotary_kv(qkv, cos, sin, None, torch.tensor([0, 1]), torch.tensor([0, 8]), parts)
    assert cache.k.abs().sum() == 0


@needs_fast
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_model_with_token_kernels_equals_without(make_tiny_model, greedy_ids, monkeypatch, kind):
    """Greedy ids of a batch (rows of different lengths, one crossing seq_length: NTK and logn) identical with
    the two kernels and without them; logits of a cached forward within 1e-4 (RMSNorm sums in another order)."""
    model = make_tiny_model(seq_length=64)
    prompts = [list(range(5, 45)), list(range(100, 170)), [7, 8, 9]]
    calls = {"rms_norm": 0, "rotary_kv": 0}
    for name in calls:
        real = getattr(cpu, name)
        monkeypatch.setattr(
            cpu, name, lambda *a, _r=real, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _r(*a)
        )
    ids = torch.arange(3, 83)[None]
    with torch.inference_mode():
        fast_ids = greedy_ids(model, prompts, kind, 12)
        cache = model.new_cache(1, 100, dtype=kind)
        fast = model(ids, cache=cache)
    assert all(calls.values()), calls
    for name in calls:
        monkeypatch.setattr(cpu, name, lambda *a: None)
    with torch.inference_mode():
        slow_ids = greedy_ids(model, prompts, kind, 12)
        slow = model(ids, cache=model.new_cache(1, 100, dtype=kind))
    assert fast_ids == slow_ids
    assert (fast - slow).abs().max().item() <= 1e-4 * max(1.0, math.sqrt(fast.var().item()))
