"""qwenkit: Qwen (v1) chat models in plain PyTorch.

The tokenizer is imported eagerly (it is light); everything that pulls in torch-heavy modules is resolved lazily
on first attribute access, so `import qwenkit` stays fast and works without optional extras.
"""

from __future__ import annotations

import importlib
from typing import Any

from .tokenizer import QWenTokenizer, StreamDecoder

__version__ = "0.1.0"

_LAZY = {
    "load": "qwenkit.checkpoints",
    "make_checkpoint": "qwenkit.checkpoints",
    "QwenConfig": "qwenkit.model",
    "QWenLMHeadModel": "qwenkit.model",
    "KVCache": "qwenkit.model",
    "SamplingParams": "qwenkit.generation",
    "make_context": "qwenkit.tokenizer.chat_format",
}

__all__ = ["QWenTokenizer", "StreamDecoder", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwenkit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
