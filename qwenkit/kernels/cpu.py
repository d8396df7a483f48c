"""Fast CPU paths for the linear kernels: a small C++ extension, one build per kernel set, built at first use.

Kernel sets (`qwenkit.kernels.isa`): the same sources in csrc/ compiled for AVX-512 BW/VL/DQ + VNNI + BF16
("avx512") or for AVX2 + FMA + F16C ("avx2", x86-64-v3); `kernel_set()` picks the best one the CPU runs (or
QWENKIT_ISA), each build lives in its own directory of the torch extensions cache, named by set and source
hash. `qwenkit.kernels` calls `linear_quant` / `linear_bf16` (bf16 or fp32 weights) here first; each returns
None when the fast path does not apply (no kernel set, non-CPU tensors, unsupported dtype or shape, autograd
needed), and the caller then runs the PyTorch paths. Nothing is probed or built at import time.

Decode (M <= GEMV_MAX_ROWS activation rows): GEMV kernels in csrc/, one pass over the weight per tile of up to 8
rows (as many as keep x in L1), parallel over output rows; with several passes, block by block of weight rows that
stay in L2 meanwhile, so only the first pass reads memory. Activations are quantized per row to int16 (error ~1e-5
relative, far below the weights' own) and multiplied with vpdpwssd (avx2: vpmaddwd + vpaddd) by the int8 /
unpacked int4 weights; scales are applied once per group. bf16 x: vdpbf16ps on avx512 where it has the FMA's
multiply-add rate (else, and on avx2, x is widened to fp32 once per call: `_gemv_widens_bf16`). Prefill runs in
`gemm_dtype(x.dtype)`: bf16 where oneDNN has bf16 hardware that outruns fp32 (AMX, or vdpbf16ps at >= 3/4 of the
fp32 FMA's multiply-add rate, timed once by the kernels' `dot_rates`), with the weight dequantized into bf16 row
tiles (fused C++ kernel) for F.linear; else fp32 (QWENKIT_GEMM_DTYPE=bf16|fp32 forces it), on the kernels' own
fp32 GEMM (csrc/gemm.cpp: bf16 weights widened, int8/int4 dequantized, block by block into an L2-sized panel as it
packs them; no fp32 copy of the weight, no MKL). Where that is fp32 on the avx512 set, int8/int4 prefill with bf16
activations takes the int16 GEMM instead (`gemm_quant`: x quantized per row to int16 as for the GEMV, weight
blocks of 32 channels unpacked to int16 pairs, vpdpwssd; 1.6-2.2x the dequantize + fp32 path on the Intel Xeon
VM), and so does batched decode from QUANT_GEMM_MIN_ROWS rows. The avx2 set has the same GEMM (16-channel blocks,
6-row tiles, vpmaddwd + vpaddd) for CPUs whose int16 dot outruns the FMA (`isa.int16_dot_fast`: AVX-VNNI cores;
1.2-1.45x the dequantize + MKL fp32 path at M = 512 on the Intel Xeon VM restricted to AVX2), for prefill and
batched decode alike; AMD Zen 2/3 keep the fp32 GEMM and the GEMV.
Token-wise ops (csrc/token_ops.cpp): RMSNorm and rotary + the KV cache write, one kernel each instead of a
chain of small PyTorch ops (at decode their dispatch, not their arithmetic, is the cost): int4 decode of the
full-size 1.8B on the Intel Xeon VM, 2 threads, 32 tokens, alternating in one process: 13.3-15.0 tok/s with
them, 11.7-14.0 without (about +8%).

Measured on AMD EPYC Zen 3 (family 25 model 1; AVX2/FMA/F16C, no AVX-512), 2 cores, avx2 set, other jobs
sharing the machine (so medians of noisy runs):
- Read bandwidth (benchmarks/kernels.py): ~34 GB/s for torch.sum over 1 GiB on 2 threads. PyTorch: F.linear
  fp32 GEMV ~21 GB/s, bf16 ~20 GB/s; fp32 GEMM (MKL) 155-178 GFLOP/s at 512 x 2048 x 5504; bf16 GEMM
  emulated, ~0.02 TFLOP/s at M = 64: hence fp32 prefill tiles. _weight_int8pack_mm / _weight_int4pack_mm_for_cpu
  at M = 1 (bf16 x): see benchmarks/RESULTS.md.
- GEMV at M = 1, 5504 x 2048, 24 matrices, quiet-ish machine: 1 thread bf16 12.1 GB/s (F.linear 10.0), fp32
  13.6, int8 10.6, int4 13.6 (int4 bytes); 2 threads bf16 18.3 (F.linear 18.5), fp32 22.3, int8 16.6, int4 22.1.
- Not measurable here: AVX-VNNI (this CPU has none; the avx2 set does not use it), and any change of the int4
  layout for avx512 (issue 9 asks for a repack there; the avx2 kernel has no per-group overhead to remove: one
  scale FMA per 128 weights, so the repack was not done, see benchmarks/RESULTS.md).

Measured on the dev machine of the avx512 set: 2 cores of an AMD EPYC (Zen 5: AVX-512, VNNI, BF16; no AMX),
other jobs running, so medians of noisy runs (`python benchmarks/kernels.py` prints the current tables):
- Memory: a plain read loop gets ~40 GB/s on 1 thread and ~78 GB/s on 2 (not the ~29 of the Intel machine in
  shared/notes), so M = 1 decode is partly compute bound here: weight bytes/s at M = 1, 2 threads, Qwen-1.8B
  shapes: bf16 ~45-64 GB/s (F.linear 22-32), int8 ~45-64, int4 ~35-42; all linear layers of one decode step
  (24 layers + lm_head): bf16 58 ms, int8 31 ms, int4 22 ms (F.linear bf16 100-110 ms).
- fp32 weights (fp32 x) take the same GEMV (fp32 FMA sums): full-model fp32 decode 3.8 -> 10.0-10.3 tok/s on
  2 threads (F.linear read fp32 weights at ~23 GB/s, the GEMV at ~63).
- What did not help (measured, then removed): several weight rows per pass (more memory streams: slower from
  memory though faster from cache); int8 activations via vpdpbusd (0.5-2% error on outlier activations, no
  faster than int16 once both were tuned); masked loads in the main loop (3x slower when they miss). Again
  (int4, group 128): int8 activations per block of 32 k (llama.cpp's q8_0) with vpdpbusd on the raw nibbles,
  2 instead of 4 dot instructions per line: 0.4-1.4% error (outlier test), +10-20% from L3 on 1 thread, but
  from memory (22-25 GB/s on 1 thread, 37-41 on 2) and in the full model (29-30 tok/s) no faster. Prefetch
  hint/distance (T0/T1/NTA, 1-32 KiB ahead) or none: within the noise for int4 from memory.
- What did: OpenMP in the build (at::parallel_for ran serially without it), the L2 prefetch, a padded x row
  stride (rows 4 KiB apart aliased in L1), GCC's PRE off in the kernels (it spilled the accumulators), a second
  int32 accumulator set for int8 (per channel, from L3, 1 thread: M = 1 48 -> 65-70 GB/s, M = 2 40 -> 57; for
  int4 two or four sets were slower: more registers, and its int32 blocks are short anyway).
- Prefill at M = 512: ~0.9 TFLOP/s for int8/int4 (dequantize + F.linear) vs ~1.0 for bf16 F.linear.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from . import isa

logger = logging.getLogger(__name__)

DISABLE_ENV = "QWENKIT_DISABLE_EXT"  # "1": never use the extension (the PyTorch paths run everywhere)
REQUIRE_ENV = "QWENKIT_REQUIRE_EXT"  # "1": the chosen kernel set must build (else an error)
# Where the GEMV kernels stop beating the alternatives (measured at 5504x2048 and 2048x5504, 2 threads):
# int8/int4 vs dequantize + F.linear up to M = 16; bf16/fp32 vs F.linear while M * K <= 16384 (x fits in L1).
GEMV_MAX_ROWS = 16
BF16_GEMV_MAX_ELEMENTS = 16384
# Rows of x from which the int16 GEMM (where `_int16_gemm_ok`) beats the GEMV for decode-sized batches, by bits.
# The GEMM works through K in L1-sized chunks there and prefetches the next block of weight rows.
# Intel Xeon VM, 2 threads, ms per matrix, GEMV / GEMM (alternating in one process, 2026-12-03), avx512 set:
# int4 M = 6 6144x2048 0.62 / 0.57, 2048x5504 0.76 / 0.50, 151936x2048 14.4 / 15.4; M = 8 0.80 / 0.64,
# 1.00 / 0.61, 18.8 / 17.4; M = 16 1.57 / 1.08, 1.98 / 1.02, 39.4 / 28.6. int8 M = 8 0.80 / 0.74, 0.97 / 0.70,
# 19.0 / 23.0; M = 10 1.05 / 0.83, 1.19 / 0.77, 26.8 / 24.5; M = 16 1.54 / 1.13, 1.84 / 1.10, 37.8 / 33.1.
# avx2 set (AVX-VNNI core, the same VM): int4 M = 6 0.85 / 0.78, 0.73 / 0.73, 20.3 / 19.1; M = 8 1.10 / 0.94,
# 0.97 / 0.94, 26.3 / 23.1; int8 M = 8 1.21 / 1.12, 0.98 / 1.02, 29.3 / 27.5; M = 10 1.34 / 1.25, 1.22 / 1.17,
# 32.4 / 31.1; M = 16 2.43 / 1.81, 1.96 / 1.65, 58.4 / 43.9. (Zen 2/3: no int16 GEMM, `_int16_gemm_ok`.)
QUANT_GEMM_MIN_ROWS = {4: 8, 8: 10}
PREFILL_TILE_ELEMENTS = 1 << 22  # weight elements dequantized per F.linear call (4M beat 1M and 8M)
# A bf16 weight converted to fp32 tiles costs ~4 ms per 5504x2048 matrix and call (2 threads): where the bf16
# GEMM is native but slower than fp32 (`gemm_dtype`), that pays from this many rows of x only. Intel Xeon VM
# (AVX-512 BF16, no AMX), ms per matrix, bf16 F.linear vs fp32 tiles: 5504x2048 M=64 10.6 / 12.1, M=128
# 19.2 / 14.8; 2048x5504 M=64 10.6 / 9.9, M=128 19.6 / 15.2.
FP32_TILES_MIN_ROWS = 128

_CSRC = Path(__file__).with_name("csrc")
# + common.h, simd.h
_SOURCES = [
    _CSRC / name
    for name in ("quant.cpp", "bf16.cpp", "gemm.cpp", "attention.cpp", "token_ops.cpp", "ops.cpp")
]
# -fopenmp: at::parallel_for is a header template that runs serially without it; the extension then shares
# the libgomp.so.1 that torch has already loaded (same soname), so there is one thread pool.
_CFLAGS = ["-O3", "-mtune=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_MAX_FLUSH = 4096  # k per int32 accumulation in the kernel (overflow bound)


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


# Inside `kernel_set_scope()`: the set resolved when the scope began, as a 1-tuple (None outside any scope).
_SCOPED_SET: contextvars.ContextVar[tuple[str | None] | None] = contextvars.ContextVar(
    "qwenkit_kernel_set", default=None
)


def kernel_set() -> str | None:
    """The kernel set in use now (None: the PyTorch paths), building it at first use.

    QWENKIT_DISABLE_EXT=1 or QWENKIT_ISA=none: None. QWENKIT_ISA=avx2|avx512: that set (ValueError if this CPU
    cannot run it). Otherwise the best set the CPU runs; if it fails to build, the next one, unless
    QWENKIT_REQUIRE_EXT=1 (then the build error is raised). The environment is read at every call, except
    inside `kernel_set_scope()`.
    """
    scoped = _SCOPED_SET.get()
    if scoped is not None:
        return scoped[0]
    if _flag(DISABLE_ENV):
        return None
    return _resolve(os.environ.get(isa.ISA_ENV, "").strip().lower() or None, isa.cpu_flags())


@contextlib.contextmanager
def kernel_set_scope() -> Iterator[str | None]:
    """Resolve `kernel_set()` once for a block of kernel calls (the model runs each forward in one): inside it,
    every call returns the set chosen when the block began, without reading the environment again. A decode
    step makes ~220 kernel calls, and the two environment reads of each cost ~0.7 ms per step (2 threads,
    Intel Xeon VM), 1.5% of an int4 step of the full-size 1.8B. Nests; per thread (a context variable)."""
    token = _SCOPED_SET.set((kernel_set(),))
    try:
        yield _SCOPED_SET.get()[0]
    finally:
        _SCOPED_SET.reset(token)


@functools.cache
def _resolve(override: str | None, flags: frozenset[str]) -> str | None:
    chosen = isa.choose_kernel_set(flags, override)
    if chosen is None:
        logger.info(
            "qwenkit: CPU kernels: PyTorch paths (%s)",
            "QWENKIT_ISA=none" if override else _no_set_reason(flags),
        )
        return None
    for name in [chosen] if override else isa.runnable_sets(flags):
        if ops_for(name) is not None:
            why = f"{isa.ISA_ENV}={name}" if override else "the best set this CPU runs that builds"
            logger.info("qwenkit: CPU kernels: %s (%s; %s)", name, why, isa.describe(flags, name))
            return name
    logger.info("qwenkit: CPU kernels: PyTorch paths (no kernel set built; see the log above)")
    return None


def _no_set_reason(flags: frozenset[str]) -> str:
    if not isa.is_x86():
        return "the C++ kernels are x86-64 only"
    return f"the CPU lacks {', '.join(isa.missing_flags('avx2', flags))} (the smallest kernel set, avx2)"


@functools.cache
def ops_for(name: str):
    """torch.ops namespace of kernel set `name`, built (or loaded from the cache) once per process; None if it
    does not build here (RuntimeError instead with QWENKIT_REQUIRE_EXT=1). ValueError for a set this CPU cannot
    run: even loading one is not safe (the AVX-512 library's static initializers use AVX-512: SIGILL)."""
    if name not in isa.runnable_sets(isa.cpu_flags()):
        raise ValueError(
            f"kernel set {name!r} cannot run on this CPU ({isa.describe(isa.cpu_flags(), None)})"
        )
    kset = isa.BY_NAME[name]
    try:
        from torch.utils import cpp_extension

        _drop_stale_lock(Path(cpp_extension._get_build_directory(f"qwenkit_{name}_{_source_digest(name)}", False)))
        cpp_extension.load(
            name=f"qwenkit_{name}_{_source_digest(name)}",
            sources=[str(p) for p in _SOURCES],
            extra_cflags=[*_CFLAGS, *kset.cflags],
            extra_ldflags=_LDFLAGS,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler or ninja, build error: the PyTorch paths still work
        if _flag(REQUIRE_ENV):
            raise RuntimeError(
                f"{REQUIRE_ENV} is set but the {name} CPU kernels did not build: {exc}"
            ) from exc
        logger.info("qwenkit: %s CPU kernels unavailable (%s)", name, exc)
        return None
    return getattr(torch.ops, f"qwenkit_{name}")


STALE_LOCK_SECONDS = 600  # a build takes ~10-60 s; a lock this old was left by a killed build


def _drop_stale_lock(build_dir: Path) -> None:
    """torch's extension builder waits forever on the `lock` file a killed build leaves behind (every later
    process then hangs at its first linear layer): remove one that is far older than any real build."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_SECONDS:
        logger.warning("qwenkit: removing a stale kernel build lock (%.0f s old): %s", age, lock)
        lock.unlink(missing_ok=True)


def _source_digest(name: str) -> str:
    """Hash of the sources and flags of one kernel set: each distinct build gets its own directory in the torch
    extensions cache (named by set and hash), so two checkouts (or versions) never load each other's library."""
    digest = hashlib.sha1(" ".join([*_CFLAGS, *isa.BY_NAME[name].cflags, *_LDFLAGS]).encode())
    for path in sorted(_CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def available() -> bool:
    """True when a kernel set is in use (building it now if needed); see `kernel_set`."""
    return kernel_set() is not None


def _plain_cpu(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """CPU tensors, bf16/fp32 activations, and no autograd to record. (Called per kernel call at decode: a
    plain loop, no temporaries.)"""
    grad = torch.is_grad_enabled()  # (is_cpu: a fifth of the cost of .device.type, which builds a device)
    if not x.is_cpu or x.dtype not in (torch.float32, torch.bfloat16) or (grad and x.requires_grad):
        return False
    for t in others:
        if t is not None and (not t.is_cpu or (grad and t.requires_grad)):
            return False
    return True


def _flush_ok(k: int, group_size: int, chunk: int) -> bool:
    """Mirror of the kernel's check: the int32 accumulation block fits in _MAX_FLUSH."""
    f = max(group_size, chunk)
    while f > _MAX_FLUSH and (f // 2) % chunk == 0:
        f //= 2
    return f <= _MAX_FLUSH and f % chunk == 0


def _quant_supported(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    bits: int,
) -> bool:
    k = x.shape[-1]
    n = qweight.shape[0]
    qdtype = torch.uint8 if bits == 4 else torch.int8
    if qweight.dim() != 2 or qweight.dtype != qdtype or qweight.shape[1] * (8 // bits) != k:
        return False
    if (
        group_size % 32
        or k % group_size
        or scales.shape != (n, k // group_size)
        or scales.dtype not in _FLOATS
    ):
        return False
    if offsets is not None and (offsets.shape != scales.shape or offsets.dtype not in _FLOATS):
        return False
    if bias is not None and (bias.shape != (n,) or bias.dtype not in _FLOATS):
        return False
    return _plain_cpu(x, qweight, scales, offsets, bias)


@functools.cache
def _gemv_ok(kset: str, k: int, group_size: int, bits: int) -> bool:
    chunk = isa.BY_NAME[kset].chunk_k[bits]
    return k % chunk == 0 and _flush_ok(k, group_size, chunk)


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def linear_quant(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor | None:
    """`x @ dequantize(weight).T + bias` in x.dtype for int8 (bits=8) or packed int4 (bits=4) weights; None when
    the fast path does not apply (the caller then runs the reference)."""
    if not _quant_supported(x, qweight, scales, offsets, group_size, bias, bits):
        return None
    kset = kernel_set()
    if kset is None:
        return None
    ops = ops_for(kset)
    k, n = x.shape[-1], qweight.shape[0]
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    qweight, scales, offsets, bias = (
        qweight.contiguous(),
        scales.contiguous(),
        _contig(offsets),
        _contig(bias),
    )
    rows = x2.shape[0]
    gemv = rows <= GEMV_MAX_ROWS and _gemv_ok(kset, k, group_size, bits)
    if gemv and rows >= QUANT_GEMM_MIN_ROWS[bits]:
        gemv = not _int16_gemm_ok(kset, k, group_size, x2.dtype, rows)
    if gemv:
        y = ops.gemv_quant(x2, qweight, scales, offsets, group_size, bias, bits)
    elif _int16_gemm_ok(kset, k, group_size, x2.dtype, rows):
        y = ops.gemm_quant(x2, qweight, scales, offsets, group_size, bias, bits)
    elif gemm_dtype(x2.dtype) == torch.float32:
        # The fp32 GEMM, dequantizing weight blocks as it packs them (csrc/gemm.cpp), instead of fp32 tiles
        # for MKL: Intel Xeon VM with AMX, avx2 set and MKL capped at AVX2, 2 threads, group 128, ms per
        # matrix, GEMM / tiles: M = 512 int4 6144x2048 66.5 / 72.2, 2048x5504 60.3 / 65.9, int8 66.6 / 70.1,
        # 61.3 / 65.9; M = 32 int4 6.1 / 9.5, 5.5 / 10.2, int8 6.7 / 8.8, 5.1 / 8.2. (int16 GEMM, where it runs:
        # 53.5, 47.6, 54.7, 47.7; 3.4, 3.4, 3.9, 3.4.)
        y = ops.gemm_dequant(x2, qweight, scales, offsets, group_size, bias, bits)
    else:  # bf16 tiles for oneDNN's bf16 GEMM (AMX, Zen 5)
        y = _dequant_linear(ops, x2, qweight, scales, offsets, group_size, bias, bits)
    return y.view(*x.shape[:-1], n)


# Rows up to which the int16 GEMM also runs where the bf16 GEMM is native and fast (`gemm_dtype` says bf16):
# batched decode. Intel Xeon VM with AMX, avx512 set, 2 threads, group 128, ms per matrix, int16 GEMM / GEMV /
# dequantize to bf16 tiles + oneDNN (AMX): int4 6144x2048 M = 16 1.50 / 2.33 / 4.06, M = 32 2.50 / - / 4.18,
# M = 64 5.39 / - / 4.94; 2048x5504 M = 16 1.06 / 1.73 / 2.76, M = 32 1.60 / - / 2.83, M = 64 3.55 / - / 3.52;
# 151936x2048 M = 16 27.8 / 37.0 / 72.1, M = 32 47.6 / - / 77.9; int8 6144x2048 M = 16 1.34 / 1.49 / 2.53, M = 32
# 2.05 / - / 2.99, M = 64 3.91 / - / 3.42; M = 512 int4 27.2 / - / 10.8 (prefill stays on the AMX tiles).
INT16_GEMM_MAX_ROWS_NATIVE_BF16 = 32


def _int16_gemm_ok(
    kset: str, k: int, group_size: int, xdtype: torch.dtype = torch.bfloat16, rows: int | None = None
) -> bool:
    """Prefill of int8/int4 weights with the int16 GEMM (csrc/quant.cpp `gemm_quant`: x quantized per row to
    int16 as for the GEMV, vpdpwssd or vpmaddwd + vpaddd): shapes it takes, bf16 activations (the int16 error,
    ~3e-5 relative, is far below bf16's rounding but not below fp32's: fp32 models keep exact fp32 prefill), only
    where the bf16 GEMM is not the faster path (`gemm_dtype` says fp32), and on the avx2 set only where the int16
    dot outruns the FMA (`isa.int16_dot_fast`). Intel Xeon VM (AVX-512 BF16, no AMX; vpdpwssd at the FMA's 2 per
    cycle, vdpbf16ps at 1 per 2), M = 512, 2 threads, ms per matrix, dequantize + fp32 F.linear / int16 GEMM:
    int4 6144x2048 50.6 / 31.2, 2048x5504 49.4 / 22.8; int8 49.2 / 23.6, 43.8 / 21.6. Where oneDNN's bf16 GEMM
    is native and fast (AMX, Zen 5: ~1 TFLOP/s) dequantize + bf16 stays for prefill, and the int16 GEMM takes
    batches of up to INT16_GEMM_MAX_ROWS_NATIVE_BF16 `rows` (None: prefill-sized)."""
    # (any group that is a multiple of 32: the kernel flushes its int32 sums every <= 256 k)
    small_batch = rows is not None and rows <= INT16_GEMM_MAX_ROWS_NATIVE_BF16
    return (
        kset in isa.BY_NAME
        and xdtype == torch.bfloat16
        and k % 64 == 0
        and group_size % 32 == 0
        and (small_batch or gemm_dtype(torch.bfloat16) == torch.float32)
        and (kset == "avx512" or _int16_dot_fast(kset))
    )


@functools.cache
def _int16_dot_fast(kset: str) -> bool:
    """`isa.int16_dot_fast` for this CPU, logged once."""
    fast = isa.int16_dot_fast(isa.cpu_flags())
    logger.info(
        "qwenkit: int8/int4 prefill of bf16 activations (%s kernels): %s", kset,
        "int16 GEMM (the CPU has AVX-VNNI)" if fast else "fp32 GEMM (no AVX-VNNI: int16 dot not faster)",
    )  # fmt: skip
    return fast


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to run a CPU matrix multiply of `dtype` activations in. bf16 only where it is faster than fp32
    (`isa.bf16_gemm_choice`): not where PyTorch emulates it (~0.01-0.02 TFLOP/s on 2 Zen 2/3 cores against ~0.16
    for fp32), nor where vdpbf16ps runs well below the fp32 FMA's multiply-add rate (an Intel Xeon VM without
    AMX: oneDNN bf16 0.15 vs fp32 0.23 TFLOP/s at 512 x 2048 x 5504 on 2 threads); QWENKIT_GEMM_DTYPE forces it."""
    if dtype != torch.bfloat16:
        return dtype
    return torch.bfloat16 if _bf16_gemm(os.environ.get(isa.GEMM_DTYPE_ENV, "").strip().lower()) else torch.float32


def float_linear_dtype(dtype: torch.dtype, rows: int) -> torch.dtype:
    """The dtype to multiply `rows` rows of `dtype` activations by a weight of that dtype in: `gemm_dtype`,
    except that a native (if slower) bf16 GEMM beats converting the weight to fp32 below FP32_TILES_MIN_ROWS."""
    gemm = gemm_dtype(dtype)
    if gemm != dtype and rows < FP32_TILES_MIN_ROWS and isa.native_bf16_gemm(isa.cpu_flags()):
        return dtype
    return gemm


@functools.cache
def _bf16_gemm(override: str) -> bool:
    flags = isa.cpu_flags()
    rates = None
    if not override and isa.native_bf16_gemm(flags) and "amx_bf16" not in flags:
        kset = kernel_set()
        if kset is not None:
            bf16, fma = ops_for(kset).dot_rates()
            rates = (bf16, fma) if bf16 > 0 else None
    use, why = isa.bf16_gemm_choice(flags, rates, override or None)
    logger.info("qwenkit: bf16 matrix multiplies (prefill) in %s (%s)", "bf16" if use else "fp32", why)
    return use


def _dequant_linear(ops, x2, qweight, scales, offsets, group_size, bias, bits) -> torch.Tensor:
    """Prefill: dequantize row tiles of the weight (fused C++ kernel) and multiply with F.linear, in
    `gemm_dtype(x.dtype)`. (M, K) -> (M, N) in x.dtype."""
    n, k = qweight.shape[0], x2.shape[1]
    dtype = gemm_dtype(x2.dtype)
    tile = torch.empty(min(weight_tile_rows(k), n), k, dtype=dtype)

    def dequant_tile(n0: int, n1: int) -> torch.Tensor:
        w = tile[: n1 - n0]
        ops.dequant(
            qweight[n0:n1], scales[n0:n1], None if offsets is None else offsets[n0:n1], group_size, bits, w
        )
        return w

    return tiled_linear(x2, n, dequant_tile, bias, dtype)


def weight_tile_rows(k: int) -> int:
    """Weight rows per tile of `tiled_linear` (PREFILL_TILE_ELEMENTS, a multiple of 16 rows; not the C++
    kernels' `tile_rows`, which counts activation rows per pass)."""
    return max(16, PREFILL_TILE_ELEMENTS // k // 16 * 16)


def tiled_linear(
    x2: torch.Tensor, n: int, weight_tile: Callable[[int, int], torch.Tensor], bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """`x2 @ W.T + bias` (M, K) -> (M, N) in x2.dtype, W given as row tiles `weight_tile(n0, n1)` in `dtype` and
    multiplied in it. Each tile's product goes straight into the output: no list of pieces to concatenate (for
    the lm_head of a forward returning all 512 positions' logits those were 311 MB of fp32 beside their 311 MB
    concatenation; bf16 peak RSS of `benchmarks/peers.py`, prefill 512 with last-token logits: 4.11 -> 3.77 GB)."""
    xg = x2.to(dtype)
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype)
    rows = weight_tile_rows(x2.shape[1])
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        b = None if bias is None else bias[n0:n1].to(dtype)
        y[:, n0:n1] = F.linear(xg, weight_tile(n0, n1), b)
    return y


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`x @ weight.T + bias` in x.dtype: the GEMV for few rows of x (a bf16 weight with bf16/fp32 x, or an fp32
    weight with fp32 x: fp32 FMA sums, as F.linear up to summation order), and for more rows of a bf16 weight the
    fp32 GEMM (`gemm_bf16`) where `_float_gemm_ok` says so; None otherwise (the caller runs PyTorch)."""
    k = x.shape[-1]
    float_pair = weight.dtype == torch.bfloat16 or (
        weight.dtype == torch.float32 and x.dtype == torch.float32
    )
    if not float_pair or weight.dim() != 2 or weight.shape[1] != k:
        return None
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype not in _FLOATS):
        return None
    if not _plain_cpu(x, weight, bias):
        return None
    kset = kernel_set()
    if kset is None:
        return None
    x2, w, b = x.reshape(-1, k).contiguous(), weight.contiguous(), _contig(bias)
    if _float_gemv_fits(kset, x, weight):
        y = ops_for(kset).gemv_bf16(x2, w, b, x.dtype == torch.bfloat16 and _gemv_widens_bf16(kset))
    elif weight.dtype == torch.bfloat16 and _float_gemm_ok(x):
        y = ops_for(kset).gemm_bf16(x2, w, b)
    else:
        return None
    return y.view(*x.shape[:-1], weight.shape[0])


@functools.cache
def _gemv_widens_bf16(kset: str) -> bool:
    """Whether the bf16 GEMV widens bf16 x to fp32 (weights widened in registers, FMA) instead of vdpbf16ps:
    where the kernels' `dot_rates` time vdpbf16ps below the FMA's multiply-add rate (the avx2 set always widens).
    Intel Xeon VM with AMX, vdpbf16ps 54 vs FMA 108 multiply-adds/ns per thread: full-size bf16 decode, 2
    threads, one process alternating, 7.07 / 7.68 / 7.57 tok/s with vdpbf16ps, 8.27 / 8.42 / 8.89 widened (the
    Intel VM without AMX has the same 1:2 ratio; AMD Zen 5 runs vdpbf16ps at a full rate)."""
    if kset != "avx512":
        return True  # (no bf16 dot in the avx2 set)
    bf16, fma = ops_for(kset).dot_rates()
    widen = 0 < bf16 < fma
    logger.info(
        "qwenkit: bf16 GEMV with %s (vdpbf16ps %.0f vs FMA %.0f multiply-adds/ns per thread)",
        "bf16 x widened to fp32" if widen else "vdpbf16ps", bf16, fma,
    )  # fmt: skip
    return widen


# Rows of bf16 x from which the fp32 GEMM beats the GEMV, by kernel set, where the GEMM runs (`_float_gemm_ok`).
# Intel Xeon VM with AMX (2026-12-03, 2 threads), ms per matrix, GEMV / GEMM: avx2 set (MKL capped at AVX2)
# 6144x2048 M = 8 2.29 / 2.18, M = 10 2.87 / 2.28, M = 16 4.67 / 2.96; 2048x5504 M = 8 2.77 / 2.11, M = 10 3.38 /
# 2.07; 5504x2048 M = 8 2.00 / 1.99, M = 10 2.47 / 1.96. avx512 set (vdpbf16ps at full rate on that core):
# M = 12 1.82 / 2.26, 1.87 / 1.83, 1.64 / 1.90; M = 16 2.43 / 2.55, 2.37 / 2.18, 2.33 / 2.22.
FLOAT_GEMM_MIN_ROWS = {"avx2": 10, "avx512": GEMV_MAX_ROWS + 1}


def _float_gemv_fits(kset: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """M * K <= BF16_GEMV_MAX_ELEMENTS (x fits in L1); and where `gemm_dtype` says fp32 (no fast bf16 GEMM),
    bf16 x times a bf16 weight below FLOAT_GEMM_MIN_ROWS, where the fp32 GEMM takes over. (Where it says bf16,
    oneDNN's bf16 F.linear is faster from there: AMX, 6144x2048 M = 16 1.33 ms, GEMV 2.43.)"""
    if x.numel() <= BF16_GEMV_MAX_ELEMENTS:
        return True
    return (
        x.dtype == weight.dtype == torch.bfloat16
        and x.numel() < FLOAT_GEMM_MIN_ROWS[kset] * x.shape[-1]
        and gemm_dtype(torch.bfloat16) == torch.float32
    )


def _float_gemm_ok(x: torch.Tensor) -> bool:
    """The fp32 GEMM over a bf16 weight (csrc/gemm.cpp: the weight widened to fp32 block by block in cache, as
    exact as F.linear on fp32 copies): for fp32 x always (else F.linear would convert the whole weight), for
    bf16 x where `gemm_dtype` says fp32. It replaced converting weight tiles for MKL's fp32 GEMM: Intel Xeon VM
    with AMX, 2 threads, M = 512, ms per matrix, GEMM / tiles + MKL: avx2 set (MKL capped at AVX2) 6144x2048
    63.4 / 69.3, 2048x5504 58.2 / 63.8; avx512 set 42.7 / 47.9, 37.7 / 42.8 (and MKL's ~40% of the FMA peak
    on AMD Zen 2, shared/notes, does not matter to it). Also below FP32_TILES_MIN_ROWS, where the tiles'
    conversion cost made the slow native bf16 GEMM the better choice (AVX-512 BF16 without AMX): the GEMM has no
    such cost; not timed against that bf16 GEMM (no such core at hand this time)."""
    if x.dtype == torch.float32:
        return True
    return gemm_dtype(x.dtype) == torch.float32


# Decode attention (csrc/attention.cpp): one pass over the cached keys/values per (row, head), online softmax.
# Up to this many query rows per call (the GEMV's limit too: a short prefill chunk takes the same paths) over a
# float cache; over an int8 cache any number: the alternative, SDPA over a dequantized copy of the window, is
# slower and holds that copy (134 MB per layer at 8k). Prefill chunk of 1,024 queries, 16 heads, 2 threads, Intel
# Xeon VM with AMX, ms per layer, kernel / dequantize + SDPA: 1,024 keys 26 / 45, 2,048 65 / 71, 4,096 151 / 164,
# 8,192 307 / 331. (Over an fp32 cache SDPA was faster from 4,096 keys: 193 / 133.)
DECODE_MAX_QUERIES = 16


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Attention of q `[B, H, T, D]` over a cache window k, v `[B, H, S, D]` (fp32 / bf16 / fp16 with T <=
    DECODE_MAX_QUERIES, or int8 with fp32 scales `[B, H, S]` and any T), query (b, t) seeing keys
    `0..lengths[b, t] - 1`; softmax scale 1/sqrt(D), fp32 math. `[B, H, T, D]` in q.dtype, or None when the
    kernel does not apply."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return None
    if q.shape[2] > DECODE_MAX_QUERIES and k.dtype != torch.int8:
        return None
    if k.dtype != v.dtype or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    scales = (k_scale, v_scale)
    if k.dtype == torch.int8:
        if q.shape[-1] > 4096 or any(s is None or s.dtype != torch.float32 for s in scales):
            return None  # (int32 sums of the int8 dot products bound D)
    elif any(s is not None for s in scales):
        return None
    if not _plain_cpu(q, k, v, k_scale, v_scale, lengths):
        return None
    kset = kernel_set()
    if kset is None:
        return None
    k_scale, v_scale, lengths = _contig_last(k_scale), _contig_last(v_scale), lengths.long().contiguous()
    out = ops_for(kset).decode_attention(q, k, v, k_scale, v_scale, lengths, q.shape[-1] ** -0.5)  # [B, T, H, D]
    return out.transpose(1, 2)


def _contig_last(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The model's RMSNorm (fp32 normalisation, cast to x.dtype, times the weight in x.dtype) as one kernel
    (csrc/token_ops.cpp) instead of PyTorch's eight ops; None when it does not apply (weight of another dtype,
    not CPU, autograd, no kernel set)."""
    if x.dim() == 0 or weight.dtype != x.dtype or weight.shape != x.shape[-1:] or not _plain_cpu(x, weight):
        return None
    kset = kernel_set()
    if kset is None:
        return None
    return ops_for(kset).rms_norm(x.contiguous(), weight.contiguous(), float(eps))


def rotary_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_scale: torch.Tensor | None,
    rows: torch.Tensor,
    positions: torch.Tensor,
    cache: tuple[torch.Tensor, ...],
) -> torch.Tensor | None:
    """Rotary of q and k for tokens `qkv` `[N, 3, H, D]` (cos / signed sin `[N, D]` fp32, logn `q_scale` `[N]`
    or None), and k, v written into one layer's cache buffers `cache` (k, v `[B, H, S, D]`, + fp32 scales
    `[B, H, S]` for int8) at (rows[n], positions[n]); returns the rotated q `[N, H, D]` in qkv.dtype. Same
    rounding as the model's apply_rotary + KVCache.write_tokens (one kernel instead of ~10-25 small ops per
    layer); None when it does not apply."""
    if qkv.dim() != 4 or cos.shape != (qkv.shape[0], qkv.shape[-1]) or not _plain_cpu(qkv, cos, sin, q_scale):
        return None
    k_cache, v_cache, *scales = cache
    if k_cache.device.type != "cpu" or k_cache.dtype not in (torch.int8, *_FLOATS) or k_cache.stride(-1) != 1:
        return None
    kset = kernel_set()
    if kset is None:
        return None
    k_scale, v_scale = scales if scales else (None, None)
    return ops_for(kset).rotary_kv(
        qkv.contiguous(), cos.contiguous(), sin.contiguous(), _contig(q_scale), rows, positions,
        k_cache, v_cache, k_scale, v_scale,
    )  # fmt: skip
