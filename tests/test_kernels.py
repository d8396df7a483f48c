"""Linear kernels: int4 packing, the reference contract, and the fast CPU paths against fp32 math.

The fast-path tests run when the C++ extension builds here (skipped otherwise; set QWENKIT_REQUIRE_EXT=1 to make
that a failure). Tolerances are relative Frobenius errors against fp32 math on the same dequantized weights:
the fast GEMV quantizes activations to 15 bits (~1e-4), and bf16 outputs round to ~4e-3.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.kernels import cpu

FAST = cpu.available()
needs_fast = pytest.mark.skipif(
    not FAST, reason="qwenkit C++ CPU kernels not built here (or QWENKIT_DISABLE_EXT set)"
)


def test_extension_required_when_asked():
    if os.environ.get("QWENKIT_REQUIRE_EXT", "") not in ("", "0"):
        assert FAST, "QWENKIT_REQUIRE_EXT is set but the extension did not build (see logging at INFO level)"


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _case(bits: int, n: int, k: int, g: int, offsets: bool, seed: int = 0, sdtype=torch.float32):
    """Random integer weights with the storage contract: (qweight, unpacked q, scales, offsets)."""
    gen = torch.Generator().manual_seed(seed)
    if bits == 8:
        q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        qweight = q
    else:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        qweight = kernels.pack_int4(q)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.002).to(sdtype)
    offs = (torch.randn(n, k // g, generator=gen) * 0.05).to(sdtype) if offsets else None
    return qweight, q, scales, offs


def _expected(x, q, scales, offs, g, bias):
    """fp32 math on the dequantized weight: the ground truth both paths approximate."""
    w = kernels.dequantize(q, scales, offs, g, torch.float32)
    return F.linear(x.float(), w, None if bias is None else bias.float())


# ---------------------------------------------------------------- packing and the reference


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = kernels.pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(kernels.unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)  # even k in the low nibble


def test_pack_rejects_odd_k():
    with pytest.raises(ValueError, match="even"):
        kernels.pack_int4(torch.zeros(2, 7, dtype=torch.uint8))


def test_dequantize_formula():
    q = torch.tensor([[1, -2, 3, 4]], dtype=torch.int8)
    w = kernels.dequantize(q, torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, -1.0]]), 2, torch.float32)
    assert torch.equal(w, torch.tensor([[1.5, 0.0, 5.0, 7.0]]))


@pytest.mark.parametrize("bits", [8, 4])
def test_reference_matches_fp32_math(bits):
    qweight, q, scales, offs = _case(bits, 24, 128, 32, offsets=True)
    x = torch.randn(3, 128)
    ref = kernels.reference_linear_int8 if bits == 8 else kernels.reference_linear_int4
    assert _rel(ref(x, qweight, scales, offs, 32), _expected(x, q, scales, offs, 32, None)) < 1e-6


@pytest.mark.parametrize("bits", [8, 4])
def test_disabled_extension_uses_reference(monkeypatch, bits):
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    assert not cpu.available()
    qweight, q, scales, offs = _case(bits, 24, 256, 64, offsets=True)
    x = torch.randn(2, 256)
    fn, ref = (
        (kernels.linear_int8, kernels.reference_linear_int8)
        if bits == 8
        else (
            kernels.linear_int4,
            kernels.reference_linear_int4,
        )
    )
    assert torch.equal(fn(x, qweight, scales, offs, 64), ref(x, qweight, scales, offs, 64))
    w = torch.randn(24, 256).bfloat16()
    assert torch.equal(kernels.linear_bf16(x, w), F.linear(x, w.float()))


# ---------------------------------------------------------------- fast paths


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 3, 12, 40])  # 12: two passes of 6 rows; 40: dequantize path
@pytest.mark.parametrize("g", [32, 64, 128, 512])  # 512 = K: one scale per output row
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_fast_quant_linear(bits, m, g, xdtype):
    k, n = 512, 37  # n: not a multiple of any vector width
    for offsets, with_bias in ((False, False), (True, True)):
        qweight, q, scales, offs = _case(bits, n, k, g, offsets, seed=m + g)
        x = torch.randn(2, m, k).to(xdtype)  # leading batch dims are flattened
        bias = torch.randn(n) if with_bias else None
        fn = kernels.linear_int8 if bits == 8 else kernels.linear_int4
        y = fn(x, qweight, scales, offs, g, bias)
        assert y.shape == (2, m, n) and y.dtype == xdtype
        tol = 1e-3 if xdtype == torch.float32 else 1e-2
        assert _rel(y, _expected(x, q, scales, offs, g, bias)) < tol


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16])
def test_fast_quant_scale_dtypes(bits, sdtype):
    qweight, q, scales, offs = _case(bits, 40, 256, 128, offsets=True, sdtype=sdtype)
    x, bias = torch.randn(2, 256), torch.randn(40).to(sdtype)
    fn = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    assert _rel(fn(x, qweight, scales, offs, 128, bias), _expected(x, q, scales, offs, 128, bias)) < 1e-3


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
def test_fast_quant_large_groups_and_outliers(bits):
    """Per-channel scales over K = 8192 (accumulation split into blocks), activations with outlier channels."""
    k = 8192
    qweight, q, scales, offs = _case(bits, 20, k, k, offsets=True)
    x = torch.randn(2, k)
    x[:, ::97] *= 50
    fn = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    assert _rel(fn(x, qweight, scales, offs, k), _expected(x, q, scales, offs, k, None)) < 1e-3


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
def test_fast_quant_other_shapes(bits):
    """Shapes off the GEMV's grid still give the right answer: int4 K = 96 (not a multiple of the 64-k chunk:
    dequantize path), group 16 (not a multiple of 32: reference)."""
    for k, g in ((96, 32), (80, 16)):
        qweight, q, scales, offs = _case(bits, 10, k, g, offsets=True)
        x = torch.randn(1, k)
        fn = kernels.linear_int8 if bits == 8 else kernels.linear_int4
        assert _rel(fn(x, qweight, scales, offs, g), _expected(x, q, scales, offs, g, None)) < 1e-4


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
def test_fast_quant_nan_and_empty_rows(bits):
    qweight, q, scales, offs = _case(bits, 12, 128, 64, offsets=False)
    fn = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    x = torch.randn(2, 128)
    x[1, 5] = float("nan")
    y = fn(x, qweight, scales, offs, 64)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
    assert fn(torch.randn(0, 128), qweight, scales, offs, 64).shape == (0, 12)


@needs_fast
def test_fast_quant_skipped_under_autograd():
    qweight, q, scales, offs = _case(8, 12, 128, 64, offsets=False)
    x = torch.randn(1, 128, requires_grad=True)
    y = kernels.linear_int8(x, qweight, scales, offs, 64)
    y.sum().backward()
    assert x.grad is not None


@needs_fast
@pytest.mark.parametrize("m", [1, 2, 5, 8, 40])
@pytest.mark.parametrize("k", [512, 520])  # 520: a K that is not a multiple of 32 (masked tail)
@pytest.mark.parametrize(
    "xdtype, wdtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)],
)
def test_fast_float_linear(m, k, xdtype, wdtype):
    w = torch.randn(37, k).to(wdtype)
    bias = torch.randn(37)
    x = torch.randn(m, k).to(xdtype)
    y = kernels.linear_bf16(x, w, bias)
    assert y.shape == (m, 37) and y.dtype == xdtype
    tol = 1e-5 if xdtype == torch.float32 else 1e-2
    assert _rel(y, F.linear(x.double(), w.double(), bias.double())) < tol
    if wdtype == torch.float32:  # fp32 FMA sums: as close to the fp64 result as F.linear itself
        assert _rel(y, F.linear(x, w, bias)) < 1e-6


@needs_fast
def test_fast_paths_are_used():
    """The dispatch really takes the extension for decode shapes (results differ from the reference's bits)."""
    qweight, q, scales, offs = _case(8, 16, 256, 64, offsets=False)
    x = torch.randn(1, 256)
    assert cpu.linear_quant(x, qweight, scales, offs, 64, None, bits=8) is not None
    assert cpu.linear_bf16(x, torch.randn(16, 256).bfloat16(), None) is not None
    assert cpu.linear_bf16(x, torch.randn(16, 256), None) is not None  # fp32 weight, fp32 x
    assert cpu.linear_bf16(x.bfloat16(), torch.randn(16, 256), None) is None  # bf16 x, fp32 weight: F.linear
    assert cpu.linear_quant(x.half(), qweight, scales, offs, 64, None, bits=8) is None  # fp16 x: reference
