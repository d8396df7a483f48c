"""Int8 weight-only quantization: symmetric, per output channel by default (optionally per group of inputs).

`quantize_int8` holds the math (fp32, row chunks); `Int8Linear` is the module that replaces an `nn.Linear` and
runs `qwenkit.kernels.linear_int8`. Which layers get swapped is decided in `qwenkit.quant.scheme`.
"""

from __future__ import annotations

import torch

from .. import kernels
from .linear import QuantizedLinear, check_group_size, row_chunks

QMAX = 127  # symmetric range -127..127: -128 is never used, so +w and -w quantize to +q and -q


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float `[N, K]` -> (`q` int8 `[N, K]`, `scales` fp32 `[N, K // g]`) with `w ~ q * scale`.

    `scale = max|w| / 127` over each group of `g = group_size` inputs (None: the whole row), `q = round(w /
    scale)`, so every element is off by at most `scale / 2`. An all-zero group gets scale 0 and q 0 (exact).
    """
    n, k = weight.shape
    g = k if group_size is None else group_size
    check_group_size(k, g)
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, k // g, dtype=torch.float32, device=weight.device)
    for start, rows in row_chunks(weight):
        w = rows.view(rows.shape[0], k // g, g)  # [rows, groups, g] fp32
        scale = w.abs().amax(-1) / QMAX  # [rows, groups]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q[start : start + rows.shape[0]] = (
            (w / safe[..., None]).round_().clamp_(-QMAX, QMAX).view_as(rows).to(torch.int8)
        )
        scales[start : start + rows.shape[0]] = scale
    return q, scales


class Int8Linear(QuantizedLinear):
    """Weight-only int8 linear: `qweight` int8 `[N, K]`, `scales` fp32 `[N, K // g]` (g = K: `[N, 1]`).

    Our own quantization has no `offsets`; int8 GPTQ checkpoints with a zero point other than 128 carry them.
    """

    bits = 8
    qweight_dtype = torch.int8
    default_group_size = None

    def qweight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def unpacked(self) -> torch.Tensor:
        return self.qweight

    @classmethod
    def quantize_weight(cls, weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        q, scales = quantize_int8(weight, group_size)
        return {"qweight": q, "scales": scales}

    def _kernel(self):
        return kernels.linear_int8
