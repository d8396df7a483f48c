"""Writing quantized checkpoints: `save_quantized()` and `quantize_checkpoint()` (what `qwenkit quantize` runs).

Sits above `loading` (a float checkpoint is loaded with `quantize=` and saved); the on-disk format it writes is the
one `quant_plans` reads back.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.config import QwenConfig
from ..quant.scheme import QUANT_METHOD, QuantScheme
from ..tokenizer.vocab import VOCAB_FILE_NAME, official_vocab_file
from .gptq import gptq_config
from .loading import DTYPE_NAMES, load, parse_dtype, resolve_model_dir
from .synthetic import DEFAULT_SHARD_BYTES, GENERATION_CONFIG, TOKENIZER_CONFIG, plan_shards, prepare_dir
from .weight_files import write_json


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    source_dir: str | os.PathLike[str] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a qwenkit-quantized model as a checkpoint in the official layout; `load(out_dir)` reopens it.

    Files: config.json (with `quantization_config`), generation_config.json (the model's), tokenizer_config.json,
    qwen.tiktoken (from `source_dir` when it has one, else the official file) and safetensors shards of about
    `shard_bytes` (one `model.safetensors` when it fits) with their index. The float tensors keep the dtype of
    the embedding, which config.json's torch_dtype records.
    """
    qc = model.config.quantization_config
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            "only models quantized by qwenkit (quantize_model() or load(..., quantize=...)) can be saved; "
            f"this one has quantization_config {qc!r}"
        )
    return save_model(model, out_dir, source_dir=source_dir, shard_bytes=shard_bytes, overwrite=overwrite)


def save_model(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    source_dir: str | os.PathLike[str] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a float or qwenkit-quantized model in the official layout (the files of `save_quantized`);
    finetuned and merged models (`qwenkit.train`, `qwenkit merge-lora`) are saved with it."""
    state = _unique_state(model)
    dtype_name = DTYPE_NAMES[model.transformer.wte.weight.dtype]
    config = dataclasses.replace(
        model.config,
        bf16=dtype_name == "bfloat16",
        fp16=dtype_name == "float16",
        fp32=dtype_name == "float32",
        torch_dtype=dtype_name,
    )
    out = prepare_dir(Path(out_dir), overwrite)
    write_json(out / "config.json", config.to_dict())
    write_json(
        out / "generation_config.json", getattr(model, "generation_config", None) or GENERATION_CONFIG
    )
    write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    vocab = Path(source_dir) / VOCAB_FILE_NAME if source_dir is not None else None
    shutil.copyfile(
        vocab if vocab is not None and vocab.is_file() else official_vocab_file(), out / VOCAB_FILE_NAME
    )
    _write_shards(out, state, shard_bytes)
    return out


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with a tied parameter once, under its first name (as Hugging Face saves it)."""
    seen: set[int] = set()
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            state[key] = value.detach()
    return state


def _write_shards(out: Path, state: dict[str, torch.Tensor], shard_bytes: int) -> None:
    keys = list(state)
    sizes = [state[k].nbytes for k in keys]
    n_shards = min(len(keys), max(1, math.ceil(sum(sizes) / shard_bytes)))
    weight_map = {}
    for number, group in enumerate(plan_shards(sizes, n_shards), start=1):
        name = "model.safetensors" if n_shards == 1 else f"model-{number:05d}-of-{n_shards:05d}.safetensors"
        tensors = {
            keys[i]: state[keys[i]].contiguous().cpu() for i in group
        }  # one shard on the host at a time
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if n_shards > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(out / "model.safetensors.index.json", index)




def quantize_checkpoint(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    scheme: str | QuantScheme,
    *,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Quantize a float checkpoint (directory or hub id) once and save it to `out_dir` (`qwenkit quantize`).

    The float tensors (embedding, norms, biases) keep the checkpoint's stored dtype; quantization math is fp32,
    on `device` ("auto": CUDA when available), one weight at a time.
    """
    scheme = QuantScheme.parse(scheme)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty; pass an empty or new directory, or overwrite")
    model_dir = resolve_model_dir(model)
    config = QwenConfig.from_file(model_dir / "config.json")
    if config.quantization_config is not None or gptq_config(config, model_dir) is not None:
        raise ValueError(f"{model_dir} is already quantized; quantize the float (bf16/fp16/fp32) checkpoint")
    dtype = parse_dtype(config.torch_dtype or "bfloat16")
    net, _ = load(model_dir, dtype=dtype, device=device, quantize=scheme, progress=progress)
    return save_quantized(net, out, source_dir=model_dir, overwrite=overwrite)
