"""Quantization layer: weight-only int8/int4 as module swaps (`Int8Linear`, `Int4Linear`, `quantize_model()`).

Owns the quantized modules and the scheme recorded in config.json (`scheme`). Reading and writing quantized or
GPTQ checkpoints is the `checkpoints` layer's (`checkpoints.quant_plans`, `checkpoints.quantize`, `checkpoints.gptq`),
which uses these modules; this layer never imports it.

The model code never changes: linears are replaced by name, and each quantized module holds the buffers of the
storage contract in `qwenkit.kernels` (which also owns the matmul kernels and their speed).
"""

from __future__ import annotations

from .int4 import Int4Linear, quantize_int4
from .int8 import Int8Linear, quantize_int8
from .linear import QuantizedLinear
from .scheme import QuantScheme, quantize_model, target_linears, weight_precision

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "QuantScheme",
    "QuantizedLinear",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "target_linears",
    "weight_precision",
]
