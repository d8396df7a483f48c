"""Checkpoint layer: reading and writing checkpoints in the official layout, float, quantized or GPTQ.

Owns `load()` (local directory or hub id, strict checks, meta-device build; `loading`), the weight-file readers
(`weight_files`), the load-time plans for quantized and GPTQ files (`quant_plans`, `gptq`), writing quantized
checkpoints (`quantize`), synthetic checkpoints with random weights (`synthetic`) and the key map to
transformers' `Qwen2ForCausalLM` (`interop`). The modules it fills come from `model` and `quant`.
"""

from .loading import load
from .synthetic import make_checkpoint

__all__ = ["load", "make_checkpoint"]
