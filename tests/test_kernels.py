"""Linear kernels: int4 packing, the reference contract, and the fast CPU paths against fp32 math.

The fast-path tests run once per kernel set this CPU can execute (an AVX-512 machine also runs the avx2 set),
when the C++ extension builds here (skipped otherwise; set QWENKIT_REQUIRE_EXT=1 to make that a failure).
Tolerances are relative Frobenius errors against fp32 math on the same dequantized weights: the fast GEMV
quantizes activations to 15 bits (~1e-4), and bf16 outputs round to ~4e-3. The paths without the extension
(PyTorch's weight-only kernels) are held to the same tolerances. Dispatch: tests/test_kernel_dispatch.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.kernels import builtin, cpu, isa

RUNNABLE = isa.runnable_sets(isa.cpu_flags())
FAST = cpu.available()
BUILT = [name for name in RUNNABLE if FAST and cpu.ops_for(name) is not None]
needs_fast = pytest.mark.skipif(
    not FAST, reason="qwenkit C++ CPU kernels not built here (or QWENKIT_DISABLE_EXT set)"
)


@pytest.fixture(params=BUILT or ["none"])
def kset(request, monkeypatch):
    """Run the test with each kernel set built for this CPU (QWENKIT_ISA)."""
    monkeypatch.setenv(isa.ISA_ENV, request.param)
    assert cpu.kernel_set() == (None if request.param == "none" else request.param)
    return request.param


def test_extension_required_when_asked():
    """QWENKIT_REQUIRE_EXT=1 (CI): every kernel set this CPU runs builds, and the best one is the one in use."""
    if os.environ.get(cpu.REQUIRE_ENV, "") in ("", "0"):
        pytest.skip("QWENKIT_REQUIRE_EXT not set")
    if not RUNNABLE:
        pytest.skip(f"no kernel set for this CPU ({isa.describe(isa.cpu_flags(), None)})")
    assert FAST, "QWENKIT_REQUIRE_EXT is set but the extension did not build (see logging at INFO level)"
    assert BUILT == RUNNABLE
    override = os.environ.get(isa.ISA_ENV, "").strip().lower()
    assert cpu.kernel_set() == (override or RUNNABLE[0])


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


# ---------------------------------------------------------------- without the extension (PyTorch's kernels)


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_builtin_int8_decode(monkeypatch, xdtype):
    """Per-channel int8 runs torch's _weight_int8pack_mm on the stored weight, never a whole dequantize."""
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    qweight, q, scales, _ = _case(8, 40, 256, 256, offsets=False)
    x, bias = torch.randn(3, 256).to(xdtype), torch.randn(40)
    assert builtin.linear_int8(x, qweight, scales, None, 256, bias) is not None
    expected = _expected(x, q, scales, None, 256, bias)
    monkeypatch.setattr(kernels, "dequantize", None)  # the decode path must not dequantize
    y = kernels.linear_int8(x, qweight, scales, None, 256, bias)
    assert y.dtype == xdtype
    assert _rel(y, expected) < (1e-3 if xdtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("g", [32, 128, 256])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_builtin_int4_decode(monkeypatch, g, xdtype):
    """int4 runs torch's _weight_int4pack_mm_for_cpu on a copy converted once into `prepared`."""
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    prepared: dict = {}
    for offsets in (True, False):
        qweight, q, scales, offs = _case(4, 48, 512, g, offsets, seed=g)
        x, bias = torch.randn(2, 1, 512).to(xdtype), torch.randn(48)
        y = kernels.linear_int4(x, qweight, scales, offs, g, bias, prepared=prepared)
        assert y.shape == (2, 1, 48) and y.dtype == xdtype
        assert _rel(y, _expected(x, q, scales, offs, g, bias)) < (1e-3 if xdtype == torch.float32 else 1e-2)
        packed = prepared["int4pack"][0]
        kernels.linear_int4(x, qweight, scales, offs, g, bias, prepared=prepared)
        assert prepared["int4pack"][0] is packed  # converted once, reused while the tensors stay the same


def test_builtin_paths_not_for_other_formats(monkeypatch):
    """Grouped int8, int4 with N % 16 != 0 or without a `prepared` dict: dequantize once per call instead."""
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    qweight, q, scales, offs = _case(8, 40, 256, 64, offsets=True)
    x = torch.randn(1, 256)
    assert builtin.linear_int8(x, qweight, scales, offs, 64, None) is None
    qweight, q, scales, offs = _case(4, 37, 256, 64, offsets=True)
    assert builtin.linear_int4(x, qweight, scales, offs, 64, None, {}) is None
    assert (
        _rel(kernels.linear_int4(x, qweight, scales, offs, 64), _expected(x, q, scales, offs, 64, None))
        < 1e-5
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_without_extension_multiplies_in_gemm_dtype(monkeypatch, bits):
    """Many rows: the weight is dequantized once (in fp32 where the bf16 GEMM is emulated) and multiplied."""
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    qweight, q, scales, offs = _case(bits, 48, 256, 64, offsets=True)
    x = torch.randn(40, 256).bfloat16()
    y = (kernels.linear_int8 if bits == 8 else kernels.linear_int4)(x, qweight, scales, offs, 64, prepared={})
    assert y.dtype == torch.bfloat16 and _rel(y, _expected(x, q, scales, offs, 64, None)) < 1e-2


@pytest.mark.parametrize("gemm", ["fp32", "bf16", ""])
def test_bf16_prefill_in_fp32_tiles(monkeypatch, gemm):
    """Without the C++ kernels, bf16 x with many rows where fp32 GEMMs win (forced here, or this CPU's choice):
    fp32 tiles of the weight (several here); forced bf16: F.linear in bf16."""
    monkeypatch.setenv(isa.GEMM_DTYPE_ENV, gemm)
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    monkeypatch.setattr(cpu, "PREFILL_TILE_ELEMENTS", 16 * 512)
    monkeypatch.setattr(cpu, "FP32_TILES_MIN_ROWS", 40)
    tiles = []
    real = kernels._tiled_linear
    monkeypatch.setattr(kernels, "_tiled_linear", lambda *a: tiles.append(a[-1]) or real(*a))
    w, bias, x = (
        torch.randn(50, 512).bfloat16(),
        torch.randn(50).bfloat16(),
        torch.randn(2, 20, 512).bfloat16(),
    )
    y = kernels.linear_bf16(x, w, bias)
    assert tiles == ([] if cpu.gemm_dtype(torch.bfloat16) == torch.bfloat16 else [torch.float32])
    assert tiles or gemm != "fp32"
    assert y.shape == (2, 20, 50) and y.dtype == torch.bfloat16
    assert _rel(y, F.linear(x.double(), w.double(), bias.double())) < 1e-2


# ---------------------------------------------------------------- fast paths


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 3, 12, 40])  # 12: two passes of 6 rows; 40: dequantize path
@pytest.mark.parametrize("g", [32, 64, 128, 512])  # 512 = K: one scale per output row
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_fast_quant_linear(kset, bits, m, g, xdtype):
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
def test_fast_quant_scale_dtypes(kset, bits, sdtype):
    qweight, q, scales, offs = _case(bits, 40, 256, 128, offsets=True, sdtype=sdtype)
    x, bias = torch.randn(2, 256), torch.randn(40).to(sdtype)
    fn = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    assert _rel(fn(x, qweight, scales, offs, 128, bias), _expected(x, q, scales, offs, 128, bias)) < 1e-3


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
def test_fast_quant_large_groups_and_outliers(kset, bits):
    """Per-channel scales over K = 8192 (accumulation split into blocks), activations with outlier channels."""
    k = 8192
    qweight, q, scales, offs = _case(bits, 20, k, k, offsets=True)
    x = torch.randn(2, k)
    x[:, ::97] *= 50
    fn = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    assert _rel(fn(x, qweight, scales, offs, k), _expected(x, q, scales, offs, k, None)) < 1e-3


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
def test_fast_quant_other_shapes(kset, bits):
    """Shapes off the GEMV's grid still give the right answer: int4 K = 96 (not a multiple of the 64-k chunk:
    dequantize path), group 16 (not a multiple of 32: reference)."""
    for k, g in ((96, 32), (80, 16)):
        qweight, q, scales, offs = _case(bits, 10, k, g, offsets=True)
        x = torch.randn(1, k)
        fn = kernels.linear_int8 if bits == 8 else kernels.linear_int4
        assert _rel(fn(x, qweight, scales, offs, g), _expected(x, q, scales, offs, g, None)) < 1e-4


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
def test_fast_quant_nan_and_empty_rows(kset, bits):
    qweight, q, scales, offs = _case(bits, 12, 128, 64, offsets=False)
    fn = kernels.linear_int8 if bits == 8 else kernels.linear_int4
    x = torch.randn(2, 128)
    x[1, 5] = float("nan")
    y = fn(x, qweight, scales, offs, 64)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
    assert fn(torch.randn(0, 128), qweight, scales, offs, 64).shape == (0, 12)


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("native_bf16", [False, True])
def test_fast_quant_prefill_paths(kset, monkeypatch, bits, native_bf16):
    """Prefill without the int16 GEMM (tested below): fp32 x, and bf16 x where the bf16 GEMM is not native and
    fast, take the fp32 GEMM that dequantizes as it packs (`gemm_dequant`); bf16 x where it is (AMX, Zen 5),
    the fused dequantize into bf16 tiles (several here) + F.linear. Outputs in x.dtype."""
    monkeypatch.setattr(cpu, "PREFILL_TILE_ELEMENTS", 16 * 256)
    monkeypatch.setattr(cpu, "_int16_gemm_ok", lambda *args: False)
    monkeypatch.setattr(cpu, "gemm_dtype", lambda d: d if native_bf16 else torch.float32)
    used = _spy_ops(monkeypatch, kset)
    qweight, q, scales, offs = _case(bits, 50, 256, 64, offsets=True)
    for xdtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        used.clear()
        x, bias = torch.randn(40, 256).to(xdtype), torch.randn(50)
        y = (kernels.linear_int8 if bits == 8 else kernels.linear_int4)(x, qweight, scales, offs, 64, bias)
        assert y.dtype == xdtype and _rel(y, _expected(x, q, scales, offs, 64, bias)) < tol
        tiles = native_bf16 and xdtype == torch.bfloat16
        assert used == (["dequant"] * 4 if tiles else ["gemm_dequant"])


@needs_fast
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("g", [32, 64, 128, 4096])  # 4096 = K: one scale per row (and K in several chunks)
@pytest.mark.parametrize("m", [1, 7, 30])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemm_dequant(kset, bits, g, m, sdtype):
    """The fp32 GEMM over int8 / int4 weights: x times the weight the `dequant` op gives (fp32), as fp32 math
    (within 1e-6 of fp64 relative to the sum of |products|), with and without offsets, scales in each dtype,
    channel counts off the 16 / 32-channel blocks."""
    ops = cpu.ops_for(kset)
    k = 4096 if g == 4096 else 256
    for n, offsets in ((37, True), (64, False)):
        qweight, _, scales, offs = _case(bits, n, k, g, offsets=offsets, sdtype=sdtype)
        w = torch.empty(n, k)
        ops.dequant(qweight, scales, offs, g, bits, w)
        x, bias = torch.randn(m, k), torch.randn(n)
        y = ops.gemm_dequant(x, qweight, scales, offs, g, bias, bits)
        ref = F.linear(x.double(), w.double(), bias.double())
        bound = 1e-6 * (x.double().abs() @ w.double().abs().T + bias.double().abs()).max().item()
        assert y.shape == (m, n) and (y.double() - ref).abs().max().item() <= bound
        yb = ops.gemm_dequant(x.bfloat16(), qweight, scales, offs, g, bias, bits)
        assert yb.dtype == torch.bfloat16 and _rel(yb, ref) < 1e-2


needs_avx512 = pytest.mark.skipif("avx512" not in BUILT, reason="the avx512 kernel set does not run here")


@needs_fast
@pytest.mark.parametrize("name", BUILT)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "g", [32, 64, 128, 256, 512]
)  # 512 = K: per channel (int32 sums flushed every 256 k)
# 1, 8, 17: K in chunks (batched decode); 41: the whole K at once, 12-row tiles and a 5-row one (avx512)
@pytest.mark.parametrize("m", [1, 8, 17, 41])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_int16_gemm(name, bits, g, m, xdtype):
    """`gemm_quant` (prefill: x as int16, vpdpwssd or vpmaddwd) against fp32 math: 70 outputs = full 2-vector
    channel blocks and a partial one; with and without offsets and bias; output in x.dtype."""
    ops = cpu.ops_for(name)
    k, n = 512, 70
    for offsets, with_bias in ((False, False), (True, True)):
        qweight, q, scales, offs = _case(bits, n, k, g, offsets, seed=m + g + bits)
        x = torch.randn(m, k).to(xdtype)
        bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
        y = ops.gemm_quant(x, qweight, scales, offs, g, bias, bits)
        assert y.shape == (m, n) and y.dtype == xdtype
        ref = _expected(x, q, scales, offs, g, bias)
        if xdtype == torch.bfloat16:
            assert _rel(y, ref) < 1e-2
        else:  # within the int16 rounding of x (no relative bound: int4 offsets cancel much of a sum)
            w = kernels.dequantize(q, scales, offs, g, torch.float32)
            assert ((y - ref).abs() <= _int16_x_bound(x, w)).all()


def _int16_x_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|error| bound [M, N] of x @ w.T with x rounded per row to int16 (half a step of absmax / 32767 per
    element, times sum |w|), plus fp32 rounding of the sums."""
    step = x.abs().amax(dim=1, keepdim=True) / 32767
    return 0.5 * step * w.abs().sum(dim=1) + 1e-5 * (x.abs() @ w.abs().T) + 1e-6


@needs_fast
@pytest.mark.parametrize("name", BUILT)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "n, k, g, m",
    [
        (1, 64, 32, 9),  # one channel (a block of 1 of 2 kL), the smallest K
        (31, 192, 64, 16),  # K chunks of 128 k + a 64-k tail
        (33, 320, 32, 33),  # past the chunked rows: the whole K at once
        (65, 1088, 64, 12),  # 8 chunks + a tail, three blocks (the next block's prefetch clipped at N)
        (17, 2112, 2112, 8),  # per channel: flushes of 132 k, chunks of 264
    ],
)
def test_int16_gemm_odd_shapes(name, bits, n, k, g, m):
    """`gemm_quant` on shapes where the K chunks, the packing's word tails and the channel blocks do not line up."""
    ops = cpu.ops_for(name)
    qweight, q, scales, offs = _case(bits, n, k, g, offsets=bits == 4, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).bfloat16()
    y = ops.gemm_quant(x, qweight, scales, offs, g, None, bits)
    assert y.shape == (m, n) and _rel(y, _expected(x, q, scales, offs, g, None)) < 1e-2


@needs_fast
@pytest.mark.parametrize("name", BUILT)
@pytest.mark.parametrize("bits", [8, 4])
def test_int16_gemm_outliers_nan_and_extremes(name, bits):
    """Outlier channels (a per-row int16 scale), a NaN row (NaN out, other rows untouched), the largest weights
    (int8 -128, int4 15) times the largest int16 x over a per-channel group of K = 5504 (flushed every 172 k)
    and of 1024 (every 256 k): the int32 sums must not overflow."""
    ops = cpu.ops_for(name)
    k, n, g = 1024, 33, 1024
    qweight, q, scales, offs = _case(bits, n, k, g, offsets=True)
    x = torch.randn(20, k)
    x[:, ::97] *= 50
    x[7, 3] = float("nan")
    y = ops.gemm_quant(x, qweight, scales, offs, g, None, bits)
    assert torch.isnan(y[7]).all() and not torch.isnan(y[torch.arange(20) != 7]).any()
    keep = torch.arange(20) != 7
    assert _rel(y[keep], _expected(x[keep], q, scales, offs, g, None)) < 1e-3
    for k in (1024, 5504):
        top = torch.full((n, k), 15 if bits == 4 else -128, dtype=torch.uint8 if bits == 4 else torch.int8)
        top_w = kernels.pack_int4(top) if bits == 4 else top
        x = torch.full((17, k), 3.0)  # every int16 x = 32767
        scale = torch.full((n, 1), 0.01)
        y = ops.gemm_quant(x, top_w, scale, None, k, None, bits)
        assert _rel(y, _expected(x, top, scale, None, k, None)) < 1e-4


def _spy_ops(monkeypatch, kset: str) -> list[str]:
    """Make cpu.ops_for return kernel set `kset`'s ops, recording the name of each op looked up."""
    used: list[str] = []
    ops = cpu.ops_for(kset)

    class Spy:
        def __getattr__(self, name):
            used.append(name)
            return getattr(ops, name)

    monkeypatch.setattr(cpu, "ops_for", lambda name: Spy())
    return used


@needs_avx512
def test_int16_gemm_dispatch(monkeypatch):
    """Prefill (M > GEMV_MAX_ROWS) takes the int16 GEMM on the avx512 set where the bf16 GEMM is not the faster
    path, for the shapes it takes; else dequantize + F.linear."""
    monkeypatch.setenv(isa.ISA_ENV, "avx512")
    used = _spy_ops(monkeypatch, "avx512")
    monkeypatch.setattr(cpu, "gemm_dtype", lambda dtype: torch.float32)
    qweight, q, scales, offs = _case(4, 40, 512, 128, offsets=True)
    x = torch.randn(30, 512).bfloat16()
    y = kernels.linear_int4(x, qweight, scales, offs, 128)
    assert "gemm_quant" in used and _rel(y, _expected(x, q, scales, offs, 128, None)) < 1e-2
    used.clear()
    kernels.linear_int4(x.float(), qweight, scales, offs, 128)  # fp32 activations: exact fp32 prefill
    assert used == ["gemm_dequant"]
    assert cpu._int16_gemm_ok("avx512", 512, 128)
    for fast in (False, True):  # the avx2 set: where its int16 dot outruns the FMA (measured by dot_rates)
        monkeypatch.setattr(cpu, "_int16_dot_fast", lambda kset, _f=fast: _f)
        assert cpu._int16_gemm_ok("avx2", 512, 128) == fast
    assert cpu._int16_gemm_ok("avx512", 5504, 5504) and not cpu._int16_gemm_ok("avx512", 96, 32)
    for rows, bits, op in (
        (cpu.QUANT_GEMM_MIN_ROWS[4] - 1, 4, "gemv_quant"),
        (cpu.QUANT_GEMM_MIN_ROWS[4], 4, "gemm_quant"),
        (cpu.QUANT_GEMM_MIN_ROWS[8] - 1, 8, "gemv_quant"),
        (16, 8, "gemm_quant"),
    ):
        used.clear()  # batched decode: from QUANT_GEMM_MIN_ROWS rows (by bits) on the GEMM, below on the GEMV
        qw, qq, sc, of = _case(bits, 40, 512, 128, offsets=True)
        xr = torch.randn(rows, 512).bfloat16()
        y = (kernels.linear_int4 if bits == 4 else kernels.linear_int8)(xr, qw, sc, of, 128)
        assert op in used and ("gemm_quant" in used) == (op == "gemm_quant")
        assert _rel(y, _expected(xr, qq, sc, of, 128, None)) < 1e-2
    monkeypatch.setattr(cpu, "gemm_dtype", lambda dtype: dtype)  # bf16 GEMM native and fast (AMX, Zen 5)
    assert not cpu._int16_gemm_ok("avx512", 512, 128)
    cap = cpu.INT16_GEMM_MAX_ROWS_NATIVE_BF16  # there: batches up to this many rows only
    for rows, op in ((cap, "gemm_quant"), (cap + 1, "dequant"), (cpu.QUANT_GEMM_MIN_ROWS[4], "gemm_quant")):
        used.clear()
        xr = torch.randn(rows, 512).bfloat16()
        y = kernels.linear_int4(xr, qweight, scales, offs, 128)
        assert op in used and ("gemm_quant" in used) == (op == "gemm_quant")
        assert _rel(y, _expected(xr, q, scales, offs, 128, None)) < 1e-2
    assert not cpu._int16_gemm_ok("avx512", 512, 128, torch.float32)


@pytest.mark.skipif("avx2" not in BUILT, reason="the avx2 kernel set does not run here")
@pytest.mark.parametrize("fast", [False, True])
def test_int16_gemm_dispatch_avx2(monkeypatch, fast):
    """The avx2 set: prefill takes the int16 GEMM only where its int16 dot outruns the FMA (fast), else dequantize
    + F.linear; batched decode takes it from QUANT_GEMM_MIN_ROWS rows there too, else the GEMV."""
    monkeypatch.setenv(isa.ISA_ENV, "avx2")
    monkeypatch.setattr(cpu, "gemm_dtype", lambda dtype: torch.float32)
    monkeypatch.setattr(cpu, "_int16_dot_fast", lambda kset: fast)
    used = _spy_ops(monkeypatch, "avx2")
    decode = "gemm_quant" if fast else "gemv_quant"
    for rows, bits, expected in (
        (30, 4, "gemm_quant" if fast else "gemm_dequant"),
        (cpu.QUANT_GEMM_MIN_ROWS[4], 4, decode),
        (cpu.QUANT_GEMM_MIN_ROWS[4] - 1, 4, "gemv_quant"),
        (cpu.QUANT_GEMM_MIN_ROWS[8], 8, decode),
    ):
        used.clear()
        qweight, q, scales, offs = _case(bits, 40, 512, 128, offsets=True)
        x = torch.randn(rows, 512).bfloat16()
        y = (kernels.linear_int4 if bits == 4 else kernels.linear_int8)(x, qweight, scales, offs, 128)
        assert expected in used and ("gemm_quant" in used) == (expected == "gemm_quant")
        assert _rel(y, _expected(x, q, scales, offs, 128, None)) < 1e-2


@needs_fast
def test_fast_quant_skipped_under_autograd(kset):
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
def test_fast_float_linear(kset, m, k, xdtype, wdtype):
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
def test_fast_paths_are_used(kset):
    """The dispatch really takes the extension for decode shapes (results differ from the reference's bits)."""
    qweight, q, scales, offs = _case(8, 16, 256, 64, offsets=False)
    x = torch.randn(1, 256)
    assert cpu.linear_quant(x, qweight, scales, offs, 64, None, bits=8) is not None
    assert cpu.linear_bf16(x, torch.randn(16, 256).bfloat16(), None) is not None
    assert cpu.linear_bf16(x, torch.randn(16, 256), None) is not None  # fp32 weight, fp32 x
    assert cpu.linear_bf16(x.bfloat16(), torch.randn(16, 256), None) is None  # bf16 x, fp32 weight: F.linear
    assert cpu.linear_quant(x.half(), qweight, scales, offs, 64, None, bits=8) is None  # fp16 x: reference


@needs_fast
@pytest.mark.parametrize("gemm", ["fp32", "bf16"])
def test_bf16_rows_where_bf16_gemm_is_slow(kset, monkeypatch, gemm):
    """bf16 x beyond BF16_GEMV_MAX_ELEMENTS (K = 2048, and K = 5504 where a GEMV pass holds 2 rows of x): where
    fp32 GEMMs win, the GEMV below FLOAT_GEMM_MIN_ROWS rows and the fp32 GEMM from there; else F.linear (None
    here); fp32 x times a bf16 weight takes the GEMM beyond the element limit either way. Results as F.linear's."""
    monkeypatch.setenv(isa.GEMM_DTYPE_ENV, gemm)
    used = _spy_ops(monkeypatch, kset)
    first = cpu.FLOAT_GEMM_MIN_ROWS[kset]
    for k in (2048, 5504):
        w = torch.randn(40, k).bfloat16()
        for rows, op in ((first - 1, "gemv_bf16"), (first, "gemm_bf16"), (100, "gemm_bf16")):
            used.clear()
            x = torch.randn(rows, k).bfloat16()
            y = cpu.linear_bf16(x, w, None)
            assert (y is not None) == (gemm == "fp32")
            if y is not None:
                assert used == [op] and y.dtype == torch.bfloat16
                assert _rel(y, F.linear(x.double(), w.double())) < 1e-2
            used.clear()
            y = cpu.linear_bf16(x.float(), w, None)
            assert used == ["gemv_bf16" if rows * k <= cpu.BF16_GEMV_MAX_ELEMENTS else "gemm_bf16"]
            assert y.dtype == torch.float32 and _rel(y, F.linear(x.double(), w.double())) < 1e-6


@needs_fast
@pytest.mark.parametrize("widen", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_bf16_gemv_widened_or_not(kset, m, widen):
    """The bf16 GEMV with bf16 x, by vdpbf16ps (avx512) or with x widened to fp32 (asked, or the avx2 set): the
    same products (exact in fp32 either way) up to summation order."""
    ops = cpu.ops_for(kset)
    w, x, bias = torch.randn(45, 2048).bfloat16(), torch.randn(m, 2048).bfloat16(), torch.randn(45).bfloat16()
    y = ops.gemv_bf16(x, w, bias, widen)
    ref = F.linear(x.float(), w.float(), bias.float())
    assert y.dtype == torch.bfloat16 and _rel(y, ref) < 1e-2
    assert _bits_equal_fraction(y, ref.bfloat16()) > 0.95


def test_gemv_widens_bf16_where_vdpbf16ps_is_slower(monkeypatch):
    """`cpu._gemv_widens_bf16`: from the kernels' dot_rates (vdpbf16ps vs FMA multiply-adds/ns) on avx512;
    always on avx2 (no bf16 dot there)."""
    from types import SimpleNamespace

    for rates, widen in (([54.0, 108.0], True), ([200.0, 100.0], False), ([0.0, 100.0], False)):
        monkeypatch.setattr(cpu, "ops_for", lambda name, r=rates: SimpleNamespace(dot_rates=lambda: r))
        cpu._gemv_widens_bf16.cache_clear()
        assert cpu._gemv_widens_bf16("avx512") == widen
    assert cpu._gemv_widens_bf16("avx2")
    cpu._gemv_widens_bf16.cache_clear()


def _bits_equal_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.view(torch.int16) == b.view(torch.int16)).float().mean().item()


@needs_fast
@pytest.mark.parametrize("m", [1, 5, 6, 7, 13, 530])  # tile tails (6 / 12 rows); 530: 2 row panels
@pytest.mark.parametrize("n", [1, 31, 33, 100])  # channel blocks of 16 / 32 and their tails
@pytest.mark.parametrize("k", [8, 40, 520, 4100])  # below one vector, k tails, several K chunks (+ a tail)
def test_float_gemm(kset, m, n, k):
    """csrc/gemm.cpp directly: fp32 x times a bf16 weight as fp32 math (fp32 sums: within 1e-6 of fp64); bf16 x
    with a bf16 bias: the same products, rounded to bf16 (bit-equal to F.linear on fp32 copies but for
    one-ulp rounding cases)."""
    ops = cpu.ops_for(kset)
    if m * n * k > 4_000_000:
        n = 33
    torch.manual_seed(m * 7 + n * 3 + k)
    w, x, bias = torch.randn(n, k).bfloat16(), torch.randn(m, k), torch.randn(n).bfloat16()
    y = ops.gemm_bf16(x, w, None)
    ref = F.linear(x.double(), w.double())
    assert y.shape == (m, n) and y.dtype == torch.float32
    bound = 1e-6 * (x.double().abs() @ w.double().abs().T).max().item()  # relative to the sum of |products|
    assert (y.double() - ref).abs().max().item() <= bound
    xb = x.bfloat16()
    yb = ops.gemm_bf16(xb, w, bias)
    refb = F.linear(xb.float(), w.float(), bias.float()).bfloat16()
    assert yb.dtype == torch.bfloat16 and _rel(yb, refb) < 1e-2
    assert _bits_equal_fraction(yb, refb) > 0.95


@needs_fast
def test_float_gemm_special_values(kset):
    """A NaN or inf in a row of x reaches that row's outputs only; zero rows give the bias; bad arguments give
    errors that name the problem."""
    ops = cpu.ops_for(kset)
    w, bias = torch.randn(40, 64).bfloat16(), torch.randn(40)
    x = torch.randn(20, 64)
    x[3, 5] = float("nan")
    x[7, 9] = float("inf")
    x[11] = 0.0
    y = ops.gemm_bf16(x, w, bias)
    assert y[3].isnan().all() and y[7].isinf().any() and not y[7].isfinite().all()
    rest = [r for r in range(20) if r not in (3, 7)]
    assert y[rest].isfinite().all() and torch.equal(y[11], bias)
    assert ops.gemm_bf16(torch.empty(0, 64), w, None).shape == (0, 40)
    with pytest.raises(RuntimeError, match="weight does not match K"):
        ops.gemm_bf16(torch.randn(4, 63), w, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.gemm_bf16(x, w.float(), None)
    with pytest.raises(RuntimeError, match="bias must have N elements"):
        ops.gemm_bf16(x, w, torch.randn(39))


@needs_fast
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_fast_gemv_passes_over_weight_blocks(kset, monkeypatch, bits):
    """Several passes of activation rows (long K: few rows of x per pass) over several blocks of weight rows per
    thread (csrc/common.h for_tiles): every output as the reference's."""
    n, k, m = 300, 4096, 12
    x = torch.randn(m, k)
    if bits == 16:  # bf16 x beyond the element limit: the GEMV where fp32 GEMMs win (forced here)
        monkeypatch.setenv(isa.GEMM_DTYPE_ENV, "fp32")
        w, x = torch.randn(n, k).bfloat16(), x.bfloat16()
        y = cpu.linear_bf16(x, w, None)
        assert y is not None and _rel(y, F.linear(x.double(), w.double())) < 1e-2
        return
    qweight, q, scales, offs = _case(bits, n, k, 128, offsets=True, seed=3)
    y = cpu.linear_quant(x, qweight, scales, offs, 128, None, bits=bits)
    assert y is not None and _rel(y, _expected(x, q, scales, offs, 128, None)) < 1e-4
