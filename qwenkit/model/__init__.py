"""Model layer: the Qwen (v1) transformer in plain PyTorch, its config and its static KV cache.

Owns `QwenConfig` and the size presets (`config`), `QWenLMHeadModel` with rotary/NTK/logn as small pure functions
(`transformer`) and `KVCache` (`kv_cache`). Computes logits only: the card's chat methods come from
`generation.ChatMixin` (the layer below), weights from `checkpoints` (above), fast linear kernels from `kernels`.
"""

from .config import QwenConfig
from .kv_cache import KVCache
from .transformer import QWenLMHeadModel

__all__ = ["KVCache", "QWenLMHeadModel", "QwenConfig"]
