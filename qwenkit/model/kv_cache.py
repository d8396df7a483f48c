"""Static key/value cache: preallocated per-layer buffers written at explicit per-row positions.

Keys and values of a token live at the cache index equal to its absolute position, so rows of a batch can sit at
different lengths. The cache does not know which rows are in use or how long each row is: the generator/engine
decides that and passes positions; the model masks every index beyond a query's own position.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Per-layer `k`, `v` buffers of shape `[max_batch_size, n_heads, max_seq_len, head_dim]`.

    Stored as one buffer per kind, `k` and `v` of shape `[n_layers, max_batch_size, n_heads, max_seq_len,
    head_dim]`, so `cache.k[layer]` is that layer's buffer and `.to()` moves everything at once.
    """

    def __init__(
        self,
        n_layers: int,
        max_batch_size: int,
        n_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("n_layers", n_layers),
            ("max_batch_size", max_batch_size),
            ("n_heads", n_heads),
            ("max_seq_len", max_seq_len),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVCache {name} must be a positive integer, got {value!r}")
        self.n_layers = n_layers
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        shape = (n_layers, max_batch_size, n_heads, max_seq_len, head_dim)
        # Zeros, not empty: masked keys still enter the value matmul with weight 0, and 0 * NaN from
        # uninitialised memory would be NaN. Not persistent: a cache is scratch memory, never in a checkpoint.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows `start..stop-1` that shares this cache's memory: a server prefills one request
        into its slot through such a view while the other slots keep their contents."""
        if not 0 <= start < stop <= self.max_batch_size:
            raise ValueError(
                f"rows must satisfy 0 <= start < stop <= {self.max_batch_size}, got {start}, {stop}"
            )
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.n_layers, view.max_batch_size, view.max_seq_len = self.n_layers, stop - start, self.max_seq_len
        view.register_buffer("k", self.k[:, start:stop], persistent=False)
        view.register_buffer("v", self.v[:, start:stop], persistent=False)
        return view

    def reset(self) -> None:
        """Zero the buffers. Reusing a cache for new sequences never needs this: a query at position p attends
        to indices 0..p of its own row only, and those are written for the current sequence (at prefill or by
        earlier decode steps) before any query reaches them; stale entries beyond p are masked (and finite)."""
        self.k.zero_()
        self.v.zero_()

    def update(
        self,
        layer: int,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` `[B, H, T, D]` at `positions` `[B, T]` into rows `0..B-1` of `layer`.

        Returns views `[B, H, S_used, D]` of those rows with `S_used = max(positions) + 1`. `length` lets a
        caller that already knows `S_used` (the model computes it once per forward) skip a host sync per layer.
        """
        batch, _, steps, _ = k.shape
        if batch > self.max_batch_size:
            raise ValueError(
                f"batch of {batch} rows does not fit a KVCache with max_batch_size={self.max_batch_size}; "
                f"create the cache with max_batch_size >= {batch}"
            )
        if positions.shape != (batch, steps):
            raise ValueError(
                f"positions must have shape {(batch, steps)} to match k/v, got {tuple(positions.shape)}"
            )
        if length is None:
            lo, hi = torch.stack([positions.min(), positions.max()]).tolist()
            if lo < 0:
                raise ValueError(f"positions must be >= 0, got {lo}")
            length = hi + 1
        if length > self.max_seq_len:
            raise ValueError(
                f"position {length - 1} does not fit a KVCache with max_seq_len={self.max_seq_len}; "
                f"create the cache with max_seq_len >= {length}"
            )
        rows = torch.arange(batch, device=positions.device)[:, None]  # [B, 1], broadcasts against [B, T]
        k_layer, v_layer = self.k[layer], self.v[layer]
        # Advanced indices split by a slice put the indexed dims first: the target is [B, T, H, D].
        k_layer[rows, :, positions] = k.transpose(1, 2).to(k_layer.dtype)
        v_layer[rows, :, positions] = v.transpose(1, 2).to(v_layer.dtype)
        return k_layer[:batch, :, :length], v_layer[:batch, :, :length]
