"""Tokenizer layer: text <-> ids, exactly as the official `tokenization_qwen.py`, and the ChatML prompt layout.

Owns `QWenTokenizer` and `StreamDecoder` (`tokenization`), the whitespace pre-split that keeps tiktoken's regex
engine safe (`pretokenize`), locating the official vocabulary file (`vocab`) and `make_context` with the stop ids
(`chat_format`). Knows nothing about models, tensors or sampling; imports no other qwenkit layer.
"""

from .tokenization import IMEND, IMSTART, QWenTokenizer, StreamDecoder

__all__ = ["IMEND", "IMSTART", "QWenTokenizer", "StreamDecoder"]
