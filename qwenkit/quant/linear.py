"""`QuantizedLinear`: the common base of the weight-only quantized linear layers.

A module holds exactly the buffers of the storage contract in `qwenkit.kernels` (`qweight`, `scales`, optional
`offsets` and `bias`), plus an optional input permutation `perm` used only for act-order GPTQ checkpoints, so its
state dict is its checkpoint. Subclasses (`Int8Linear`, `Int4Linear`) say how a float weight is quantized and
which kernel runs; the kernels themselves (and how fast they are) are left to `qwenkit.kernels`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .. import kernels

# Rows quantized at once: bounds the fp32 temporaries of quantizing one (large) weight to about this many bytes.
_CHUNK_BYTES = 64 << 20


class QuantizedLinear(nn.Module):
    """`y = x @ W.T + bias` with `W[n, k] = q[n, k] * scales[n, k // g] + offsets[n, k // g]` (g = group_size).

    Buffers: `qweight` (layout per subclass), `scales` fp32 `[N, K // g]`, `offsets` fp32 `[N, K // g]` or None,
    `bias` `[N]` (model dtype) or None, `perm` int64 `[K]` or None. With `perm`, column j of the stored weight
    belongs to input feature `perm[j]` and the forward gathers `x[..., perm]` first.

    Scales and offsets are fp32, not the model dtype: the int4 offsets (group minima, or `-zero * scale` for
    GPTQ) need more than bf16's 8 mantissa bits to keep the error within half a step, and GPTQ conversion is
    exact only in fp32. They cost 4 bytes per group of 128 weights each (int4: 0.5 bit per weight).
    Note that `module.to(torch.bfloat16)` converts them like any float buffer; the kernels accept either.
    """

    bits: ClassVar[int]
    qweight_dtype: ClassVar[torch.dtype]
    default_group_size: ClassVar[int | None]  # None: one group per output row (per-channel)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        *,
        bias: bool = False,
        offsets: bool = False,
        perm: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Empty (uninitialised) buffers of the right shapes, for loading; `from_linear` quantizes a layer.

        `dtype` is the dtype of `bias` (the model's float dtype).
        """
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = (out_features, in_features // group_size)
        self.register_buffer(
            "qweight", torch.empty(self.qweight_shape(), dtype=self.qweight_dtype, device=device)
        )
        self.register_buffer("scales", torch.empty(groups, dtype=torch.float32, device=device))
        self.register_buffer(
            "offsets", torch.empty(groups, dtype=torch.float32, device=device) if offsets else None
        )
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer(
            "perm", torch.empty(in_features, dtype=torch.int64, device=device) if perm else None
        )
        # Where the kernels without the C++ extension keep their one-time conversion of this weight (not state).
        self._prepared: dict = {}

    # ---- subclass hooks ------------------------------------------------------------------------------------
    def qweight_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def unpacked(self) -> torch.Tensor:
        """The integer weights `[N, K]` (stored column order) that `kernels.dequantize` reads."""
        raise NotImplementedError

    @classmethod
    def quantize_weight(cls, weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        """Float `[N, K]` -> {"qweight", "scales"(, "offsets")} tensors of this format, computed in fp32."""
        raise NotImplementedError

    def _kernel(self):
        raise NotImplementedError

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> QuantizedLinear:
        """Quantize an `nn.Linear` (any float dtype, any device) into this format; the bias is kept as is.

        `group_size` None means the format's default (int8: per output channel, int4: 128, capped at the input
        width); it must divide the input width.
        """
        weight = linear.weight.detach()
        out_features, in_features = weight.shape
        g = resolve_group_size(in_features, group_size if group_size is not None else cls.default_group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_tensors(**cls.quantize_weight(weight, g), group_size=g, bias=bias)

    @classmethod
    def from_tensors(
        cls,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor | None = None,
        *,
        group_size: int,
        bias: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        """Wrap already quantized tensors (in the storage contract's layout) without copying them."""
        out_features, groups = scales.shape
        in_features = groups * group_size
        module = cls(
            in_features,
            out_features,
            group_size,
            bias=bias is not None,
            offsets=offsets is not None,
            perm=perm is not None,
            dtype=None if bias is None else bias.dtype,
            device="meta",
        )
        given = {"qweight": qweight, "scales": scales, "offsets": offsets, "bias": bias, "perm": perm}
        for name, tensor in given.items():
            if tensor is None:
                continue
            expected = getattr(module, name)
            if tensor.shape != expected.shape or (name != "bias" and tensor.dtype != expected.dtype):
                raise ValueError(
                    f"{cls.__name__}.{name} must be {expected.dtype} {list(expected.shape)}, "
                    f"got {tensor.dtype} {list(tensor.shape)}"
                )
            setattr(module, name, tensor)
        return module

    # ---- use -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The buffers straight from _buffers: through nn.Module.__getattr__ the five lookups cost ~2.5 us per
        # call, ~0.3 ms of a decode step of the 1.8B (121 quantized linears).
        b = self._buffers
        if b["perm"] is not None:
            x = x.index_select(-1, b["perm"])  # [..., K] in stored column order
        return self._kernel()(
            x, b["qweight"], b["scales"], b["offsets"], self.group_size, b["bias"], prepared=self._prepared
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight `[N, K]` this module multiplies by, in the original input order (as `nn.Linear`)."""
        w = kernels.dequantize(self.unpacked(), self.scales, self.offsets, self.group_size, dtype)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)  # stored column j is input feature perm[j]
        return w

    def extra_repr(self) -> str:
        extras = f", bias={self.bias is not None}" + (", perm=True" if self.perm is not None else "")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}{extras}"
        )


def check_group_size(in_features: int, group_size: int) -> None:
    """ValueError unless `group_size` is a positive divisor of `in_features`."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the layer's {in_features} input features; "
            "pick a group size that divides every input width (128 does for all Qwen sizes)"
        )


def resolve_group_size(in_features: int, group_size: int | None) -> int:
    """A layer's group size: None or -1 -> the whole row (per channel); larger than the row -> the row."""
    validate_group_size(group_size)
    if group_size is None or group_size == -1:
        return in_features
    g = min(group_size, in_features)
    check_group_size(in_features, g)
    return g


def validate_group_size(group_size: object) -> None:
    """ValueError unless `group_size` is None, -1 (one group per row) or a positive integer."""
    if group_size is None or group_size == -1:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(
            f"group_size must be a positive integer (or -1: one group per row), got {group_size!r}"
        )


def row_chunks(weight: torch.Tensor):
    """Yield `(start, fp32 rows)` of a `[N, K]` weight, a few MB at a time (bounded temporaries)."""
    rows = max(1, _CHUNK_BYTES // max(1, weight.shape[1] * 4))
    for start in range(0, weight.shape[0], rows):
        yield start, weight[start : start + rows].float()
