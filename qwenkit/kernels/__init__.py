"""Linear kernels for quantized (and bf16) weights, with one storage contract and interchangeable backends.

Storage contract (what quantized modules keep and checkpoints save):
- int8: `qweight` int8 `[N, K]`; int4: `qweight` uint8 `[N, K // 2]` from `pack_int4` (two 4-bit values 0..15
  per byte); `scales` `[N, K // group_size]` and optional `offsets` of the same shape (float), meaning
  `w[n, k] = q[n, k] * scales[n, k // g] + offsets[n, k // g]` (offsets None -> 0).
`linear_int8`, `linear_int4` and `linear_bf16` take the fast CPU path of `qwenkit.kernels.cpu` when it applies
(a kernel set built for this CPU, CPU tensors, bf16/fp32 activations, supported shapes, no autograd). Otherwise
the quantized ones run PyTorch's weight-only kernels at decode (`qwenkit.kernels.builtin`) and, for prefill or
formats those lack, dequantize the weight once per call and multiply in `cpu.gemm_dtype` (fp32 on CPUs whose
bf16 GEMM PyTorch emulates or is slower than fp32); `linear_bf16` multiplies large inputs in fp32 tiles there
too. The pure-PyTorch references (`reference_linear_int8` / `reference_linear_int4`) define the math the tests
hold every path to.
`cached_attention` is attention over a KV cache window (fp32/bf16/fp16, or int8 with per-token-and-head scales):
the C++ decode kernel for a few query rows on CPU, else `reference_cached_attention` (SDPA in the cache's dtype,
fp32 over a dequantized int8 cache), which is also what prefill runs.
Set QWENKIT_DISABLE_EXT=1 (or QWENKIT_ISA=none) to run without the C++ kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import builtin as _builtin
from . import cpu as _cpu
from . import isa as _isa


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, K]` with values 0..15 -> uint8 `[N, K // 2]`; even k in the low nibble, odd k in the high one."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of input features, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 `[N, K // 2]` -> uint8 `[N, K]` with values 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Integer weights `[N, K]` (int8, or unpacked int4) -> float `[N, K]` in `dtype` (math in fp32)."""
    n, k = q.shape
    w = q.float().view(n, k // group_size, group_size) * scales.float()[..., None]
    if offsets is not None:
        w = w + offsets.float()[..., None]
    return w.view(n, k).to(dtype)


def reference_linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch `linear_int8`: dequantize to x.dtype, then F.linear."""
    return F.linear(x, dequantize(qweight, scales, offsets, group_size, x.dtype), _cast(bias, x.dtype))


def reference_linear_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch `linear_int4`: unpack, dequantize to x.dtype, then F.linear."""
    w = dequantize(unpack_int4(qweight), scales, offsets, group_size, x.dtype)
    return F.linear(x, w, _cast(bias, x.dtype))


def linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    prepared: dict | None = None,
) -> torch.Tensor:
    """`x @ dequantize(int8 weight).T + bias` in `x.dtype`; x `[..., K]` -> `[..., N]`. (`prepared`: as for
    `linear_int4`; the int8 paths need no conversion.)"""
    y = _cpu.linear_quant(x, qweight, scales, offsets, group_size, bias, bits=8)
    if y is None:
        y = _builtin.linear_int8(x, qweight, scales, offsets, group_size, bias)
    if y is None:
        y = _dequant_linear(x, qweight, scales, offsets, group_size, bias, bits=8)
    return y


def linear_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    prepared: dict | None = None,
) -> torch.Tensor:
    """`x @ dequantize(int4 weight).T + bias` in `x.dtype`; `qweight` from `pack_int4`. `prepared`: a dict the
    caller keeps with the weight (the quantized modules do), where the path without C++ kernels stores its
    one-time conversion of the weight; without it that path dequantizes per call."""
    y = _cpu.linear_quant(x, qweight, scales, offsets, group_size, bias, bits=4)
    if y is None:
        y = _builtin.linear_int4(x, qweight, scales, offsets, group_size, bias, prepared)
    if y is None:
        y = _dequant_linear(x, unpack_int4(qweight), scales, offsets, group_size, bias, bits=4)
    return y


def _dequant_linear(
    x: torch.Tensor, w_int: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int,
    bias: torch.Tensor | None, bits: int,
) -> torch.Tensor:  # fmt: skip
    """Dequantize the whole weight (int8, or unpacked int4 `[N, K]`) once and multiply in `gemm_dtype(x.dtype)`;
    the result in x.dtype. Prefill without the C++ kernels, and formats without a built-in kernel."""
    rows = x.numel() // max(1, x.shape[-1])
    if x.device.type == "cpu":
        why = (
            f"{rows} rows"
            if rows > _cpu.GEMV_MAX_ROWS
            else "no C++ kernels or built-in kernel for this format"
        )
        _builtin.log_path(bits, "dequantize once per call + F.linear", why)
    dtype = _cpu.gemm_dtype(x.dtype) if x.device.type == "cpu" else x.dtype
    w = dequantize(w_int, scales, offsets, group_size, dtype)
    return F.linear(x.to(dtype), w, _cast(bias, dtype)).to(x.dtype)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` in `x.dtype` (weight and bias cast to it): on CPU with the C++ kernels, the GEMV for
    few rows of x (a bf16 weight, or an fp32 weight and fp32 x) and the fp32 GEMM over a bf16 weight for more rows
    where fp32 wins (`cpu.gemm_dtype`: PyTorch's emulated bf16 GEMM is ~10x slower, a native one may be merely
    slower); without them, fp32 tiles of the weight there (`cpu.float_linear_dtype` says from how many rows);
    F.linear otherwise."""
    y = _cpu.linear_bf16(x, weight, bias)
    if y is not None:
        return y
    if x.device.type == "cpu" and weight.dtype == x.dtype and x.numel() > _cpu.BF16_GEMV_MAX_ELEMENTS:
        dtype = _cpu.float_linear_dtype(x.dtype, x.numel() // max(1, x.shape[-1]))
        if dtype != x.dtype:
            return _tiled_linear(x, weight, bias, dtype)
    return F.linear(x, weight.to(x.dtype), _cast(bias, x.dtype))


def _tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype) -> torch.Tensor:
    """F.linear in `dtype` over row tiles of the weight converted one at a time (bounded extra memory)."""
    n, k = weight.shape
    y = _cpu.tiled_linear(x.reshape(-1, k), n, lambda n0, n1: weight[n0:n1].to(dtype), bias, dtype)
    return y.view(*x.shape[:-1], n)


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 `q * scale[..., None]`: int8 `[..., D]` with one scale per row `[...]` (the int8 KV cache's format)."""
    return q.float() * scale[..., None]


def reference_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`cached_attention` in PyTorch: SDPA in the cache's dtype (int8: fp32 over the dequantized window), with
    the mask from `lengths` (or the caller's `mask` `[B, 1, T, S]` bool, which must say the same). A query that
    sees no key gets zeros."""
    if k.dtype == torch.int8:
        k, v = dequantize_int8_rows(k, k_scale), dequantize_int8_rows(v, v_scale)
    if mask is None:
        key_idx = torch.arange(k.shape[2], device=k.device)
        mask = (key_idx[None, None, :] < lengths[:, :, None].to(k.device))[:, None]  # [B, 1, T, S]
    return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask).to(q.dtype)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q `[B, H, T, D]` over a cache window k, v `[B, H, S, D]` (float, or int8 with fp32 scales
    `[B, H, S]`): query (b, t) sees keys `0..lengths[b, t] - 1` of its row (`lengths` int `[B, T]`); softmax
    scale 1/sqrt(D). Returns `[B, H, T, D]` in q.dtype. On CPU without autograd the C++ kernel takes decode (T <=
    cpu.DECODE_MAX_QUERIES) and, over an int8 cache, which it reads as int8, any T; otherwise
    `reference_cached_attention` (`mask`: an optional precomputed form of `lengths` for it)."""
    out = _cpu.decode_attention(q, k, v, lengths, k_scale, v_scale)
    if out is None:
        out = reference_cached_attention(q, k, v, lengths, k_scale, v_scale, mask)
    return out


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The official RMSNorm: normalise in fp32, cast back to x.dtype, then scale by the weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`reference_rms_norm`, as one C++ kernel on CPU where it applies (the sum of squares in another order:
    equal to float tolerance, not bit for bit)."""
    y = _cpu.rms_norm(x, weight, eps)
    return reference_rms_norm(x, weight, eps) if y is None else y


def rotary_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_scale: torch.Tensor | None,
    rows: torch.Tensor,
    positions: torch.Tensor,
    cache: tuple[torch.Tensor, ...],
) -> torch.Tensor | None:
    """Rotary of q and k of tokens `qkv` `[N, 3, H, D]`, and k, v written into one layer's cache buffers at
    (rows[n], positions[n]): the rotated q `[N, H, D]`, bit for bit what the model's rotary and cache write
    give, or None where the C++ kernel does not apply (the caller then runs those). See `cpu.rotary_kv`."""
    return _cpu.rotary_kv(qkv, cos, sin, q_scale, rows, positions, cache)


def kernel_set_scope():
    """A context in which the kernel choice is made once (environment read once), not per call: the model runs
    each forward in one. See `cpu.kernel_set_scope`."""
    return _cpu.kernel_set_scope()


def describe_cpu() -> str:
    """The CPU model, its instruction-set flags that matter here, and the kernel set in use (for benchmarks)."""
    return _isa.describe(_isa.cpu_flags(), _cpu.kernel_set())


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
