"""Linear kernels for quantized (and bf16) weights, with one storage contract and interchangeable backends.

Storage contract (what quantized modules keep and checkpoints save):
- int8: `qweight` int8 `[N, K]`; int4: `qweight` uint8 `[N, K // 2]` from `pack_int4` (two 4-bit values 0..15
  per byte); `scales` `[N, K // group_size]` and optional `offsets` of the same shape (float), meaning
  `w[n, k] = q[n, k] * scales[n, k // g] + offsets[n, k // g]` (offsets None -> 0).
`linear_int8`, `linear_int4` and `linear_bf16` take the fast CPU path of `qwenkit.kernels.cpu` when it applies
(extension built, CPU tensors, bf16/fp32 activations, supported shapes, no autograd) and otherwise run the
pure-PyTorch reference below (`reference_linear_int8` / `reference_linear_int4`, also used by the tests).
Set QWENKIT_DISABLE_EXT=1 to always run the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu as _cpu


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
) -> torch.Tensor:
    """`x @ dequantize(int8 weight).T + bias` in `x.dtype`; x `[..., K]` -> `[..., N]`."""
    y = _cpu.linear_quant(x, qweight, scales, offsets, group_size, bias, bits=8)
    return reference_linear_int8(x, qweight, scales, offsets, group_size, bias) if y is None else y


def linear_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ dequantize(int4 weight).T + bias` in `x.dtype`; `qweight` from `pack_int4`."""
    y = _cpu.linear_quant(x, qweight, scales, offsets, group_size, bias, bits=4)
    return reference_linear_int4(x, qweight, scales, offsets, group_size, bias) if y is None else y


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` in `x.dtype` (weight and bias cast to it): a fast GEMV for few rows of x on CPU with
    a bf16 weight, or an fp32 weight and fp32 x; F.linear otherwise."""
    y = _cpu.linear_bf16(x, weight, bias)
    return F.linear(x, weight.to(x.dtype), _cast(bias, x.dtype)) if y is None else y


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)
