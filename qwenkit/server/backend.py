"""What the batching engine needs from a model: prefill one slot, decode a batch of slots; the model owns a cache.

`ModelBackend` runs a `QWenLMHeadModel` over one static `KVCache` with a row per slot: prefill writes a chunk of
one request's prompt into its row through `cache.rows(slot, slot + 1)` while the other rows keep their contents;
decode feeds one token per row 0..B-1 at per-row positions. Which rows are busy, sampling and stopping are the
engine's job. Tests plug in a scripted backend with the same methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ..model.transformer import QWenLMHeadModel
from .prefix_cache import PrefixStore


class Backend(Protocol):
    """The engine's view of a model with `max_slots` cache rows of `max_len` positions each."""

    vocab_size: int  # width of the logits (may exceed len(tokenizer): padding rows)
    max_slots: int
    max_len: int
    device: torch.device

    def ntk_alpha(self, prompt_len: int) -> float:
        """Dynamic-NTK alpha for a whole generation with this prompt length."""
        ...

    def prefill(self, slot: int, ids: Sequence[int], start: int, alpha: float) -> torch.Tensor:
        """Write `ids` at positions start.. of `slot`; return fp32 logits `[V]` of the last of them."""
        ...

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], alphas: Sequence[float]
    ) -> torch.Tensor:
        """Feed token i at positions[i] of row i for rows 0..B-1; return fp32 logits `[B, V]`."""
        ...

    # Only with a prefix store (server/prefix_cache.py):
    def read_kv(self, slot: int, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Copies of the keys/values at positions start..stop-1 of `slot` (every layer)."""
        ...

    def write_kv(self, slot: int, start: int, data: tuple[torch.Tensor, ...]) -> None:
        """Put keys/values from `read_kv` at positions start.. of `slot`."""
        ...


class ModelBackend:
    """A `QWenLMHeadModel` with a `KVCache` of `max_slots` rows x `max_len` positions (allocated once), and
    with `prefix_cache_bytes` > 0 a shared `PrefixStore` of that size (`prefix_store`, the engine uses it)."""

    def __init__(
        self, model: QWenLMHeadModel, max_slots: int, max_len: int, *, prefix_cache_bytes: int = 0
    ) -> None:
        if max_slots < 1 or max_len < 2:
            raise ValueError(f"need max_slots >= 1 and max_len >= 2, got {max_slots} and {max_len}")
        self.model = model
        self.max_slots = max_slots
        self.max_len = max_len
        self.vocab_size = model.config.vocab_size
        self.device = model.device  # (the embedding's: a quantized lm_head has no .weight)
        self.cache = model.new_cache(max_slots, max_len)
        self.prefix_store = PrefixStore(prefix_cache_bytes) if prefix_cache_bytes > 0 else None

    def ntk_alpha(self, prompt_len: int) -> float:
        return self.model.ntk_alpha(prompt_len)

    @torch.inference_mode()
    def prefill(self, slot: int, ids: Sequence[int], start: int, alpha: float) -> torch.Tensor:
        row = self.cache.rows(slot, slot + 1)
        input_ids = torch.tensor([list(ids)], device=self.device)  # [1, T]
        positions = torch.arange(start, start + len(ids), device=self.device)[None]  # [1, T]
        last = torch.tensor([len(ids) - 1], device=self.device)
        return self.model(input_ids, positions, row, alpha, output_index=last)[0]  # [V]

    @torch.inference_mode()
    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], alphas: Sequence[float]
    ) -> torch.Tensor:
        input_ids = torch.tensor(list(tokens), device=self.device)[:, None]  # [B, 1]
        pos = torch.tensor(list(positions), device=self.device)[:, None]  # [B, 1]
        alpha = torch.tensor(list(alphas), device=self.device)
        return self.model(input_ids, pos, self.cache, alpha)[:, 0]  # [B, V]

    def read_kv(self, slot: int, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        return self.cache.read(slot, start, stop)

    def write_kv(self, slot: int, start: int, data: tuple[torch.Tensor, ...]) -> None:
        self.cache.write(slot, start, data)
