"""Prefix reuse for one conversation: keep the KV cache of the last generation and prefill only what is new.

A chat turn's prompt starts with the previous turn's prompt and answer (the system prompt, earlier turns), so a
`PrefixCache` keeps the one-row cache the previous generation wrote and the token ids whose keys/values it holds;
the next generation reuses the longest common token prefix and prefills from there. Exactness: keys are stored
after rotary, and rotary depends on the dynamic-NTK alpha, which is fixed per generation from the full prompt
length; cached positions are reused only when the new prompt has the same alpha (else the prompt is prefilled
from scratch). Caches are opaque here (the model's `new_cache`); they must offer `max_seq_len` and
`copy_prefix_from(other, length)` (qwenkit's `KVCache` does). Many conversations at once: the server's block store.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from .protocol import CausalLM

# Caches grow in steps of this many positions, so a conversation reallocates (and copies) rarely.
CAPACITY_STEP = 2048


class PrefixCache:
    """The KV cache of one conversation between generations (one generation at a time uses it).

    `hits`/`misses` count generations that did/did not reuse cached positions; `reused_tokens` sums the prompt
    tokens not prefilled again. `clear()` frees the memory (a full-size fp32 cache at 8k positions is ~3 GB).
    """

    def __init__(self) -> None:
        self._cache: Any = None
        self._tokens: list[int] = []  # ids whose keys/values sit at positions 0..len-1 of row 0
        self._alpha: float | None = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    @property
    def tokens(self) -> list[int]:
        """The token ids whose keys/values the kept cache holds (a copy)."""
        return list(self._tokens)

    def clear(self) -> None:
        """Forget the kept cache (frees its memory)."""
        with self._lock:
            self._cache, self._tokens, self._alpha = None, [], None

    def acquire(self) -> bool:
        """Take the cache for one generation; False when another generation holds it (then do without)."""
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()

    def reusable(self, prompt: Sequence[int], alpha: float) -> int:
        """How many leading prompt positions can come from the kept cache: the common prefix of the prompt and
        the kept ids, at most `len(prompt) - 1` (the last prompt token is fed for its logits); 0 unless the
        kept keys were computed under the same NTK `alpha`."""
        if self._cache is None or alpha != self._alpha:
            return 0
        n = 0
        for a, b in zip(self._tokens, prompt[:-1], strict=False):
            if a != b:
                break
            n += 1
        return n

    def take(self, model: CausalLM, prompt: Sequence[int], alpha: float, capacity: int) -> tuple[Any, int]:
        """A one-row cache of at least `capacity` positions whose first `n` positions hold `prompt[:n]`, and n.

        The kept cache is reused in place when it is big enough, else copied into a larger one. From here on
        the kept ids are `prompt[:n]`; `record` extends them as the generation writes more.
        """
        n = self.reusable(prompt, alpha)
        old = self._cache
        self.hits += n > 0
        self.misses += n == 0
        self.reused_tokens += n
        if old is None or old.max_seq_len < capacity:
            size = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
            self._cache = model.new_cache(1, size)
            if n:
                self._cache.copy_prefix_from(old, n)
        self._tokens, self._alpha = list(prompt[:n]), alpha
        return self._cache, n

    def record(self, tokens: Sequence[int]) -> None:
        """The generation wrote keys/values for `tokens` right after the kept ids."""
        self._tokens.extend(tokens)

    def stats(self) -> dict[str, int]:
        return {
            "prefix_cache_hits": self.hits,
            "prefix_cache_misses": self.misses,
            "prefix_cache_reused_tokens": self.reused_tokens,
        }
