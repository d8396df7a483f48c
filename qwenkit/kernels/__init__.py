"""Linear kernels for quantized (and bf16) weights, with one storage contract and interchangeable backends.

Storage contract (what quantized modules keep and checkpoints save):
- int8: `qweight` int8 `[N, K]`; int4: `qweight` uint8 `[N, K // 2]` from `pack_int4` (two 4-bit values 0..15
  per byte); `scales` `[N, K // group_size]` and optional `offsets` of the same shape (float), meaning
  `w[n, k] = q[n, k] * scales[n, k // g] + offsets[n, k // g]` (offsets None -> 0).
The functions here are the pure-PyTorch reference; `qwenkit.kernels.cpu` provides fast paths when it builds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ dequantize(int8 weight).T + bias` in `x.dtype`; x `[..., K]` -> `[..., N]`."""
    return F.linear(x, dequantize(qweight, scales, offsets, group_size, x.dtype), bias)


def linear_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ dequantize(int4 weight).T + bias` in `x.dtype`; `qweight` from `pack_int4`."""
    return F.linear(x, dequantize(unpack_int4(qweight), scales, offsets, group_size, x.dtype), bias)
