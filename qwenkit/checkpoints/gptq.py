"""Official GPTQ checkpoints (Qwen-*-Chat-Int4 / -Int8, AutoGPTQ layout) converted exactly into our int4/int8 storage.

AutoGPTQ stores per linear: `qweight` int32 `[K * bits / 32, N]` (input k = 32/bits * row + j sits at bits
`j * bits ..` of the word), `qzeros` int32 `[G, N * bits / 32]` (packed the same way along the outputs), `scales`
fp16 `[G, N]`, `g_idx` int32 `[K]` (the group of each input; act-order makes it non-monotonic) and a `bias`.
The weight is `w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]`.

Zero points ("v1" format, every AutoGPTQ release): the packer stores `zero - 1` and every reader computes
`zero = (stored + 1) mod 2**bits`, so a stored 2**bits - 1 means zero 0. Zero 0 itself cannot round-trip through
AutoGPTQ's packer (it writes -1 into a uint32); symmetric checkpoints (Qwen's) always have zero 2**(bits-1).
GPTQModel's "gptq_v2" format (`checkpoint_format` in the config) stores the zero as is; both are read here.

Conversion (no auto-gptq needed): inputs are sorted by group (`perm`, gathered from x in the forward) so groups
become contiguous; int4 keeps q in 0..15 with `offsets = -zero * scale`, int8 stores `q - 128` with `offsets =
(128 - zero) * scale` (None when every zero is 128). In fp32 each product and the final sum are exact (at most
8 + 11 significant bits), so `dequantize()` reproduces AutoGPTQ's weights bit for bit. Reading files is left to
`qwenkit.checkpoints.loading`; the load-time plumbing is in `qwenkit.checkpoints.quant_plans`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import kernels
from ..model.config import QwenConfig
from ..quant.int4 import Int4Linear
from ..quant.int8 import Int8Linear
from ..quant.linear import QuantizedLinear
from .weight_files import read_json

QUANTIZE_CONFIG_FILE = "quantize_config.json"
SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class GptqConfig:
    """The parts of an AutoGPTQ `quantization_config` that decide how tensors are read."""

    bits: int
    group_size: int  # -1: one group per row
    desc_act: bool = False
    sym: bool = True
    zero_offset: int = 1  # v1: stored = zero - 1; gptq_v2: 0

    def groups(self, in_features: int) -> int:
        """G, the number of rows of `qzeros` and `scales` for a layer with `in_features` inputs."""
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def shapes(self, in_features: int, out_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{tensor suffix: (shape, dtype)} as AutoGPTQ stores one linear; ValueError if it cannot pack it."""
        per_word = 32 // self.bits
        for what, size in (("input", in_features), ("output", out_features)):
            if size % per_word:
                raise ValueError(
                    f"a {self.bits}-bit GPTQ layer needs {what} features divisible by {per_word}, got {size}"
                )
        groups = self.groups(in_features)
        return {
            "qweight": ((in_features // per_word, out_features), torch.int32),
            "qzeros": ((groups, out_features // per_word), torch.int32),
            "scales": ((groups, out_features), torch.float32),  # stored fp16; read into fp32 (exact)
            "g_idx": ((in_features,), torch.int32),
        }


def gptq_config(config: QwenConfig, model_dir: Path) -> GptqConfig | None:
    """The GPTQ settings of a checkpoint (config.json's `quantization_config` with quant_method "gptq", else
    `quantize_config.json`), or None when it is not a GPTQ checkpoint."""
    qc = config.quantization_config
    if qc is not None and qc.get("quant_method") != "gptq":
        return None
    if qc is None:
        path = model_dir / QUANTIZE_CONFIG_FILE
        if not path.is_file():
            return None
        qc = read_json(path)
    return parse_gptq_config(qc)


def parse_gptq_config(qc: dict[str, Any]) -> GptqConfig:
    """Validate an AutoGPTQ quantization config dict."""
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ checkpoints with bits={bits!r} are not supported; qwenkit reads 4 and 8 bits")
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or not (group_size > 0 or group_size == -1)
    ):
        raise ValueError(f"GPTQ group_size must be a positive integer or -1, got {group_size!r}")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; qwenkit reads gptq and gptq_v2")
    return GptqConfig(
        bits=bits,
        group_size=group_size,
        desc_act=bool(qc.get("desc_act", False)),
        sym=bool(qc.get("sym", True)),
        zero_offset=1 if fmt == "gptq" else 0,
    )


def unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 `[R, C]` -> int32 `[R * 32 / bits, C]`: value j of word r is row `r * 32 / bits + j`."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # [32 / bits]
    values = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [R, 32 / bits, C]
    return values.reshape(-1, packed.shape[1])


def unpack_along_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 `[R, C]` -> int32 `[R, C * 32 / bits]`: value j of word c is column `c * 32 / bits + j`."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # [R, C, 32 / bits]
    return values.reshape(packed.shape[0], -1)


def convert_linear(
    cfg: GptqConfig,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> QuantizedLinear:
    """One AutoGPTQ linear -> an `Int4Linear`/`Int8Linear` whose `dequantize()` equals AutoGPTQ's weight exactly.

    Tensors are used on their device; `scales` may be fp16 or fp32. `g_idx` None means `k // group_size`.
    """
    bits = cfg.bits
    q = unpack_along_rows(qweight, bits).t()  # [N, K], 0 .. 2**bits - 1
    zeros = (unpack_along_cols(qzeros, bits) + cfg.zero_offset) & ((1 << bits) - 1)  # [G, N]
    n, k = q.shape
    groups = scales.shape[0]
    if g_idx is None:
        g_idx = torch.arange(k, device=q.device) // (k if cfg.group_size == -1 else cfg.group_size)
    g_idx = g_idx.long()
    lo_hi = torch.stack([g_idx.min(), g_idx.max()]).tolist()
    if lo_hi[0] < 0 or lo_hi[1] >= groups:
        raise ValueError(f"GPTQ g_idx values must lie in [0, {groups}), got [{lo_hi[0]}, {lo_hi[1]}]")

    # Sort inputs by group (stable): each group's inputs become contiguous. Groups need not be of equal size
    # (act-order gives equal ones, but nothing forces it): sub-groups of gcd(group sizes) inputs keep it exact.
    perm = torch.argsort(g_idx, stable=True)
    sorted_groups = g_idx[perm]
    if bool((perm == torch.arange(k, device=perm.device)).all()):
        perm = None
    counts = torch.bincount(sorted_groups, minlength=groups).tolist()
    sub = math.gcd(*[c for c in counts if c])
    block_group = sorted_groups[::sub]  # [K / sub]: the GPTQ group of each stored block
    block_scales = scales.float().t()[:, block_group].contiguous()  # [N, K / sub] fp32 (exact copy of fp16)
    block_zeros = zeros.t()[:, block_group].float()  # [N, K / sub], small integers
    q_sorted = q if perm is None else q[:, perm]

    if bits == 4:
        qweight_out = kernels.pack_int4(q_sorted.to(torch.uint8))
        offsets = -(block_zeros * block_scales)  # exact: <= 4 + 11 significant bits
        return Int4Linear.from_tensors(
            qweight_out, block_scales, offsets, group_size=sub, bias=bias, perm=perm
        )
    qweight_out = (q_sorted - 128).to(torch.int8)
    offsets = (128 - block_zeros) * block_scales  # exact: <= 8 + 11 significant bits
    if not bool(offsets.any()):
        offsets = None  # symmetric int8 (zero 128): the plain int8 kernel path
    return Int8Linear.from_tensors(qweight_out, block_scales, offsets, group_size=sub, bias=bias, perm=perm)
