"""Load-time plans for quantized checkpoints: how `load()` reads qwenkit-quantized, GPTQ and float-to-quantize files.

A plan tells `load()` which tensors to expect in the files (for its strict key/shape/dtype checks) and turns
each tensor as it is read into the model's own (quantized) tensors, so the float model never exists in full:
- qwenkit checkpoints (`quantization_config.quant_method == "qwenkit"`): empty quantized modules on meta, filled
  like any float checkpoint, nothing re-quantized;
- GPTQ checkpoints (AutoGPTQ layout): each linear converted exactly once its pieces are read (`gptq`);
- float checkpoints with `load(..., quantize="int8"|"int4")`: each weight quantized as it is read.
Finding, opening and checking files stays in `loading`; writing quantized checkpoints is `quantize`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model.config import QwenConfig
from ..quant.scheme import QUANT_METHOD, QuantScheme, set_submodule, swap_empty, target_linears
from .gptq import GptqConfig, convert_linear, gptq_config

# ---- load-time plans ---------------------------------------------------------------------------------------


class LoadPlan:
    """How `load()` turns a checkpoint's tensors into the model's; subclasses per kind of checkpoint."""

    def expected(
        self, net: nn.Module, expected: dict[str, torch.Tensor], stored: set[str]
    ) -> dict[str, torch.Tensor]:
        """The tensors the files must hold (meta: shape and read dtype), given the float model's `expected`
        and the keys `stored` in the files. May swap modules of `net` (on meta) for quantized ones."""
        raise NotImplementedError

    def transform(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """One tensor as read from the files -> the state entries it becomes (none until a group is complete)."""
        return {key: tensor}


def plan_load(config: QwenConfig, model_dir: Path, quantize: str | QuantScheme | None) -> LoadPlan | None:
    """The plan for a checkpoint and a `quantize=` request; None for a float checkpoint loaded as float."""
    requested = None if quantize is None else QuantScheme.parse(quantize)
    qc = config.quantization_config
    if qc is not None and qc.get("quant_method") == QUANT_METHOD:
        stored = QuantScheme.from_config(qc)
        _check_request(quantize, requested, stored.bits, stored, f"qwenkit {stored.name} ({qc})")
        return _StoredPlan(stored)
    gptq = gptq_config(config, model_dir)
    if gptq is not None:
        _check_request(quantize, requested, gptq.bits, None, f"GPTQ {gptq.bits}-bit")
        return _GptqPlan(gptq)
    if qc is not None:
        raise ValueError(
            f"quantization_config with quant_method {qc.get('quant_method')!r} is not supported; qwenkit reads "
            "its own quantized checkpoints and GPTQ (AutoGPTQ) ones"
        )
    return None if requested is None else _QuantizeAtLoad(requested)


def _check_request(
    quantize: str | QuantScheme | None,
    requested: QuantScheme | None,
    bits: int,
    stored: QuantScheme | None,
    what: str,
) -> None:
    exact = isinstance(quantize, QuantScheme) and stored is not None
    if requested is not None and (requested.bits != bits or (exact and requested != stored)):
        raise ValueError(
            f"the checkpoint is already quantized ({what}); it cannot be loaded with quantize={quantize!r}. "
            f"Drop quantize= (or pass quantize='int{bits}'), or quantize the float checkpoint instead"
        )


def _replace_keys(expected: dict[str, torch.Tensor], name: str, module: nn.Module) -> None:
    """Swap the entries of module `name` in `expected` for `module`'s own state (meta tensors)."""
    for key in [k for k in expected if k.startswith(name + ".")]:
        del expected[key]
    expected.update({f"{name}.{k}": v for k, v in module.state_dict().items()})


class _StoredPlan(LoadPlan):
    """A qwenkit-quantized checkpoint: the files hold exactly the quantized modules' buffers."""

    def __init__(self, scheme: QuantScheme) -> None:
        self.scheme = scheme

    def expected(self, net, expected, stored):
        expected = dict(expected)
        for name in swap_empty(net, self.scheme):
            _replace_keys(expected, name, net.get_submodule(name))
        return expected


class _QuantizeAtLoad(LoadPlan):
    """A float checkpoint quantized while it is read: each weight is read in fp32 and quantized at once."""

    def __init__(self, scheme: QuantScheme) -> None:
        self.scheme = scheme
        self.targets: dict[str, tuple[str, int]] = {}  # weight key -> (module name, group size)

    def expected(self, net, expected, stored):
        expected = dict(expected)
        for name in target_linears(net, self.scheme.lm_head):
            key = f"{name}.weight"
            self.targets[key] = (name, self.scheme.layer_group_size(expected[key].shape[1]))
            expected[key] = torch.empty(expected[key].shape, dtype=torch.float32, device="meta")
        swap_empty(net, self.scheme)  # the biases keep their keys; only the weights are transformed
        return expected

    def transform(self, key, tensor):
        if key not in self.targets:
            return {key: tensor}
        name, group_size = self.targets[key]
        parts = self.scheme.linear_class.quantize_weight(tensor, group_size)
        return {f"{name}.{suffix}": value for suffix, value in parts.items()}


class _GptqPlan(LoadPlan):
    """An AutoGPTQ checkpoint: the pieces of each quantized linear are collected, then converted exactly."""

    def __init__(self, cfg: GptqConfig) -> None:
        self.cfg = cfg
        self.net: nn.Module | None = None
        self.owner: dict[str, str] = {}  # tensor key -> module name
        self.needed: dict[str, int] = {}  # module name -> number of pieces
        self.parts: dict[str, dict[str, torch.Tensor]] = {}
        self.had_bias: dict[str, bool] = {}

    def expected(self, net, expected, stored):
        self.net = net
        expected = dict(expected)
        for name in target_linears(net, lm_head=True):
            if f"{name}.qweight" not in stored:
                continue  # this linear is stored in float (Qwen's lm_head)
            linear = net.get_submodule(name)
            pieces = {
                f"{name}.{suffix}": torch.empty(shape, dtype=dtype, device="meta")
                for suffix, (shape, dtype) in self.cfg.shapes(linear.in_features, linear.out_features).items()
                if suffix != "g_idx" or f"{name}.g_idx" in stored  # old GPTQ-for-LLaMa files have no g_idx
            }
            # AutoGPTQ writes a bias for every linear (zeros where the model has none); c_attn's is required.
            self.had_bias[name] = linear.bias is not None
            if linear.bias is not None or f"{name}.bias" in stored:
                pieces[f"{name}.bias"] = torch.empty(
                    linear.out_features, dtype=linear.weight.dtype, device="meta"
                )
            for key in [k for k in expected if k.startswith(name + ".")]:
                del expected[key]
            expected.update(pieces)
            self.owner.update(dict.fromkeys(pieces, name))
            self.needed[name] = len(pieces)
        if not self.needed:
            raise ValueError(
                "config says GPTQ, but the weights hold no `.qweight` tensors; the checkpoint is incomplete "
                "or its quantization_config is wrong"
            )
        return expected

    def transform(self, key, tensor):
        name = self.owner.get(key)
        if name is None:
            return {key: tensor}
        parts = self.parts.setdefault(name, {})
        parts[key[len(name) + 1 :]] = tensor
        if len(parts) < self.needed[name]:
            return {}
        del self.parts[name]
        bias = parts.get("bias")
        if bias is not None and not self.had_bias[name] and not bool(bias.any()):
            bias = None  # AutoGPTQ's zero bias on a layer without one
        module = convert_linear(
            self.cfg, parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), bias
        )
        assert self.net is not None
        set_submodule(self.net, name, module)
        return {f"{name}.{k}": v for k, v in module.state_dict().items()}
