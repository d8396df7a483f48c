"""LoRA adapters on qwenkit models: the `LoraLinear` wrapper, adding / merging adapters, and the gradient path
through a frozen (float or quantized) base layer.

`LoraLinear` computes `base(x) + lora_B(lora_A(dropout(x))) * alpha / r` exactly as peft's LoRA layer, with peft's
parameter names (`base_layer`, `lora_A`, `lora_B`), so an adapter's tensors are peft's. The peft file format
lives in `adapter_files`; the training loop in `qwenkit.train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..quant.linear import QuantizedLinear

DEFAULT_TARGETS = ("c_attn", "c_proj", "w1", "w2")  # the official finetune.py's lora_target_modules
# fp32 bytes of a weight tile converted at once in the input-gradient pass (bounds its temporaries).
_TILE_BYTES = 64 << 20


@dataclass
class LoraSpec:
    """What an adapter is: rank, alpha, dropout and the module names it targets (peft's LoraConfig fields)."""

    r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name the linear layers to adapt, e.g. c_attn,c_proj,w1,w2")
        self.target_modules = tuple(self.target_modules)
        self.modules_to_save = tuple(self.modules_to_save or ())

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class _FrozenLinear(torch.autograd.Function):
    """`y = base(x)` with the gradient flowing to `x` only: the forward runs whatever kernel the frozen base
    uses (fast CPU GEMV, int4/int8 kernels), the backward multiplies by the (dequantized) weight tile by tile,
    so no float copy of the weight is kept for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return input_grad(ctx.base, grad_out), None


def input_grad(base: nn.Module, grad_out: torch.Tensor) -> torch.Tensor:
    """`grad_out @ W` for the frozen weight `W` `[N, K]` of `base` (float or quantized), in fp32 (on CPU) tiles
    of rows: never more than one tile of the weight exists in float."""
    dtype = torch.float32 if grad_out.device.type == "cpu" else grad_out.dtype
    n, k = base.out_features, base.in_features
    g = grad_out.reshape(-1, n).to(dtype)  # [M, N]
    rows = max(1, _TILE_BYTES // (4 * k))
    quantized = isinstance(base, QuantizedLinear)
    q = base.unpacked() if quantized else None  # integer weights [N, K], stored column order
    grad_x = torch.zeros(g.shape[0], k, dtype=dtype, device=grad_out.device)  # [M, K]
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        if quantized:
            offsets = None if base.offsets is None else base.offsets[start:stop]
            w = kernels.dequantize(q[start:stop], base.scales[start:stop], offsets, base.group_size, dtype)
        else:
            w = base.weight[start:stop].to(dtype)  # [rows, K]
        grad_x.addmm_(g[:, start:stop], w)
    if quantized and base.perm is not None:  # stored column j is input feature perm[j]
        grad_x = torch.empty_like(grad_x).index_copy_(-1, base.perm, grad_x)
    return grad_x.view(*grad_out.shape[:-1], k).to(grad_out.dtype)


def route_frozen_linears(model: nn.Module) -> list[str]:
    """Send the input gradient of every frozen linear layer outside the adapters (lm_head, layers not targeted)
    through `input_grad`, keeping the module and its names; returns their names.

    Plain autograd would save a float copy of each weight for the backward (Qwen-1.8B's lm_head: 1.2 GB in
    fp32; a quantized layer's dequantized weight likewise) and multiply bf16 by bf16, which CPUs without
    AVX-512 BF16 emulate, ~100x slower than fp32 tiles."""
    owned = {id(child) for m in model.modules() if isinstance(m, LoraLinear) for child in m.children()}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, QuantizedLinear)) or id(module) in owned:
            continue
        if any(p.requires_grad for p in module.parameters()):
            continue
        if not isinstance(vars(module).get("forward"), _FrozenForward):
            module.forward = _FrozenForward(module)
        names.append(name)
    return names


class _FrozenForward:
    """An instance `forward` (a plain callable, so no module names change): the layer's own forward, through
    `_FrozenLinear` when the input needs a gradient. `_FrozenLinear` calls the layer again with autograd off,
    which lands in the plain branch."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.plain = type(module).forward.__get__(module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenLinear.apply(x, self.module)
        return self.plain(x)


class LoraLinear(nn.Module):
    """A frozen linear layer (`nn.Linear` or a qwenkit quantized linear) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, spec: LoraSpec, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.scales.device if isinstance(base, QuantizedLinear) else base.weight.device
        kw = dict(bias=False, dtype=dtype or torch.float32, device=device)
        self.lora_A = nn.Linear(self.in_features, spec.r, **kw)
        self.lora_B = nn.Linear(spec.r, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(spec.lora_dropout) if spec.lora_dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """peft's default init: A Kaiming-uniform (a = sqrt(5)), B zero, so a fresh adapter changes nothing."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            out = _FrozenLinear.apply(x, self.base_layer)
        else:
            out = self.base_layer(x)
        a = self.lora_A.weight
        delta = F.linear(F.linear(self.lora_dropout(x).to(a.dtype), a), self.lora_B.weight) * self.scaling
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update `B @ A * scaling` `[N, K]` in fp32 that merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def lora_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the linear layers (float or quantized) whose last name component is in `targets`, as peft
    matches `target_modules` given as a list."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, QuantizedLinear)) and name.rpartition(".")[2] in targets
    ]
    if not names:
        raise ValueError(
            f"no linear layer of the model is named {', '.join(targets)}; Qwen's are c_attn, c_proj, w1, w2 "
            "(and lm_head)"
        )
    return names


def add_lora(model: nn.Module, spec: LoraSpec, *, dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every target layer of `model` in a fresh `LoraLinear` (B = 0: the model's outputs are unchanged)
    and return the wrapped names. Adapter weights are fp32 unless `dtype` says otherwise."""
    names = lora_targets(model, spec.target_modules)
    for name in names:
        owner, _, leaf = name.rpartition(".")
        parent = model.get_submodule(owner)
        setattr(parent, leaf, LoraLinear(getattr(parent, leaf), spec, dtype=dtype))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """{name: LoraLinear} of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its float base weight (`W += B @ A * scaling`, computed in fp32) and put the
    plain layer back, so the model has its original module names; returns how many layers were merged.
    Quantized bases cannot be merged (as with peft on GPTQ): merge onto the float checkpoint instead."""
    merged = 0
    for name, module in lora_modules(model).items():
        base = module.base_layer
        if isinstance(base, QuantizedLinear):
            raise ValueError(
                f"{name} is quantized ({type(base).__name__}); an adapter cannot be merged into quantized weights. "
                "Merge onto the float checkpoint (e.g. Qwen-1_8B-Chat, not -Int4), then quantize the result"
            )
        with torch.no_grad():
            base.weight.copy_((base.weight.float() + module.delta_weight().to(base.weight.device)).to(base.weight.dtype))
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, base)
        merged += 1
    return merged
