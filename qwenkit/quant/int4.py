"""Int4 weight-only quantization: asymmetric min/max per group of input features (128 by default).

`quantize_int4` holds the math (fp32, row chunks); `Int4Linear` is the module that replaces an `nn.Linear` and
runs `qwenkit.kernels.linear_int4` on weights packed by `kernels.pack_int4`. Which layers get swapped is decided
in `qwenkit.quant.scheme`.
"""

from __future__ import annotations

import torch

from .. import kernels
from .linear import QuantizedLinear, check_group_size, row_chunks

QMAX = 15  # q in 0..15


def quantize_int4(
    weight: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float `[N, K]` -> (`q` uint8 `[N, K]` in 0..15, `scales`, `offsets` fp32 `[N, K // g]`).

    Per group of `g` inputs: `offset = min(w)`, `scale = (max(w) - min(w)) / 15`, `q = round((w - offset) /
    scale)`, so `w ~ q * scale + offset` is off by at most `scale / 2` and the group minimum is exact. A constant
    group gets scale 0 and is exact.
    """
    n, k = weight.shape
    check_group_size(k, group_size)
    g = group_size
    q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, k // g, dtype=torch.float32, device=weight.device)
    offsets = torch.empty_like(scales)
    for start, rows in row_chunks(weight):
        w = rows.view(rows.shape[0], k // g, g)  # [rows, groups, g] fp32
        low, high = w.amin(-1), w.amax(-1)  # [rows, groups]
        scale = (high - low) / QMAX
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        levels = (w - low[..., None]).div_(safe[..., None]).round_().clamp_(0, QMAX)
        end = start + rows.shape[0]
        q[start:end] = levels.view_as(rows).to(torch.uint8)
        scales[start:end] = scale
        offsets[start:end] = low
    return q, scales, offsets


class Int4Linear(QuantizedLinear):
    """Weight-only int4 linear: `qweight` uint8 `[N, K // 2]` (two 4-bit values per byte, `kernels.pack_int4`),
    `scales` and `offsets` fp32 `[N, K // g]`."""

    bits = 4
    qweight_dtype = torch.uint8
    default_group_size = 128

    def qweight_shape(self) -> tuple[int, int]:
        if self.in_features % 2:
            raise ValueError(f"int4 needs an even number of input features, got {self.in_features}")
        return (self.out_features, self.in_features // 2)

    def unpacked(self) -> torch.Tensor:
        return kernels.unpack_int4(self.qweight)

    @classmethod
    def quantize_weight(cls, weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        q, scales, offsets = quantize_int4(weight, group_size)
        return {"qweight": kernels.pack_int4(q), "scales": scales, "offsets": offsets}

    def _kernel(self):
        return kernels.linear_int4
