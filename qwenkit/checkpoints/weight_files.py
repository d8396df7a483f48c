"""Reading the weight files of a checkpoint: safetensors and `pytorch_model*.bin` readers, strict layout checks.

Every key, shape and dtype is checked against what the model expects before any data is read; tensors are then
filled in place chunk by chunk (or mapped from the file), so weights exist once in memory. Which model, dtype and
device, and hub resolution, are left to `loading`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..model.config import QwenConfig

_CHUNK_BYTES = 64 << 20
_FLOAT_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Integer tensors of quantized checkpoints (qwenkit.quant): their stored type must match exactly.
# numpy cannot hold bf16: such tensors are mapped as uint16 and viewed as bf16.
_NUMPY_VIEW = {
    torch.float32: (np.float32, torch.float32),
    torch.float16: (np.float16, torch.float16),
    torch.bfloat16: (np.uint16, torch.bfloat16),
}
_INT_CODES = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


# ---- reading tensors -------------------------------------------------------------------------------------------


class SafetensorsFile:
    """One safetensors file: names and shapes from its header, data copied chunk by chunk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with safe_open(path, framework="pt") as f:  # validates the header and the file length
                slices = {key: f.get_slice(key) for key in f.keys()}
                self.entries = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
        except (SafetensorError, OSError) as e:
            raise ValueError(
                f"{path} is not a readable safetensors file ({e}); it is probably truncated or corrupt: "
                "re-download it"
            ) from e

    def keys(self) -> list[str]:
        return list(self.entries)

    def copy_into(self, key: str, dst: torch.Tensor) -> None:
        # A safe_open handle keeps every page it has read mapped (and counted in RSS) until it closes, so it
        # is reopened per chunk: peak memory stays at the model plus about one chunk, also when converting.
        shape = self.entries[key][0]
        if not shape or dst.nbytes <= _CHUNK_BYTES:
            with safe_open(self.path, framework="pt") as f:
                dst.copy_(f.get_tensor(key))
            return
        rows = max(1, _CHUNK_BYTES * shape[0] // dst.nbytes)
        for start in range(0, shape[0], rows):
            with safe_open(self.path, framework="pt") as f:
                dst[start : start + rows].copy_(f.get_slice(key)[start : start + rows])

    def mapped(self, key: str, dtype: torch.dtype) -> torch.Tensor | None:
        """`key` as a tensor backed by the file itself (copy-on-write mapping), or None if it is stored in
        another dtype. Only the pages that are read become resident."""
        shape, code = self.entries[key]
        if _FLOAT_CODES.get(code) != dtype or dtype not in _NUMPY_VIEW:
            return None
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            begin, _ = json.loads(f.read(header_len))[key]["data_offsets"]
        np_dtype, torch_view = _NUMPY_VIEW[dtype]
        array = np.memmap(self.path, dtype=np_dtype, mode="c", offset=8 + header_len + begin, shape=shape)
        return torch.from_numpy(array).view(torch_view)

    def close(self) -> None:
        pass


class TorchBinFile:
    """One pytorch_model*.bin file, memory-mapped and read without unpickling code (weights_only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError ... for bad files
            raise ValueError(f"{path} is not a readable PyTorch weights file ({e}); re-download it") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} does not hold a flat dict of tensors (a state dict); re-download it")
        self.state: dict[str, torch.Tensor] | None = state
        self.entries = {k: (tuple(v.shape), _dtype_code(v.dtype)) for k, v in state.items()}

    def keys(self) -> list[str]:
        return list(self.entries)

    def copy_into(self, key: str, dst: torch.Tensor) -> None:
        assert self.state is not None, "copy_into after close"
        dst.copy_(self.state[key])

    def close(self) -> None:
        self.state = None


WeightFile = SafetensorsFile | TorchBinFile


def read_state(
    files: list[WeightFile],
    expected: dict[str, torch.Tensor],
    device: torch.device,
    show_progress: bool,
    transform: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    map_keys: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Each tensor allocated once with its final dtype/device (from `expected`, meta) and filled in place.

    `map_keys` stored in the target dtype in a safetensors file are not copied but mapped from the file (CPU):
    the embedding is read one row per token, so most of it never needs to be in memory.

    `transform` (quantization) maps each tensor as soon as it is read to the state entries it becomes.
    """
    state: dict[str, torch.Tensor] = {}
    with tqdm(total=len(expected), unit="tensor", desc="Loading weights", disable=not show_progress) as bar:
        for source in files:
            bar.set_postfix_str(source.path.name)
            for key in source.keys():
                meta = expected[key]
                tensor = None
                if key in map_keys and device.type == "cpu" and isinstance(source, SafetensorsFile):
                    tensor = source.mapped(key, meta.dtype)
                if tensor is None:
                    tensor = torch.empty(meta.shape, dtype=meta.dtype, device=device)
                    if device.type == "cpu":
                        advise_huge_pages(tensor)
                    source.copy_into(key, tensor)
                if transform is None:
                    state[key] = tensor
                else:
                    state.update(transform(key, tensor))
                del tensor  # a transformed tensor is freed here, before the next one is read
                bar.update()
            source.close()  # releases the file mapping before the next shard is read
    return state


def open_weights(path: Path) -> WeightFile:
    return SafetensorsFile(path) if path.suffix == ".safetensors" else TorchBinFile(path)


def _dtype_code(dtype: torch.dtype) -> str:
    codes = {**_FLOAT_CODES, **_INT_CODES}
    return next((code for code, d in codes.items() if d == dtype), str(dtype))


# ---- checks ----------------------------------------------------------------------------------------------------


def check_layout(
    files: list[WeightFile], expected: dict[str, torch.Tensor], config: QwenConfig, where: Path
) -> None:
    """Every expected tensor exactly once, nothing else, with the shape the config implies and a float dtype."""
    found: dict[str, Path] = {}
    for source in files:
        for key, (shape, code) in source.entries.items():
            if key in found:
                raise ValueError(
                    f"tensor {key!r} is stored twice: in {found[key].name} and {source.path.name}"
                )
            found[key] = source.path
            if key in expected and shape != tuple(expected[key].shape):
                raise ValueError(
                    f"tensor {key!r} in {source.path.name} has shape {list(shape)} but config.json implies "
                    f"{list(expected[key].shape)}: the config does not match the weights (wrong config.json "
                    "or a different model size?)"
                )
            if key in expected and not _dtype_matches(code, expected[key].dtype):
                want = (
                    "a float type"
                    if expected[key].dtype.is_floating_point
                    else _dtype_code(expected[key].dtype)
                )
                raise ValueError(
                    f"tensor {key!r} in {source.path.name} is stored as {code}, not {want}: the weights do not "
                    "match config.json (a quantized checkpoint needs its quantization_config, a float one none)"
                )
    for problem, keys in (
        ("has tensors the model does not have", [k for k in found if k not in expected]),
        ("lacks tensors the model needs", [k for k in expected if k not in found]),
    ):
        if keys:
            layers = any(k.startswith("transformer.h.") for k in keys)
            hint = (
                f" (does num_hidden_layers={config.num_hidden_layers} in config.json match?)"
                if layers
                else ""
            )
            raise ValueError(f"{where} {problem}: {_some(keys)}{hint}")


def check_index(files: list[WeightFile], weight_map: dict[str, str]) -> None:
    """The index must describe the shards exactly; a disagreement means a stale or mixed-up download."""
    for source in files:
        listed = {k for k, name in weight_map.items() if name == source.path.name}
        stray = [k for k in source.entries if k not in listed]
        absent = [k for k in listed if k not in source.entries]
        if stray or absent:
            problem = f"lists {_some(absent)}, absent from the file" if absent else f"omits {_some(stray)}"
            raise ValueError(
                f"the index disagrees with shard {source.path.name}: it {problem}; re-download the checkpoint"
            )


def _dtype_matches(code: str, dtype: torch.dtype) -> bool:
    """Float tensors may be stored in any float type (converted on load); integer ones exactly as expected."""
    return code in _FLOAT_CODES if dtype.is_floating_point else _INT_CODES.get(code) == dtype


def _some(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file, with an error naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or re-download it") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; fix or re-download it")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A checkpoint JSON file as Hugging Face writes them: indented, UTF-8, non-ASCII kept, trailing newline."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask Linux to back a large CPU tensor with 2 MB pages before it is filled (where transparent huge pages
    are in "madvise" mode). Decode streams every weight once per token; with 4 KB pages the TLB and the hardware
    prefetchers (which stop at page boundaries) cost a measurable share of the memory bandwidth."""
    if os.environ.get("QWENKIT_NO_HUGE_PAGES") or tensor.nbytes < 2 * _HUGE_PAGE or sys.platform != "linux":
        return
    start = -(-tensor.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # the 2 MB-aligned part of the tensor's memory
    end = (tensor.data_ptr() + tensor.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
