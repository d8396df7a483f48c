"""Weight-only quantization as module swaps: `Int8Linear` / `Int4Linear`, `quantize_model()`, quantized checkpoints
(`save_quantized`, `quantize_checkpoint`) and exact loading of official GPTQ checkpoints.

The model code never changes: linears are replaced by name, and each quantized module holds the buffers of the
storage contract in `qwenkit.kernels` (which also owns the matmul kernels and their speed).
"""

from __future__ import annotations

from .int4 import Int4Linear, quantize_int4
from .int8 import Int8Linear, quantize_int8
from .io import quantize_checkpoint, save_quantized
from .linear import QuantizedLinear
from .scheme import QuantScheme, quantize_model, target_linears

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "QuantScheme",
    "QuantizedLinear",
    "quantize_checkpoint",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "save_quantized",
    "target_linears",
]
