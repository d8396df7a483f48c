"""Fast CPU paths for the linear kernels: a small C++ extension (AVX-512 BW/VNNI/BF16), built at first use.

`qwenkit.kernels` calls `linear_quant` / `linear_bf16` (bf16 or fp32 weights) here first; each returns None
when the fast path does not apply (extension disabled or not built, non-CPU tensors, unsupported dtype or shape,
autograd needed), and the caller then runs the pure-PyTorch reference. Nothing is probed or built at import time.

Decode (M <= GEMV_MAX_ROWS activation rows): GEMV kernels in csrc/, one pass over the weight per tile of up to
8 rows, parallel over output rows. Activations are quantized per row to int16 (error ~1e-5 relative, far below
the weights' own) and multiplied with vpdpwssd by the int8 / unpacked int4 weights; scales are applied once per
group. Prefill: the weight is dequantized to x.dtype in row tiles (fused C++ kernel, ~50x faster than the
reference `dequantize`) and multiplied with F.linear (oneDNN).

Measured on the dev machine: 2 cores of an AMD EPYC (Zen 5: AVX-512, VNNI, BF16; no AMX), other jobs running,
so medians of noisy runs (`python benchmarks/kernels.py` prints the current tables):
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

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DISABLE_ENV = "QWENKIT_DISABLE_EXT"  # "1": never use the extension (the reference runs everywhere)
# Where the GEMV kernels stop beating the alternatives (measured at 5504x2048 and 2048x5504, 2 threads):
# int8/int4 vs dequantize + F.linear up to M = 16; bf16/fp32 vs F.linear while M * K <= 16384 (x fits in L1).
GEMV_MAX_ROWS = 16
BF16_GEMV_MAX_ELEMENTS = 16384
PREFILL_TILE_ELEMENTS = 1 << 22  # weight elements dequantized per F.linear call (4M beat 1M and 8M)

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in ("quant.cpp", "bf16.cpp", "ops.cpp")]  # + common.h
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "f16c", "fma")
# -fopenmp: at::parallel_for is a header template that runs serially without it; the extension then shares
# the libgomp.so.1 that torch has already loaded (same soname), so there is one thread pool.
_CFLAGS = ["-O3", "-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mtune=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK_K = {8: 32, 4: 64}  # k per 32-byte weight chunk of the GEMV kernels: K must be a multiple
_MAX_FLUSH = 4096  # k per int32 accumulation in the kernel (overflow bound)


def _missing_cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return list(_CPU_FLAGS)
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in _CPU_FLAGS if f not in have]
    return list(_CPU_FLAGS)


@functools.cache
def _ops():
    """Build (or load the cached build of) the extension once per process; None if it cannot run here."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        logger.info(
            "qwenkit: fast CPU kernels need x86-64, found %s; using the PyTorch reference", platform.machine()
        )
        return None
    missing = _missing_cpu_flags()
    if missing:
        logger.info("qwenkit: CPU lacks %s; using the PyTorch reference kernels", ", ".join(missing))
        return None
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=f"qwenkit_cpu_{_source_digest()}",
            sources=[str(p) for p in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler or ninja, build error: the reference still works
        logger.info("qwenkit: fast CPU kernels unavailable (%s); using the PyTorch reference", exc)
        return None
    return torch.ops.qwenkit_cpu


def _source_digest() -> str:
    """Hash of the sources and flags: each distinct build gets its own directory in the torch extensions cache,
    so two checkouts (or versions) never load each other's stale library."""
    digest = hashlib.sha1(" ".join(_CFLAGS + _LDFLAGS).encode())
    for path in sorted(_CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def available() -> bool:
    """True when the extension is built (building it now if needed) and not disabled by QWENKIT_DISABLE_EXT."""
    return os.environ.get(DISABLE_ENV, "") in ("", "0") and _ops() is not None


def _plain_cpu(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """CPU tensors, bf16/fp32 activations, and no autograd to record."""
    tensors = [x, *(t for t in others if t is not None)]
    if any(t.device.type != "cpu" for t in tensors) or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


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


def _gemv_ok(k: int, group_size: int, bits: int) -> bool:
    chunk = _CHUNK_K[bits]
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
    if not _quant_supported(x, qweight, scales, offsets, group_size, bias, bits) or not available():
        return None
    ops = _ops()
    k, n = x.shape[-1], qweight.shape[0]
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    qweight, scales, offsets, bias = (
        qweight.contiguous(),
        scales.contiguous(),
        _contig(offsets),
        _contig(bias),
    )
    if x2.shape[0] <= GEMV_MAX_ROWS and _gemv_ok(k, group_size, bits):
        y = ops.gemv_quant(x2, qweight, scales, offsets, group_size, bias, bits)
    else:
        y = _dequant_linear(ops, x2, qweight, scales, offsets, group_size, bias, bits)
    return y.view(*x.shape[:-1], n)


def _dequant_linear(ops, x2, qweight, scales, offsets, group_size, bias, bits) -> torch.Tensor:
    """Prefill: dequantize row tiles of the weight to x.dtype and multiply with F.linear. (M, K) -> (M, N)."""
    n, k = qweight.shape[0], x2.shape[1]
    rows = max(16, PREFILL_TILE_ELEMENTS // k // 16 * 16)
    if bias is not None:
        bias = bias.to(x2.dtype)
    outs = []
    tile = torch.empty(min(rows, n), k, dtype=x2.dtype)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = tile[: n1 - n0]
        ops.dequant(
            qweight[n0:n1], scales[n0:n1], None if offsets is None else offsets[n0:n1], group_size, bits, w
        )
        outs.append(F.linear(x2, w, None if bias is None else bias[n0:n1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """GEMV `x @ weight.T + bias` in x.dtype for few rows of x: a bf16 weight with bf16/fp32 x, or an fp32 weight
    with fp32 x (fp32 FMA sums, as F.linear up to summation order); None otherwise."""
    k = x.shape[-1]
    float_pair = weight.dtype == torch.bfloat16 or (
        weight.dtype == torch.float32 and x.dtype == torch.float32
    )
    if not float_pair or weight.dim() != 2 or weight.shape[1] != k:
        return None
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype not in _FLOATS):
        return None
    if x.numel() > BF16_GEMV_MAX_ELEMENTS or not _plain_cpu(x, weight, bias) or not available():
        return None
    y = _ops().gemv_bf16(x.reshape(-1, k).contiguous(), weight.contiguous(), _contig(bias))
    return y.view(*x.shape[:-1], weight.shape[0])
