"""`QuantScheme` (what `config.json` records) and `quantize_model()` (the module swap on a whole model).

Swapped: every transformer linear (`attn.c_attn`, `attn.c_proj`, `mlp.w1`, `mlp.w2`, `mlp.c_proj`) and, by
default, `lm_head`: it is about a fifth of the weights read per token on Qwen-1.8B. The embedding stays in the
model dtype (a lookup reads one row per token) and so does a `lm_head` tied to it. The model code is unchanged:
modules are replaced by name. Reading and writing checkpoints is left to `qwenkit.checkpoints`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from .int4 import Int4Linear
from .int8 import Int8Linear
from .linear import QuantizedLinear, resolve_group_size, validate_group_size

QUANT_METHOD = "qwenkit"
FORMAT_VERSION = 1
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
_CLASSES: dict[int, type[QuantizedLinear]] = {8: Int8Linear, 4: Int4Linear}
_NAMES = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantScheme:
    """A weight-only quantization scheme: `bits` 8 or 4, `group_size`, and whether `lm_head` is quantized.

    `group_size` None picks the default of `bits`: int8 per output channel (recorded as -1), int4 128. A layer
    narrower than the group size uses one group per row.
    """

    bits: int
    group_size: int | None = None
    lm_head: bool = True

    def __post_init__(self) -> None:
        if self.bits not in _CLASSES:
            raise ValueError(f"bits must be 8 or 4, got {self.bits!r}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", -1 if self.bits == 8 else Int4Linear.default_group_size)
        validate_group_size(self.group_size)  # divisibility is checked per layer
        if not isinstance(self.lm_head, bool):
            raise ValueError(f"lm_head must be true or false, got {self.lm_head!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def linear_class(self) -> type[QuantizedLinear]:
        return _CLASSES[self.bits]

    def layer_group_size(self, in_features: int) -> int:
        """The group size used for a layer with `in_features` inputs (ValueError if it does not divide them)."""
        return resolve_group_size(in_features, self.group_size)

    @classmethod
    def parse(cls, value: str | QuantScheme) -> QuantScheme:
        """A scheme from "int8" / "int4" (defaults) or a `QuantScheme`."""
        if isinstance(value, QuantScheme):
            return value
        if isinstance(value, str) and value.lower() in _NAMES:
            return cls(_NAMES[value.lower()])
        raise ValueError(f"unknown quantization {value!r}; valid: int8, int4 (or a QuantScheme)")

    def to_config(self) -> dict[str, Any]:
        """The `quantization_config` entry of `config.json`."""
        return {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "group_size": self.group_size,
            "lm_head": self.lm_head,
            "version": FORMAT_VERSION,
        }

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> QuantScheme:
        """Inverse of `to_config`; ValueError for another method or a newer format version."""
        if d.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"not a qwenkit quantization_config: {d!r}")
        if d.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(
                f"quantization_config version {d.get('version')!r} is not supported by this qwenkit (it reads "
                f"version {FORMAT_VERSION}); upgrade qwenkit or re-quantize the float checkpoint"
            )
        missing = [k for k in ("bits", "group_size", "lm_head") if k not in d]
        if missing:
            raise ValueError(f"quantization_config lacks {missing}; re-create it with `qwenkit quantize`")
        return cls(d["bits"], d["group_size"], d["lm_head"])


def weight_precision(model: nn.Module) -> str | None:
    """Returns "int8" / "int4" when the model's linear layers are quantized (the narrowest width present), else None.

    Read off the modules, so it holds however they got there: quantized at load, a qwenkit-quantized checkpoint
    or a GPTQ one.
    """
    bits = [m.bits for m in model.modules() if isinstance(m, QuantizedLinear)]
    return f"int{min(bits)}" if bits else None


def target_linears(model: nn.Module, lm_head: bool = True) -> list[str]:
    """Names of the linears a scheme swaps: every block's five, then `lm_head` (unless tied to the embedding)."""
    config = model.config
    names = [f"transformer.h.{i}.{leaf}" for i in range(config.num_hidden_layers) for leaf in BLOCK_LINEARS]
    if lm_head and not config.tie_word_embeddings:
        names.append("lm_head")
    return names


def quantize_model(
    model: nn.Module,
    scheme: str | QuantScheme,
    group_size: int | None = None,
    include_lm_head: bool = True,
) -> nn.Module:
    """Quantize a float `QWenLMHeadModel` in place (and return it): each target linear becomes an
    `Int8Linear`/`Int4Linear`, one layer at a time, so peak memory is the model plus one layer in fp32.

    `scheme` is "int8", "int4" or a `QuantScheme` (then `group_size`/`include_lm_head` must stay at their
    defaults). `model.config.quantization_config` records the scheme, so `save_quantized` can write it.
    """
    if isinstance(scheme, QuantScheme):
        if group_size is not None or not include_lm_head:
            raise ValueError("pass group_size/include_lm_head inside the QuantScheme, not next to it")
    else:
        scheme = QuantScheme(QuantScheme.parse(scheme).bits, group_size, include_lm_head)
    if model.config.quantization_config is not None:
        raise ValueError(
            f"the model is already quantized ({model.config.quantization_config}); load the float checkpoint"
        )
    names = target_linears(model, scheme.lm_head)
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is a {type(linear).__name__}, not an nn.Linear; cannot quantize it")
        g = scheme.layer_group_size(linear.in_features)
        set_submodule(model, name, scheme.linear_class.from_linear(linear, g))
        del linear  # the float weight is freed here, before the next layer is quantized
    record_scheme(model, scheme)
    return model


def swap_empty(model: nn.Module, scheme: QuantScheme) -> list[str]:
    """Replace the target linears by empty quantized modules on their device (meta when loading); their names."""
    names = target_linears(model, scheme.lm_head)
    cls = scheme.linear_class
    for name in names:
        linear = model.get_submodule(name)
        empty = cls(
            linear.in_features,
            linear.out_features,
            scheme.layer_group_size(linear.in_features),
            bias=linear.bias is not None,
            offsets=scheme.bits == 4,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        set_submodule(model, name, empty)
    record_scheme(model, scheme)
    return names


def record_scheme(model: nn.Module, scheme: QuantScheme) -> None:
    """Store the scheme in a fresh copy of `model.config` (a config object may be shared between models)."""
    effective = dataclasses.replace(scheme, lm_head=scheme.lm_head and not model.config.tie_word_embeddings)
    model.config = dataclasses.replace(model.config, quantization_config=effective.to_config())


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, module)
