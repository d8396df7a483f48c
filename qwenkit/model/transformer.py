"""The Qwen (v1) transformer: RMSNorm, rotary (with dynamic NTK and logn scaling), attention, MLP, blocks.

Module and parameter names equal the official checkpoint keys, so loading needs no key map, and every linear layer
is an `nn.Linear` (a subclass with a fast CPU path) reachable by name so quantization can swap it. Loading weights,
sampling and deciding which cache rows are in use are left to `checkpoints` and `generation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..generation.chat import ChatMixin
from ..kernels import cached_attention, kernel_set_scope, linear_bf16, rms_norm, rotary_kv
from .config import QwenConfig
from .kv_cache import KVCache, parse_kv_cache_dtype


def ntk_alpha_for_length(length: int, seq_length: int) -> float:
    """Dynamic-NTK alpha `max(2**ceil(log2(length / seq_length) + 1) - 1, 1)`: 1, 3, 7, 15, ... per doubling.

    Counted in integers (how many doublings of `seq_length` stay below `length`), so it is exact at the edges.
    """
    if length <= 0:
        raise ValueError(f"prompt length must be positive, got {length}")
    doublings = 0
    while length > seq_length << doublings:
        doublings += 1
    return float(2 ** (doublings + 1) - 1)


def _ntk_alpha_tensor(lengths: torch.Tensor, seq_length: int) -> torch.Tensor:
    """`ntk_alpha_for_length` for integer lengths `[B]`, on device and without a host sync. fp32 `[B]`."""
    # seq_length * 2**j for j < 40 covers any length that fits in memory; int64 cannot overflow for seq < 2**23.
    thresholds = seq_length * 2 ** torch.arange(40, device=lengths.device, dtype=torch.int64)
    doublings = (lengths.long()[:, None] > thresholds).sum(-1)  # [B]
    return (2 ** (doublings + 1) - 1).float()


def rotary_cos_sin(
    positions: torch.Tensor, rotary_dim: int, base: float, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables in fp32 `[B, T, 1, rotary_dim]` for `positions` `[B, T]`, NTK `alpha` `[B]`/`[1]`.

    NTK scales the base: `base' = base * alpha ** (rotary_dim / (rotary_dim - 2))`, so alpha 1 is plain rotary.
    The sin table carries rotate-half's sign (first half negated), so that `rotate_half(x) * sin` is
    `x.roll(rotary_dim // 2) * signed_sin`: one op instead of a split, a negation and a concatenation.
    """
    device = positions.device
    base_scaled = base * alpha.to(device=device, dtype=torch.float32) ** (rotary_dim / (rotary_dim - 2))
    exponents = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base_scaled[:, None] ** exponents)  # [B or 1, rotary_dim / 2]
    freqs = positions.float()[:, :, None] * inv_freq[:, None, :]  # [B, T, rotary_dim / 2]
    cos, sin = freqs.cos(), freqs.sin()
    # [B, T, 1, rotary_dim]: broadcasts over heads
    return torch.cat((cos, cos), dim=-1)[:, :, None, :], torch.cat((-sin, sin), dim=-1)[:, :, None, :]


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Query scale `log(p + 1) / log(seq_length)` for positions past `seq_length`, else 1. fp32 `[B, T]`."""
    p1 = (positions + 1).float()
    return torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate-half rotary over the first `cos.shape[-1]` channels of `x` `[..., D]`, in fp32.

    `cos`/`signed_sin` from `rotary_cos_sin` broadcast against `x`; `scale` (logn) multiplies the whole result
    before the cast back to `x.dtype`.
    """
    rot = cos.shape[-1]
    xf = x.float()
    if rot == x.shape[-1]:  # every Qwen v1 size: rotary_pct 1.0
        out = xf * cos + xf.roll(rot // 2, dims=-1) * signed_sin
    else:
        x_rot = xf[..., :rot]
        out = torch.cat((x_rot * cos + x_rot.roll(rot // 2, dims=-1) * signed_sin, xf[..., rot:]), dim=-1)
    if scale is not None:
        out = out * scale
    return out.type_as(x)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and names) whose forward takes qwenkit's fast CPU GEMV for bf16 and fp32
    weights at decode, where PyTorch's matrix-vector product reaches only a third of the memory bandwidth."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_bf16(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm as the official model: normalise in fp32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float, *, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # (one C++ kernel on CPU instead of eight ops)


@dataclass
class _StepInputs:
    """What every layer of one forward shares; built once per forward."""

    positions: torch.Tensor  # [B, T] absolute positions
    # cos, sin, qk_scale: [1, N, ...] instead of [B, T, ...] when `packed`
    cos: torch.Tensor  # [B, T, 1, 1, rotary_dim] fp32 (broadcasts over q|k and heads)
    sin: torch.Tensor  # [B, T, 1, 1, rotary_dim] fp32, rotate-half's sign included
    qk_scale: torch.Tensor | None  # [B, T, 2, 1, 1] fp32: logn factor for q, 1 for k; None: off, or all 1
    cache: KVCache | None
    length: int  # keys attended with a cache: max position in the batch + 1
    lengths: torch.Tensor | None  # [B, T] keys each query attends with a cache (its position + 1)
    mask: torch.Tensor | None  # [B, 1, T, length] bool, True = may attend: `lengths` for SDPA; None -> causal
    # Right-padded rows (`input_lengths`): indices into the flattened [B * T] positions of the real tokens, which
    # the token-wise layers (embedding, norms, linears) run on as one [1, N, C] sequence; None: all are real.
    packed: torch.Tensor | None = None
    shape: tuple[int, int] = (0, 0)  # (B, T) of the input
    # With a cache: per token of the (packed) input, its cache row and position, rotary tables [N, D] and logn
    # factor [N] (None: 1), for the fused rotary + cache write (`kernels.rotary_kv`).
    token_rows: torch.Tensor | None = None
    token_positions: torch.Tensor | None = None
    token_cos: torch.Tensor | None = None
    token_sin: torch.Tensor | None = None
    token_q_scale: torch.Tensor | None = None

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] packed -> [B, T, ...], zeros at the padding (finite keys/values no real query sees)."""
        if self.packed is None:
            return x
        full = x.new_zeros(self.shape[0] * self.shape[1], *x.shape[2:])
        full[self.packed] = x[0]
        return full.view(*self.shape, *x.shape[2:])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [1, N, ...] (the real tokens), or x itself when nothing is padded."""
        return x if self.packed is None else x.flatten(0, 1)[self.packed][None]


class Attention(nn.Module):
    """Multi-head self-attention: fused `c_attn` (q | k | v, with bias), rotary, SDPA (over a cache:
    `kernels.cached_attention`), output `c_proj`."""

    def __init__(self, config: QwenConfig, layer: int, *, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.c_attn = Linear(hidden, 3 * hidden, bias=True, **kw)  # output is q | k | v
        self.c_proj = Linear(hidden, hidden, bias=not config.no_bias, **kw)

    def forward(self, x: torch.Tensor, step: _StepInputs) -> torch.Tensor:
        hidden = x.shape[-1]
        qkv = self.c_attn(x)
        # [B, T, q|k|v, H, D], or [1, N, ...] packed: rotary on the real tokens only, then to [B, H, T, D] each
        qkv = qkv.view(*qkv.shape[:2], 3, self.n_heads, self.head_dim)
        q = None
        if step.token_rows is not None:  # with a cache: rotary + cache write in one kernel, where it applies
            q = rotary_kv(
                qkv.flatten(0, 1), step.token_cos, step.token_sin, step.token_q_scale, step.token_rows,
                step.token_positions, tuple(buf[self.layer] for buf in step.cache.parts),
            )  # fmt: skip
        if q is not None:
            q = step.unpack(q.view(*qkv.shape[:2], self.n_heads, self.head_dim)).transpose(1, 2)
        else:
            q, k = step.unpack(apply_rotary(qkv[:, :, :2], step.cos, step.sin, step.qk_scale)).unbind(2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), step.unpack(qkv[:, :, 2]).transpose(1, 2)
            if step.cache is not None:
                step.cache.write_tokens(self.layer, step.positions, k, v, length=step.length)
        bsz, steps = q.shape[0], q.shape[2]
        if step.cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Keys come from the cache window [B, H, length, D] (+ int8 scales [B, H, length]); each query sees
            # indices 0..p of its row. Decode on CPU: the C++ kernel (fp32 math, int8 read as int8); otherwise
            # SDPA in the cache's dtype (fp32 on CPU, see new_cache; fp32 over a dequantized int8 cache).
            k, v, *scales = step.cache.layer_view(self.layer, bsz, step.length)
            out = cached_attention(q, k, v, step.lengths, *scales, mask=step.mask)
        return self.c_proj(step.pack(out.transpose(1, 2).reshape(bsz, steps, hidden)))


class MLP(nn.Module):
    """SwiGLU MLP: `c_proj(w1(x) * silu(w2(x)))`, each branch `intermediate_size // 2` wide."""

    def __init__(self, config: QwenConfig, *, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        bias = not config.no_bias
        self.w1 = Linear(config.hidden_size, config.ffn_hidden, bias=bias, **kw)
        self.w2 = Linear(config.hidden_size, config.ffn_hidden, bias=bias, **kw)
        self.c_proj = Linear(config.ffn_hidden, config.hidden_size, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The official model gates with w2: w1 is the "up" branch, silu(w2) the gate.
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class Block(nn.Module):
    """Pre-norm transformer block: `h = x + attn(ln_1(x))`, `out = h + mlp(ln_2(h))`."""

    def __init__(self, config: QwenConfig, layer: int, *, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon, **kw)
        self.attn = Attention(config, layer, **kw)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon, **kw)
        self.mlp = MLP(config, **kw)

    def forward(self, x: torch.Tensor, step: _StepInputs) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), step)
        return h + self.mlp(self.ln_2(h))


class QWenModel(nn.Module):
    """Embedding, blocks and final norm (`transformer.*` in the checkpoint)."""

    def __init__(self, config: QwenConfig, *, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        shape = (config.vocab_size, config.hidden_size)
        # A meta model (loading) has nothing to initialize, and nn.Embedding's normal_ init of a meta tensor
        # imports torch._dynamo and sympy: 1.7 s and ~60 MB of memory in a process that only reads weights.
        meta = device is not None and torch.device(device).type == "meta"
        self.wte = nn.Embedding(*shape, _weight=torch.empty(shape, **kw) if meta else None, **kw)
        self.h = nn.ModuleList(Block(config, i, **kw) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, **kw)

    def forward(self, input_ids: torch.Tensor, step: _StepInputs) -> torch.Tensor:
        x = self.wte(step.pack(input_ids[..., None])[..., 0])  # [B, T, C], or [1, N, C] packed
        for block in self.h:
            x = block(x, step)
        return x  # ln_f is applied by the caller, after picking the positions it needs (and packed)


class QWenLMHeadModel(ChatMixin, nn.Module):
    """Qwen (v1) causal LM. See `forward` and docs/architecture.md for the calling contract."""

    def __init__(
        self,
        config: QwenConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.transformer = QWenModel(config, dtype=dtype, device=device)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # What `new_cache` allocates when not told: None -> fp32 on CPU, the model's dtype on GPU; int8 quantized.
        self.kv_cache_dtype: torch.dtype | None = None

    def set_kv_cache_dtype(self, dtype: str | torch.dtype | None) -> None:
        """Set the default cache kind of later generations: "int8", "fp32", "bf16", "fp16" or None."""
        self.kv_cache_dtype = parse_kv_cache_dtype(dtype)

    @property
    def device(self) -> torch.device:
        """Where the model runs (the embedding's device; quantized linears have no `.weight`)."""
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the embedding's dtype)."""
        return self.transformer.wte.weight.dtype

    def ntk_alpha(self, prompt_len: int) -> float:
        """The dynamic-NTK alpha to use for a whole generation whose prompt has `prompt_len` tokens."""
        if not self.config.use_dynamic_ntk:
            return 1.0
        return ntk_alpha_for_length(prompt_len, self.config.seq_length)

    def new_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A fresh `KVCache`; device defaults to the model's. dtype defaults to `kv_cache_dtype`, else the model's
        on GPU and fp32 on CPU: PyTorch's CPU attention is 4-5x slower in bf16 than in fp32 for decode (0.70 vs
        0.15 ms per layer at 257 keys, 1 thread), and fp32 holds the bf16 keys/values exactly, so only memory
        changes (2x the cache). `torch.int8` quantizes keys and values per token and head (see kv_cache)."""
        device = torch.device(device or self.device)
        dtype = parse_kv_cache_dtype(dtype) or self.kv_cache_dtype
        dtype = dtype or (torch.float32 if device.type == "cpu" else self.dtype)
        c = self.config
        return KVCache(
            c.num_hidden_layers, max_batch_size, c.num_attention_heads, max_seq_len, c.head_dim,
            dtype=dtype, device=device,
        )  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        ntk_alpha: float | torch.Tensor | None = None,
        output_index: torch.Tensor | None = None,
        input_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """fp32 logits `[B, T, V]` for `input_ids` `[B, T]`, or `[B, V]` at `output_index` `[B]`.

        `positions` `[B, T]` default to `arange(T)` per row. With a `cache`, keys/values are written at those
        positions and each query at position p attends to cache indices 0..p of its row; without one, attention
        is causal over the input. `ntk_alpha` (float or `[B]`) defaults to the alpha of each row's last position
        + 1; it is 1 whenever `use_dynamic_ntk` is false.

        `input_lengths` `[B]` (0..T): row b's real tokens are its first input_lengths[b], the rest padding. The
        linear layers then skip the padding (a batched prefill of rows of different lengths costs their tokens,
        not B * T); the real positions' logits are those of the unpadded rows, and the padding's are unspecified
        (as is an `output_index` that points into the padding). With a cache, the padding writes zeros there.
        """
        positions, length = self._check_inputs(input_ids, positions, cache, output_index, input_lengths)
        with kernel_set_scope():  # the ~220 kernel calls of a step share one kernel-set lookup
            step = self._step_inputs(input_ids, positions, cache, ntk_alpha, length, input_lengths)
            hidden = self.transformer(input_ids, step)  # [B, T, C], or [1, N, C] packed
            if output_index is not None:
                rows = torch.arange(input_ids.shape[0], device=hidden.device)
                if step.packed is None:
                    hidden = hidden[rows, output_index]  # [B, C]
                else:  # where each (row, index) sits among the packed tokens (sorted flat indices)
                    where = torch.searchsorted(step.packed, rows * input_ids.shape[1] + output_index)
                    hidden = hidden[0, where.clamp(max=step.packed.numel() - 1)]
            else:
                hidden = step.unpack(hidden)
            return self.lm_head(self.transformer.ln_f(hidden)).float()

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None,
        cache: KVCache | None,
        output_index: torch.Tensor | None,
        input_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Validate user inputs with a single host sync; return positions `[B, T]` and max position + 1."""
        if (
            input_ids.dim() != 2
            or input_ids.dtype not in (torch.int64, torch.int32)
            or input_ids.shape[1] == 0
        ):
            raise ValueError(
                f"input_ids must be an integer tensor [B, T] with T >= 1, got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}; use ids[None] for a single sequence"
            )
        bsz, steps = input_ids.shape
        given_positions = positions is not None
        if positions is None:
            positions = torch.arange(steps, device=input_ids.device).expand(bsz, steps)
        elif positions.shape != input_ids.shape or positions.is_floating_point():
            raise ValueError(
                f"positions must be an integer tensor with the shape of input_ids {(bsz, steps)}, "
                f"got {positions.dtype} {tuple(positions.shape)}"
            )
        if output_index is not None and output_index.shape != (bsz,):
            raise ValueError(f"output_index must have shape [B] = ({bsz},), got {tuple(output_index.shape)}")
        if input_lengths is not None and (input_lengths.shape != (bsz,) or input_lengths.is_floating_point()):
            raise ValueError(
                f"input_lengths must be an integer tensor [B] = ({bsz},), got {input_lengths.dtype} "
                f"{tuple(input_lengths.shape)}"
            )
        if cache is not None and bsz > cache.max_batch_size:
            raise ValueError(
                f"batch of {bsz} rows does not fit the cache (max_batch_size={cache.max_batch_size}); "
                f"create the cache with max_batch_size >= {bsz}"
            )
        # One sync for all range checks (and the key window length).
        stats = [input_ids.min(), input_ids.max()]
        if given_positions:
            stats += [positions.min(), positions.max()]
        if output_index is not None:
            stats += [output_index.min(), output_index.max()]
        if input_lengths is not None:
            stats += [input_lengths.min(), input_lengths.max()]
        values = torch.stack([s.long() for s in stats]).tolist()
        id_lo, id_hi = values[0], values[1]
        pos_lo, pos_hi = (values[2], values[3]) if given_positions else (0, steps - 1)
        vocab = self.transformer.wte.num_embeddings
        if id_lo < 0 or id_hi >= vocab:
            raise ValueError(
                f"token ids must be in [0, {vocab}), got range [{id_lo}, {id_hi}]; "
                "use the tokenizer that matches this checkpoint"
            )
        if pos_lo < 0:
            raise ValueError(f"positions must be >= 0, got {pos_lo}")
        if input_lengths is not None:
            lo, hi = values[-2:]
            values = values[:-2]
            if lo < 0 or hi > steps:
                raise ValueError(f"input_lengths must be in [0, {steps}], got range [{lo}, {hi}]")
        if output_index is not None and (values[-2] < 0 or values[-1] >= steps):
            raise ValueError(f"output_index must be in [0, {steps}), got range [{values[-2]}, {values[-1]}]")
        if cache is not None and pos_hi >= cache.max_seq_len:
            raise ValueError(
                f"position {pos_hi} does not fit the cache (max_seq_len={cache.max_seq_len}); "
                f"create the cache with max_seq_len >= {pos_hi + 1}"
            )
        return positions, pos_hi + 1

    def _step_inputs(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        ntk_alpha: float | torch.Tensor | None,
        length: int,
        input_lengths: torch.Tensor | None = None,
    ) -> _StepInputs:
        c = self.config
        device = input_ids.device
        if not c.use_dynamic_ntk:
            alpha = torch.ones(1, device=device)
        elif ntk_alpha is None:
            alpha = _ntk_alpha_tensor(positions[:, -1] + 1, c.seq_length)  # [B]
        else:
            alpha = torch.as_tensor(ntk_alpha, dtype=torch.float32, device=device).reshape(-1)
            if alpha.shape[0] not in (1, input_ids.shape[0]):
                raise ValueError(f"ntk_alpha must be a float or a tensor [B], got shape {tuple(alpha.shape)}")
        cos, sin = rotary_cos_sin(positions, c.rotary_dim, c.rotary_emb_base, alpha)
        qk_scale = None
        if c.use_logn_attn and length > c.seq_length:  # (logn is 1 up to seq_length: nothing to multiply)
            q_scale = logn_scale(positions, c.seq_length)[:, :, None, None, None]  # [B, T, 1, 1, 1]
            qk_scale = torch.cat((q_scale, torch.ones_like(q_scale)), dim=2)
        lengths = mask = None
        if cache is not None:
            lengths = positions + 1  # [B, T]
            # [B, 1, T, length]: key index s is visible to the query at position p iff s <= p (same row).
            key_idx = torch.arange(length, device=device)
            mask = (key_idx[None, None, :] <= positions[:, :, None])[:, None]
        step = _StepInputs(
            positions, cos[:, :, None], sin[:, :, None], qk_scale, cache, length, lengths, mask
        )
        if input_lengths is not None:
            real = torch.arange(input_ids.shape[1], device=device) < input_lengths[:, None]  # [B, T]
            if not bool(real.all()):
                step.shape, step.packed = input_ids.shape, real.flatten().nonzero()[:, 0]
                step.cos, step.sin = step.pack(step.cos), step.pack(step.sin)
                step.qk_scale = None if step.qk_scale is None else step.pack(step.qk_scale)
        if cache is not None and device.type == "cpu" and c.rotary_dim == c.head_dim:
            bsz, steps = input_ids.shape
            rows = torch.arange(bsz, device=device).repeat_interleave(steps)
            pos = positions.reshape(-1)
            if step.packed is not None:
                rows, pos = rows[step.packed], pos[step.packed]
            step.token_rows, step.token_positions = rows, pos.long().contiguous()
            step.token_cos = step.cos.reshape(-1, c.rotary_dim)
            step.token_sin = step.sin.reshape(-1, c.rotary_dim)
            if step.qk_scale is not None:
                step.token_q_scale = step.qk_scale[:, :, 0].reshape(-1).contiguous()
        return step
