"""`load()`: a Qwen (v1) checkpoint directory or hub id -> (`QWenLMHeadModel`, `QWenTokenizer`).

Finds the weight files of the official layout (safetensors, single or sharded; or `pytorch_model*.bin`), checks
every key and shape against the config before reading any data, then fills a model built on the meta device
tensor by tensor, so the weights exist once in memory. Code in the model directory is never run. Quantized
weights are left to `qwenkit.quant`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..generation.sampling import OFFICIAL_GENERATION_CONFIG
from ..model.config import QwenConfig
from ..model.transformer import QWenLMHeadModel
from ..tokenizer.tokenization import QWenTokenizer
from ..tokenizer.vocab import VOCAB_FILE_NAME
from .weight_files import check_index, check_layout, open_weights, read_json, read_state

if TYPE_CHECKING:
    from ..quant.scheme import QuantScheme

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# The name config.json's torch_dtype uses for each dtype a checkpoint may hold.
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Bytes copied per step when filling a tensor: bounds the transient memory of a dtype conversion.
# Read in place from the file instead of copied: a lookup table touches one row per token.
_MAPPED_KEYS = ("transformer.wte.weight",)


def load(
    model: str | os.PathLike[str],
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    *,
    progress: bool | None = None,
    quantize: str | QuantScheme | None = None,
    kv_cache_dtype: str | torch.dtype | None = None,
    lora: str | os.PathLike[str] | None = None,
) -> tuple[QWenLMHeadModel, QWenTokenizer]:
    """Load a Qwen (v1) checkpoint for inference.

    `model` is a directory in the official Hugging Face layout or a hub id such as `Qwen/Qwen-1_8B-Chat`
    (resolved through the Hugging Face cache). `dtype` is "auto" (bf16 on CUDA when supported, else fp16 on
    CUDA; fp32 on CPU), "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16" or a torch.dtype; `device` is
    "auto" (CUDA if available) or any torch device. `progress` shows a bar (None: only when stderr is a
    terminal). Returns the model in eval mode without gradients, with `.config` (QwenConfig) and
    `.generation_config` (dict), and the tokenizer of the directory. Every tensor is checked before any is
    read: a missing, unexpected, misshapen or unreadable one raises ValueError/FileNotFoundError naming it.

    Quantization (`qwenkit.quant`): `quantize` "int8" / "int4" (or a `QuantScheme`) quantizes a float checkpoint
    weight by weight as it is read. Checkpoints written by `qwenkit quantize` and official GPTQ ones (Int4/Int8)
    load as they are stored, without re-quantizing; `quantize` may then only name their own bit width.

    `kv_cache_dtype`: the KV cache kind generation allocates ("int8", "fp32", "bf16", "fp16"); None -> "int8"
    when config.json sets the official `use_cache_quantization`, else fp32 on CPU / the model dtype on GPU.

    `lora`: a LoRA adapter directory in peft's format (`qwenkit finetune`, peft, the official finetune.py),
    applied on top of the (possibly quantized) weights; `qwenkit merge-lora` folds one in for good.
    """
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    model_dir = resolve_model_dir(model)
    config = QwenConfig.from_file(model_dir / "config.json")
    tokenizer = QWenTokenizer.from_pretrained(model_dir)  # before the weights: a missing vocab fails fast

    # -- quantization (qwenkit.quant): a plan for quantized checkpoints or quantize=; None for plain float --
    from .quant_plans import plan_load

    plan = plan_load(config, model_dir, quantize)
    # ----------------------------------------------------------------------------------------------------------
    net = QWenLMHeadModel(config, dtype=target_dtype, device="meta")
    aliases = _tied_aliases(net)
    expected = {k: v for k, v in net.state_dict().items() if k not in aliases}
    paths, weight_map = find_weight_files(model_dir)
    files = [open_weights(path) for path in paths]
    if plan is not None:  # what the files hold instead of float linears; may swap modules of `net` (quant)
        expected = plan.expected(net, expected, {key for source in files for key in source.keys()})
    if weight_map is not None:
        check_index(files, weight_map)
    check_layout(files, expected, config, model_dir)

    show = sys.stderr.isatty() if progress is None else progress
    transform = None if plan is None else plan.transform
    map_keys = () if aliases else _MAPPED_KEYS  # a tied embedding is read whole by lm_head every step
    state = read_state(files, expected, target_device, show, transform, map_keys)
    for alias, canonical in aliases.items():
        state[alias] = state[canonical]
    net.load_state_dict(state, strict=True, assign=True)
    _retie(net, aliases)
    _check_materialized(net)
    if lora is not None:
        from .adapter_files import apply_adapter

        apply_adapter(net, lora)

    if kv_cache_dtype is None and read_json(model_dir / "config.json").get("use_cache_quantization") is True:
        kv_cache_dtype = "int8"
    net.set_kv_cache_dtype(kv_cache_dtype)
    net.generation_config = read_generation_config(model_dir)
    net.eval().requires_grad_(False)
    return net, tokenizer


# ---- arguments -------------------------------------------------------------------------------------------------


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16" or a torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}; valid: {', '.join(DTYPES)} or the matching torch.dtype")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`parse_dtype`, plus "auto": bf16 on CUDA when supported, else fp16 on CUDA, fp32 elsewhere."""
    if isinstance(dtype, str) and dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return parse_dtype(dtype)
    except ValueError:
        raise ValueError(
            f"unsupported dtype {dtype!r}; valid: auto, {', '.join(DTYPES)} or the matching torch.dtype"
        ) from None


def resolve_device(device: str | torch.device) -> torch.device:
    """Device "auto" -> cuda if available else cpu; otherwise a torch device that exists on this machine."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from None
    if resolved.type == "meta":
        raise ValueError("device 'meta' holds no data; valid: auto, cpu, cuda, cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return resolved


# ---- finding files ---------------------------------------------------------------------------------------------


def resolve_model_dir(model: str | os.PathLike[str]) -> Path:
    """A local checkpoint directory, or the Hugging Face cache snapshot of a hub id (downloaded when online)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{str(path)!r} is a file; pass the checkpoint directory that contains it")
    if not _HUB_ID.match(str(model)):
        raise FileNotFoundError(
            f"{str(model)!r} is not a directory and does not look like a hub id (owner/name, e.g. "
            "Qwen/Qwen-1_8B-Chat); pass the directory holding config.json and the weights"
        )
    return Path(_download(str(model)))


def _download(repo_id: str) -> str:
    """Fetch config, tokenizer and weights (safetensors, else .bin) of `repo_id` through the HF cache."""
    from huggingface_hub import snapshot_download

    common = ["*.json", VOCAB_FILE_NAME]
    try:
        snapshot = snapshot_download(repo_id, allow_patterns=[*common, "*.safetensors"])
        if not any(Path(snapshot).glob("*.safetensors")):  # older repos only ship pytorch_model*.bin
            snapshot = snapshot_download(repo_id, allow_patterns=[*common, "*.bin"])
    # Hub failures are OSError (HTTP, offline, not cached) or ValueError (malformed id).
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face Hub and no complete copy is cached "
            f"({type(e).__name__}: {e}). On a connected machine run `hf download {repo_id} --local-dir DIR` "
            f"(older huggingface_hub: `huggingface-cli download {repo_id} --local-dir DIR`), copy DIR here "
            "and pass its path"
        ) from e
    return snapshot


def find_weight_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of `model_dir` (safetensors first, then pytorch_model*.bin) and the index's weight_map.

    The weight_map ({tensor: file name}) is None for a single-file checkpoint.
    """
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_FILE), (BIN_INDEX, BIN_FILE)):
        if (model_dir / index_name).is_file():
            return _files_from_index(model_dir / index_name)
        if (model_dir / single_name).is_file():
            return [model_dir / single_name], None
    raise FileNotFoundError(
        f"no weights in {model_dir}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} with its shards, "
        f"{BIN_FILE} or {BIN_INDEX}; download the complete checkpoint"
    )


def _files_from_index(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no 'weight_map'; re-download the checkpoint")
    names = list(dict.fromkeys(weight_map.values()))  # shard order as listed, each once
    missing = [n for n in names if not (index_path.parent / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index_path.name} lists shard(s) missing from {index_path.parent}: {', '.join(missing)}; "
            "download the missing files"
        )
    return [index_path.parent / n for n in names], weight_map


def read_generation_config(model_dir: Path) -> dict[str, Any]:
    """`generation_config.json` as a dict; the official Qwen-Chat defaults when the file is missing."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return dict(OFFICIAL_GENERATION_CONFIG)
    return read_json(path)


def _tied_aliases(net: torch.nn.Module) -> dict[str, str]:
    """{alias: canonical} for parameters registered under two names (tied embeddings), canonical = first."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in net.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _retie(net: torch.nn.Module, aliases: dict[str, str]) -> None:
    """`assign=True` gives each name its own Parameter object; make aliases the very same Parameter again."""
    for alias, canonical in aliases.items():
        owner, _, leaf = alias.rpartition(".")
        setattr(net.get_submodule(owner), leaf, net.get_parameter(canonical))


def _check_materialized(net: torch.nn.Module) -> None:
    # A buffer the model computes in __init__ (and does not save) would still be on meta here: load() would have
    # to rebuild it. The model has none today; fail loudly if one appears.
    left = [name for name, t in _named_tensors(net) if t.is_meta]
    assert not left, f"tensors left on the meta device after loading: {left}"


def _named_tensors(net: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from net.named_parameters()
    yield from net.named_buffers()
