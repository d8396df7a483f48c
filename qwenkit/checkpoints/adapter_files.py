"""LoRA adapters in peft's file format: `adapter_config.json` + `adapter_model.safetensors` (or the older
`adapter_model.bin`), keys `base_model.model.<module path>.lora_A/B.weight`.

`save_adapter` writes what `PeftModel.from_pretrained` reads; `apply_adapter` reads adapters written by peft
(the official `finetune.py` included) or by qwenkit and wraps the model's layers (`checkpoints.lora`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lora import LoraSpec, add_lora, lora_modules
from .weight_files import read_json

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
PREFIX = "base_model.model."


def spec_from_config(config: dict[str, Any], path: Path) -> LoraSpec:
    """A `LoraSpec` from peft's adapter_config.json; ValueError for what qwenkit cannot apply."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LoRA; only LoRA adapters load")
    for key, plain in (("use_dora", False), ("fan_in_fan_out", False), ("rank_pattern", {}), ("alpha_pattern", {})):
        if config.get(key) not in (None, plain):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (plain LoRA only)")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config['bias']!r} is not supported; train with bias 'none'")
    targets = config.get("target_modules")
    if isinstance(targets, str):  # peft allows one regex; qwenkit matches names
        raise ValueError(f"{path}: target_modules as a regex ({targets!r}) is not supported; list the module names")
    try:
        return LoraSpec(
            r=config["r"],
            lora_alpha=config.get("lora_alpha", 8),
            lora_dropout=config.get("lora_dropout", 0.0),
            target_modules=tuple(targets or ()),
            use_rslora=bool(config.get("use_rslora", False)),
            modules_to_save=tuple(config.get("modules_to_save") or ()),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed adapter config ({type(e).__name__}: {e})") from None


def config_from_spec(spec: LoraSpec, base_model: str) -> dict[str, Any]:
    """peft's adapter_config.json fields for `spec` (task CAUSAL_LM, bias none, inference mode)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.r,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "target_modules": list(spec.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": spec.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": list(spec.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` under peft's saved names (`base_model.model.<path>.lora_A.weight`)."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return state


def save_adapter(model: nn.Module, out_dir: str | os.PathLike[str], spec: LoraSpec, base_model: str) -> Path:
    """Write `model`'s adapter in peft's format into `out_dir` (created); returns the directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    if not state:
        raise ValueError("the model has no LoRA layers to save; add an adapter first (add_lora)")
    save_file(state, str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config_from_spec(spec, base_model), indent=2) + "\n", encoding="utf-8")
    return out


def read_adapter(adapter_dir: str | os.PathLike[str]) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """(spec, tensors by module path: `<path>.lora_A.weight` ...) of a peft-format adapter directory."""
    path = Path(adapter_dir).expanduser()
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a LoRA adapter directory: no {CONFIG_FILE}; pass the directory `qwenkit finetune "
            "--method lora` (or peft's save_pretrained) wrote"
        )
    spec = spec_from_config(read_json(path / CONFIG_FILE), path / CONFIG_FILE)
    if (path / SAFETENSORS_FILE).is_file():
        from safetensors.torch import load_file

        raw = load_file(str(path / SAFETENSORS_FILE))
    elif (path / BIN_FILE).is_file():
        raw = torch.load(path / BIN_FILE, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has {CONFIG_FILE} but no {SAFETENSORS_FILE} or {BIN_FILE}")
    return spec, {_module_key(k): v for k, v in raw.items()}


def _module_key(key: str) -> str:
    """peft's saved key -> the model's name: drop the prefix, the adapter name and modules_to_save wrappers."""
    key = key.removeprefix(PREFIX)
    parts = [p for p in key.split(".") if p not in ("default", "modules_to_save")]
    return ".".join(parts)


def apply_adapter(model: nn.Module, adapter_dir: str | os.PathLike[str]) -> LoraSpec:
    """Wrap `model`'s target layers in `LoraLinear` and fill them (and any modules_to_save weights) from the
    adapter in `adapter_dir`. Every tensor must match a layer in name and shape; ValueError names any that
    does not. The adapter runs in the model's float dtype."""
    spec, tensors = read_adapter(adapter_dir)
    dtype = model.transformer.wte.weight.dtype if hasattr(model, "transformer") else torch.float32
    add_lora(model, spec, dtype=dtype)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    expected = {f"{n}.lora_{ab}.weight" for n in lora_modules(model) for ab in "AB"}
    missing = sorted(expected - set(tensors))
    unknown = sorted(set(tensors) - set(params))
    if missing or unknown:
        raise ValueError(
            f"adapter {adapter_dir} does not fit this model: missing {missing[:3]}, unknown {unknown[:3]} "
            f"({len(missing)} missing, {len(unknown)} unknown); was it trained on another model size?"
        )
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = params[key]
            if target.shape != tensor.shape:
                raise ValueError(
                    f"adapter tensor {key} is {list(tensor.shape)}, the model expects {list(target.shape)}; "
                    "the adapter was trained on another model size"
                )
            target.copy_(tensor.to(target.dtype))
    return spec
