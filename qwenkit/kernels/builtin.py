"""The quantized linears without the C++ kernels: PyTorch's own weight-only kernels, never a whole-weight
dequantize per token.

Decode (few rows of x): int8 per output channel without offsets runs `torch.ops.aten._weight_int8pack_mm` on the
stored weight as is; int4 (group 32-256) runs `_weight_int4pack_mm_for_cpu` on a copy converted once per weight
(`_convert_weight_to_int4pack_for_cpu` and `[K/g, N, 2]` scales-and-zeros with w = (q - 8) * scale + zero, so
zero = offset + 8 * scale) and kept in the caller's `prepared` dict. Other formats, and prefill, are left to
the caller (`qwenkit.kernels` dequantizes once per call and multiplies in `cpu.gemm_dtype`).
Which path runs, and why, is logged once per path at INFO (`log_path`).
"""

from __future__ import annotations

import functools
import logging

import torch

from . import cpu

logger = logging.getLogger(__name__)

INT4PACK_GROUPS = (32, 64, 128, 256)


@functools.cache
def log_path(bits: int, path: str, why: str) -> None:
    logger.info("qwenkit: int%d linear: %s (%s)", bits, path, why)


def _decode_ok(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """CPU, few rows, bf16/fp32/fp16 x, no autograd: where the built-in weight-only kernels beat dequantizing."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows > cpu.GEMV_MAX_ROWS or x.dtype not in (torch.bfloat16, torch.float32, torch.float16):
        return False
    ts = [x, *(t for t in tensors if t is not None)]
    if any(t.device.type != "cpu" for t in ts):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """`_weight_int8pack_mm` for per-channel int8 without offsets at decode; None where it does not apply."""
    k = x.shape[-1]
    if (
        offsets is not None
        or group_size != k
        or qweight.dtype != torch.int8
        or not _decode_ok(x, qweight, bias)
    ):
        return None
    x2 = x.reshape(-1, k).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x2, qweight.contiguous(), scales.reshape(-1).to(x.dtype))
    log_path(8, "torch _weight_int8pack_mm", "no C++ kernels; per-channel int8")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], qweight.shape[0])


def int4pack(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our packed int4 (`pack_int4`, w = q * scale + offset) -> (PyTorch's CPU int4pack weight, scales-and-zeros
    `[K/g, N, 2]` in `dtype`)."""
    low, high = qweight & 0x0F, qweight >> 4
    q = torch.stack((low, high), dim=-1).flatten(-2).to(torch.int32)  # [N, K] values 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    s = scales.float()
    zero = s * 8 + (offsets.float() if offsets is not None else 0)
    return packed, torch.stack((s.t(), zero.t()), dim=-1).contiguous().to(dtype)


def linear_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    prepared: dict | None,
) -> torch.Tensor | None:
    """`_weight_int4pack_mm_for_cpu` at decode on a copy of the weight converted once into `prepared` (a dict
    the caller keeps per weight); None where it does not apply (no `prepared`, group size, N not a multiple of
    16). The copy costs as much memory as the weight itself."""
    k, n = x.shape[-1], qweight.shape[0]
    if prepared is None or group_size not in INT4PACK_GROUPS or k % group_size or n % 16:  # the op's limits
        return None
    if qweight.dtype != torch.uint8 or not _decode_ok(x, qweight, bias):
        return None
    key = (qweight.data_ptr(), scales.data_ptr(), None if offsets is None else offsets.data_ptr(), x.dtype)
    if prepared.get("key") != key:  # first call, or the module's tensors were replaced (load, .to())
        prepared.clear()
        prepared["key"] = key
        prepared["int4pack"] = int4pack(qweight, scales, offsets, group_size, x.dtype)
    packed, sz = prepared["int4pack"]
    x2 = x.reshape(-1, k).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)
    log_path(4, "torch _weight_int4pack_mm_for_cpu", "no C++ kernels; weight converted once")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], n)
