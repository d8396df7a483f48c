"""The server's shared prefix cache: KV blocks of computed prompts, looked up by token content, LRU, bounded.

A prompt is cut into blocks of `block_size` tokens; block i is keyed by (key of block i-1, its tokens, NTK alpha),
so a key names the whole prefix up to the block's end under one alpha (keys are stored after rotary, and alpha is
fixed per generation from the full prompt length: blocks computed under another alpha are never reused). The store
holds copies of the blocks' keys/values (`KVCache.read`), so a request in any slot can copy them into its own
row instead of prefilling them. Memory is bounded by `max_bytes`; the least recently used block goes first, and a
lookup touches a chain from its end back to its root, so leaves are evicted before the prefixes they extend.
The engine decides when to look up and insert; the backend moves the tensors.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Blocks = tuple[torch.Tensor, ...]  # one block's tensors, as KVCache.read returns them

DEFAULT_BLOCK_SIZE = 64


@dataclass(eq=False)
class _Block:
    parent: tuple | None
    tokens: tuple[int, ...]
    data: Blocks
    nbytes: int


class PrefixStore:
    """Blocks of computed prompt prefixes shared by all slots. Counters: `hits`/`misses` (sequences that did /
    did not reuse a block), `reused_tokens`, `evictions`; `stats()` gives them with the memory in use."""

    def __init__(self, max_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if max_bytes <= 0 or block_size <= 0:
            raise ValueError(f"need max_bytes > 0 and block_size > 0, got {max_bytes} and {block_size}")
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._blocks: collections.OrderedDict[tuple, _Block] = collections.OrderedDict()  # LRU first
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0
        self.evictions = 0

    def _key(self, parent: tuple | None, tokens: tuple[int, ...], alpha: float) -> tuple:
        # Content-derived: a re-inserted parent gets the same key, so its surviving children stay reachable.
        return (hash((parent, tokens, alpha)), alpha, len(tokens))

    def lookup(self, prompt: Sequence[int], alpha: float, start: int = 0) -> list[tuple[int, Blocks]]:
        """The stored blocks that continue `prompt` from `start` (a multiple of block_size), as
        (position, tensors), stopping at the first block not stored; never the block holding the prompt's last
        token (it is prefilled for its logits). Touches the matched chain."""
        limit = len(prompt) - 1  # positions < limit may come from the store
        found: list[tuple[int, Blocks]] = []
        chain: list[tuple] = []
        parent = None
        size = self.block_size
        for pos in range(0, limit - size + 1, size):
            tokens = tuple(prompt[pos : pos + size])
            key = self._key(parent, tokens, alpha)
            block = self._blocks.get(key)
            if block is None or block.tokens != tokens or block.parent != parent:
                break
            chain.append(key)
            if pos >= start:
                found.append((pos, block.data))
            parent = key
        for key in reversed(chain):  # root most recent: leaves are evicted first
            self._blocks.move_to_end(key)
        return found

    def insert(
        self, tokens: Sequence[int], alpha: float, read: Callable[[int, int], Blocks], upto: int | None = None
    ) -> int:
        """Store every whole block of `tokens[:upto]` not stored yet; `read(start, stop)` copies the keys/values
        of those positions out of the cache row that computed them. Returns how many blocks were added."""
        upto = len(tokens) if upto is None else upto
        parent, added = None, 0
        size = self.block_size
        for pos in range(0, upto - size + 1, size):
            block_tokens = tuple(tokens[pos : pos + size])
            key = self._key(parent, block_tokens, alpha)
            block = self._blocks.get(key)
            if block is None or block.tokens != block_tokens or block.parent != parent:
                data = read(pos, pos + size)
                nbytes = sum(t.numel() * t.element_size() for t in data)
                if nbytes > self.max_bytes:
                    return added
                self._blocks.pop(key, None)  # a (vanishingly unlikely) hash collision: replace it
                self._blocks[key] = _Block(parent, block_tokens, data, nbytes)
                self.bytes += nbytes
                added += 1
                self._evict()
            parent = key
        return added

    def _evict(self) -> None:
        """Drop least recently used blocks until the store fits; the newest block alone always fits."""
        while self.bytes > self.max_bytes:
            block = self._blocks.pop(next(iter(self._blocks)))
            self.bytes -= block.nbytes
            self.evictions += 1

    def count(self, reused: int) -> None:
        """Record one sequence's outcome: `reused` prompt tokens came from the store."""
        self.hits += reused > 0
        self.misses += reused == 0
        self.reused_tokens += reused

    def stats(self) -> dict[str, int]:
        return {
            "prefix_cache_hits": self.hits,
            "prefix_cache_misses": self.misses,
            "prefix_cache_reused_tokens": self.reused_tokens,
            "prefix_cache_evictions": self.evictions,
            "prefix_cache_blocks": len(self._blocks),
            "prefix_cache_bytes": self.bytes,
        }

    def __len__(self) -> int:
        return len(self._blocks)
