"""`make_checkpoint()`: synthetic Qwen (v1) checkpoints in the exact official Hugging Face layout.

Writes config.json, generation_config.json, tokenizer_config.json, qwen.tiktoken and safetensors weights (one
`model.safetensors`, or `model-0000k-of-0000n.safetensors` shards with their index) filled with deterministic
random values. Shapes come from the model built on the meta device; reading checkpoints is left to `loading`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..generation.sampling import OFFICIAL_GENERATION_CONFIG
from ..model.config import preset as config_preset
from ..model.transformer import QWenLMHeadModel
from ..tokenizer.vocab import VOCAB_FILE_NAME, official_vocab_file
from .loading import DTYPE_NAMES, SAFETENSORS_FILE, SAFETENSORS_INDEX, parse_dtype
from .weight_files import write_json

# The official 1.8B checkpoint ships as two shards of about 2 GB.
DEFAULT_SHARD_BYTES = 2 * 10**9

GENERATION_CONFIG: dict[str, Any] = {**OFFICIAL_GENERATION_CONFIG, "transformers_version": "4.37.2"}
TOKENIZER_CONFIG: dict[str, Any] = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}
_DTYPE_FLAGS = ("bf16", "fp16", "fp32", "torch_dtype")


def make_checkpoint(
    out_dir: str | os.PathLike[str],
    preset: str = "tiny",
    *,
    dtype: str | torch.dtype = "bfloat16",
    seed: int = 0,
    shards: int | None = None,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random checkpoint of `preset` ("tiny", "1.8b", "7b", "14b", "72b") into `out_dir`; return it.

    `overrides` replace config fields (e.g. `{"num_hidden_layers": 4}`); the stored dtype is set by `dtype`
    only. The same `seed` gives the same weights whatever the shard count. `shards` forces the number of
    safetensors files (default: about 2 GB each; 1 -> a single `model.safetensors`). An existing non-empty
    `out_dir` is refused unless `overwrite`, which replaces only the files written here.
    """
    torch_dtype = parse_dtype(dtype)
    overrides = dict(overrides or {})
    clash = sorted(set(overrides) & set(_DTYPE_FLAGS))
    if clash:
        raise ValueError(f"overrides may not set {clash}: the stored dtype is chosen with dtype=")
    config = config_preset(preset, **overrides)
    name = DTYPE_NAMES[torch_dtype]
    config = dataclasses.replace(
        config, bf16=name == "bfloat16", fp16=name == "float16", fp32=name == "float32", torch_dtype=name
    )
    shapes = _weight_shapes(QWenLMHeadModel(config, device="meta"))
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    sizes = [math.prod(shape) * itemsize for shape in shapes.values()]
    n_shards = _shard_count(shards, sizes)
    out = prepare_dir(Path(out_dir), overwrite)

    write_json(out / "config.json", config.to_dict())
    write_json(out / "generation_config.json", GENERATION_CONFIG)
    write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    shutil.copyfile(official_vocab_file(), out / VOCAB_FILE_NAME)

    generator = torch.Generator().manual_seed(seed)
    groups = plan_shards(sizes, n_shards)
    keys = list(shapes)
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file_name = SAFETENSORS_FILE if n_shards == 1 else f"model-{number:05d}-of-{n_shards:05d}.safetensors"
        # One shard in memory at a time; tensors are drawn in key order, so sharding does not change values.
        tensors = {keys[i]: random_weight(keys[i], shapes[keys[i]], generator).to(torch_dtype) for i in group}
        save_file(tensors, out / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors
    if n_shards > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(out / SAFETENSORS_INDEX, index)
    return out


def random_weight(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A random fp32 tensor for checkpoint key `key`, scaled so a deep random model stays informative.

    - Embedding rows ~ N(0, 1): the residual stream starts at RMS 1, the scale every block's output lives at.
    - Linear weights ~ N(0, 1/fan_in): each projection keeps the RMS of its (RMS-normalised) input, so q.k/sqrt(d)
      scores have std ~1 and attention is neither uniform nor one-hot; what a token sees really changes the
      output. The lm_head gives logits of std ~1 the same way.
    - Biases ~ N(0, 0.02^2), norm weights ~ 1 + N(0, 0.05^2): present and distinct, but not dominant.
    Every block adds an O(1) update to the residual, so over 24 layers its RMS grows only like sqrt(layers)
    (about 5x), while the pre-norms keep each block's input at RMS 1: no overflow in fp16/bf16.
    """
    noise = torch.randn(shape, generator=generator)
    if key.endswith(".bias"):
        return noise.mul_(0.02)
    if key.endswith("wte.weight"):
        return noise
    if len(shape) == 1:  # RMSNorm weights: ln_1, ln_2, ln_f
        return noise.mul_(0.05).add_(1.0)
    assert len(shape) == 2, f"no init rule for {key} {shape}"
    return noise.mul_(shape[1] ** -0.5)  # nn.Linear weight is [out, in]


def _weight_shapes(net: QWenLMHeadModel) -> dict[str, tuple[int, ...]]:
    # named_parameters() lists a tied parameter once, under its first name, as Hugging Face saves it.
    names = [name for name, _ in net.named_parameters()]
    state = net.state_dict()
    return {name: tuple(state[name].shape) for name in names}


def _shard_count(shards: int | None, sizes: list[int]) -> int:
    if shards is None:
        return max(1, math.ceil(sum(sizes) / DEFAULT_SHARD_BYTES))
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= len(sizes):
        raise ValueError(
            f"shards must be an integer from 1 to {len(sizes)} (the number of tensors), got {shards!r}"
        )
    return shards


def plan_shards(sizes: list[int], n_shards: int) -> list[list[int]]:
    """Split tensor indices, in order, into exactly `n_shards` non-empty groups of roughly equal bytes."""
    groups: list[list[int]] = [[]]
    open_bytes, left_bytes = 0, sum(sizes)  # bytes in the current group / not in a closed group
    for i, size in enumerate(sizes):
        shards_left = n_shards - len(groups) + 1  # including the current one
        tensors_left = len(sizes) - i  # including this one
        if groups[-1] and shards_left > 1:
            # Close when the later shards would otherwise run out of tensors, or when this tensor's midpoint
            # lies past an even share of what is left.
            if tensors_left < shards_left or open_bytes + size / 2 > left_bytes / shards_left:
                groups.append([])
                left_bytes -= open_bytes
                open_bytes = 0
        groups[-1].append(i)
        open_bytes += size
    assert len(groups) == n_shards, (len(groups), n_shards)
    return groups


def prepare_dir(out: Path, overwrite: bool) -> Path:
    """Create `out`; a non-empty one needs `overwrite` (which removes only checkpoint files)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; pass a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty; pass an empty or new directory, or overwrite=True")
        patterns = ("*.json", "model*.safetensors", "pytorch_model*.bin", VOCAB_FILE_NAME)
        for stale in {p for pattern in patterns for p in out.glob(pattern) if p.is_file()}:
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out
