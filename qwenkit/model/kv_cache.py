"""Static key/value cache: preallocated per-layer buffers written at explicit per-row positions (float or int8).

Keys and values of a token live at the cache index equal to its absolute position, so rows of a batch can sit at
different lengths. The cache does not know which rows are in use or how long each row is: the generator/engine
decides that and passes positions; the model masks every index beyond a query's own position.

The int8 cache (`dtype=torch.int8`) stores each token's key and value per head as int8 with one fp32 scale
(symmetric, rounded: `x ~= q * scale`, `scale = max|x| / 127`), a quarter of the fp32 cache's memory. Attention
over a cache window (`layer_view`) is `qwenkit.kernels.cached_attention`'s job: it reads int8 as int8 at decode.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import dequantize_int8_rows

# The kinds of cache: float dtypes hold keys/values as they are; int8 is quantized per token and head.
INT8 = torch.int8
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def parse_kv_cache_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A cache dtype from "int8" / "fp32" / "bf16" / "fp16" (or the torch dtype); None stays None (the default)."""
    names = {
        "int8": INT8, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    }  # fmt: skip
    if value is None or (isinstance(value, torch.dtype) and value in (INT8, *FLOAT_DTYPES)):
        return value
    if isinstance(value, str) and value.lower() in names:
        return names[value.lower()]
    raise ValueError(
        f"unsupported KV cache dtype {value!r}; valid: int8, fp32, bf16, fp16 (or None: the default)"
    )


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim with rounding: `x [..., D]` -> (`q` int8 `[..., D]`, `scale` fp32 `[...]`)."""
    xf = x.float()
    scale = xf.abs().amax(-1) / 127.0
    # A zero vector gets scale 0 and codes 0 (dequantizes exactly); guard the division only.
    q = torch.round(xf / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(-127, 127)
    return q.to(INT8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 `q * scale[..., None]`: the inverse of `quantize_int8`."""
    return dequantize_int8_rows(q, scale)


class KVCache(nn.Module):
    """Per-layer `k`, `v` buffers of shape `[max_batch_size, n_heads, max_seq_len, head_dim]`.

    Stored as one buffer per kind, `k` and `v` of shape `[n_layers, max_batch_size, n_heads, max_seq_len,
    head_dim]`, so `cache.k[layer]` is that layer's buffer and `.to()` moves everything at once. An int8 cache
    also has `k_scale`, `v_scale` `[n_layers, max_batch_size, n_heads, max_seq_len]` fp32.
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
        if dtype is not None and dtype not in (INT8, *FLOAT_DTYPES):
            raise ValueError(f"KVCache dtype must be int8, fp32, bf16 or fp16, got {dtype}")
        self.n_layers = n_layers
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.quantized = dtype == INT8
        shape = (n_layers, max_batch_size, n_heads, max_seq_len, head_dim)
        # Zeros, not empty: masked keys still enter the value matmul with weight 0, and 0 * NaN from
        # uninitialised memory would be NaN. Not persistent: a cache is scratch memory, never in a checkpoint.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        if self.quantized:
            self.register_buffer("k_scale", torch.zeros(shape[:-1], device=device), persistent=False)
            self.register_buffer("v_scale", torch.zeros(shape[:-1], device=device), persistent=False)

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        """Every buffer, each indexed `[layer, row, head, position, ...]`: (k, v) or (k, v, k_scale, v_scale)."""
        return (self.k, self.v, self.k_scale, self.v_scale) if self.quantized else (self.k, self.v)

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
        view.quantized = self.quantized
        names = ("k", "v", "k_scale", "v_scale")
        for name, buf in zip(names, self.parts, strict=False):
            view.register_buffer(name, buf[:, start:stop], persistent=False)
        return view

    def reset(self) -> None:
        """Zero the buffers. Reusing a cache for new sequences never needs this: a query at position p attends
        to indices 0..p of its own row only, and those are written for the current sequence (at prefill or by
        earlier decode steps) before any query reaches them; stale entries beyond p are masked (and finite)."""
        for buf in self.parts:
            buf.zero_()

    def read(self, row: int, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Copies of positions `start..stop-1` of `row`, every layer: each `[n_layers, H, stop-start, ...]`.
        What `write` takes back (a prefix cache keeps such blocks of a computed prompt)."""
        return tuple(buf[:, row, :, start:stop].clone() for buf in self.parts)

    def write(self, row: int, start: int, data: tuple[torch.Tensor, ...]) -> None:
        """Put blocks from `read` (of a cache of the same kind) at positions `start..` of `row`."""
        if len(data) != len(self.parts):
            raise ValueError("KV blocks come from a cache of another kind (int8 vs float)")
        for buf, part in zip(self.parts, data, strict=True):
            buf[:, row, :, start : start + part.shape[2]] = part

    def copy_prefix_from(self, other: KVCache, length: int) -> None:
        """Copy positions `0..length-1` of every row of `other` (same kind, rows <= ours) into this cache."""
        rows = other.max_batch_size
        for buf, src in zip(self.parts, other.parts, strict=True):
            buf[:, :rows, :, :length] = src[:, :, :, :length]

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

        Returns views `[B, H, S_used, D]` of those rows with `S_used = max(positions) + 1` (for an int8 cache,
        fp32 dequantized copies of the whole window; the model instead calls `write_tokens`, then reads the
        int8 buffers through `layer_view` with `kernels.cached_attention`).
        `length` lets a caller that already knows `S_used` (the model computes it once per forward) skip a host
        sync per layer.
        """
        length = self.write_tokens(layer, positions, k, v, length=length)
        batch = k.shape[0]
        if self.quantized:
            k8, v8, ks, vs = self.layer_view(layer, batch, length)
            return dequantize_int8(k8, ks), dequantize_int8(v8, vs)
        return self.k[layer, :batch, :, :length], self.v[layer, :batch, :, :length]

    def layer_view(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, ...]:
        """Views of rows `0..batch-1`, positions `0..length-1` of `layer`: (k, v) or (k, v, k_scale, v_scale)."""
        return tuple(buf[layer, :batch, :, :length] for buf in self.parts)

    def write_tokens(
        self,
        layer: int,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        length: int | None = None,
    ) -> int:
        """The write half of `update`: store `k`, `v` `[B, H, T, D]` at `positions` `[B, T]`; return S_used."""
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
        # Advanced indices split by a slice put the indexed dims first: the target is [B, T, H, D].
        k_bthd, v_bthd = k.transpose(1, 2), v.transpose(1, 2)
        if self.quantized:
            (k8, ks), (v8, vs) = quantize_int8(k_bthd), quantize_int8(v_bthd)  # [B, T, H, D], [B, T, H]
            self.k[layer][rows, :, positions] = k8
            self.v[layer][rows, :, positions] = v8
            self.k_scale[layer][rows, :, positions] = ks
            self.v_scale[layer][rows, :, positions] = vs
        else:
            k_layer, v_layer = self.k[layer], self.v[layer]
            k_layer[rows, :, positions] = k_bthd.to(k_layer.dtype)
            v_layer[rows, :, positions] = v_bthd.to(v_layer.dtype)
        return length
