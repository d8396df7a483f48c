"""QwenConfig: the model hyper-parameters of a Qwen (v1) checkpoint, read from its `config.json`.

Field names are the official ones, unknown keys are ignored, and `to_dict()` writes back the full official
`config.json` layout. Presets give the shapes of the released sizes. Weights and dtype choice are left to loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

# The keys a config.json must have; everything else has an official default.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

PRESET_NAMES = ("tiny", "1.8b", "7b", "14b", "72b")

_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "kv_channels",
    "seq_length",
    "max_position_embeddings",
)
_FLOAT_FIELDS = ("rotary_emb_base", "rotary_pct", "layer_norm_epsilon")
_BOOL_FIELDS = ("use_dynamic_ntk", "use_logn_attn", "no_bias", "tie_word_embeddings", "bf16", "fp16", "fp32")


@dataclass
class QwenConfig:
    """Hyper-parameters of a Qwen (v1) model, named as in the official `config.json`.

    `kv_channels` (the per-head width) defaults to `hidden_size // num_attention_heads`. The MLP has two
    branches (`w1`, `w2`) of width `intermediate_size // 2` each, as in the official model.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    kv_channels: int | None = None
    seq_length: int = 8192
    max_position_embeddings: int = 8192
    rotary_emb_base: float = 10000
    rotary_pct: float = 1.0
    layer_norm_epsilon: float = 1e-6
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    # The dtype the weights were saved in ("bfloat16", ...); None -> derived from bf16/fp16/fp32.
    torch_dtype: str | None = None
    # Kept verbatim for quantized (e.g. GPTQ) checkpoints; interpreted by the quantization code, not here.
    quantization_config: dict | None = None

    def __post_init__(self) -> None:
        if self.kv_channels is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads):
            if self.num_attention_heads > 0:
                self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.torch_dtype is None:
            self.torch_dtype = self._flag_dtype()
        self._validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Width of one attention head (`kv_channels`)."""
        return int(self.kv_channels)  # type: ignore[arg-type]  # set in __post_init__

    @property
    def rotary_dim(self) -> int:
        """How many leading channels of each head get rotary embedding."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def ffn_hidden(self) -> int:
        """Width of each MLP branch (`w1`, `w2`): `intermediate_size // 2`."""
        return self.intermediate_size // 2

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QwenConfig:
        """Build from a `config.json` dict; unknown keys are ignored, missing required keys raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object (dict), got {type(d).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(
                f"config.json is missing required keys {missing}; add them (see the official Qwen config.json)"
            )
        if d.get("scale_attn_weights", True) is not True:
            raise ValueError(
                "scale_attn_weights=false is not supported: Qwen always scales by 1/sqrt(head_dim)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> QwenConfig:
        """Read a `config.json` file (or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no config file at {path!r}; pass a config.json or the checkpoint directory"
            )
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); fix or re-download the file") from e
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The full official `config.json` dict (including the keys only the official remote code reads)."""
        d: dict[str, Any] = {
            "architectures": ["QWenLMHeadModel"],
            "auto_map": {
                "AutoConfig": "configuration_qwen.QWenConfig",
                "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
            },
            "attn_dropout_prob": 0.0,
            "bf16": self.bf16,
            "emb_dropout_prob": 0.0,
            "fp16": self.fp16,
            "fp32": self.fp32,
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "kv_channels": self.kv_channels,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "qwen",
            "no_bias": self.no_bias,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "onnx_safe": None,
            "rotary_emb_base": self.rotary_emb_base,
            "rotary_pct": self.rotary_pct,
            "scale_attn_weights": True,
            "seq_length": self.seq_length,
            "softmax_in_fp32": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "tokenizer_class": "QWenTokenizer",
            "torch_dtype": self.torch_dtype,
            "transformers_version": "4.32.0",
            "use_cache": True,
            "use_cache_kernel": False,
            "use_cache_quantization": False,
            "use_dynamic_ntk": self.use_dynamic_ntk,
            "use_flash_attn": "auto",
            "use_logn_attn": self.use_logn_attn,
            "vocab_size": self.vocab_size,
        }
        if self.quantization_config is not None:
            d["quantization_config"] = dict(self.quantization_config)
        return d

    # ---- internals -----------------------------------------------------------------------------------------
    def _flag_dtype(self) -> str:
        # The official checkpoints are stored in bf16; the flags only pick a compute dtype.
        if self.fp16:
            return "float16"
        if self.fp32:
            return "float32"
        return "bfloat16"

    def _validate(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"config {name} must be a positive number, got {value!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config {name} must be true or false, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick sizes where it is"
            )
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"kv_channels * num_attention_heads ({self.kv_channels} * {self.num_attention_heads}) must equal "
                f"hidden_size {self.hidden_size}; set kv_channels = {self.hidden_size // self.num_attention_heads}"
            )
        if self.intermediate_size % 2:
            raise ValueError(
                f"intermediate_size {self.intermediate_size} must be even (two MLP branches of half width each)"
            )
        if self.rotary_pct > 1:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dim % 2 or self.rotary_dim < 4:
            # Rotate-half needs an even width; the NTK base formula divides by (rotary_dim - 2).
            raise ValueError(
                f"rotary_dim = int(kv_channels * rotary_pct) = {self.rotary_dim} must be even and >= 4; "
                "adjust kv_channels or rotary_pct"
            )
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ValueError(f"config torch_dtype must be a string like 'bfloat16', got {self.torch_dtype!r}")
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            raise ValueError(
                f"config quantization_config must be an object, got {self.quantization_config!r}"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def preset(name: str, **overrides: Any) -> QwenConfig:
    """A fresh config for a released size ("1.8b", "7b", "14b", "72b") or the test size "tiny".

    `overrides` replace fields, e.g. `preset("tiny", vocab_size=1000, seq_length=32)`.
    """
    common: dict[str, Any] = dict(kv_channels=128, rotary_emb_base=10000, bf16=True)
    table: dict[str, dict[str, Any]] = {
        "tiny": dict(
            vocab_size=151936,
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            kv_channels=16,
            intermediate_size=256,
            seq_length=8192,
            max_position_embeddings=8192,
            fp32=True,
        ),
        "1.8b": dict(
            common,
            vocab_size=151936,
            num_hidden_layers=24,
            hidden_size=2048,
            num_attention_heads=16,
            intermediate_size=11008,
            seq_length=8192,
        ),
        "7b": dict(
            common,
            vocab_size=151936,
            num_hidden_layers=32,
            hidden_size=4096,
            num_attention_heads=32,
            intermediate_size=22016,
            seq_length=8192,
        ),
        # 14B and 72B pad the vocabulary to 152064 rows.
        "14b": dict(
            common,
            vocab_size=152064,
            num_hidden_layers=40,
            hidden_size=5120,
            num_attention_heads=40,
            intermediate_size=27392,
            seq_length=2048,
        ),
        # 72B is trained at 32k and ships with dynamic NTK and logn switched off.
        "72b": dict(
            common,
            vocab_size=152064,
            num_hidden_layers=80,
            hidden_size=8192,
            num_attention_heads=64,
            intermediate_size=49152,
            seq_length=32768,
            max_position_embeddings=32768,
            rotary_emb_base=1000000,
            use_dynamic_ntk=False,
            use_logn_attn=False,
        ),
    }
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    fields = {f.name for f in dataclasses.fields(QwenConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown config fields {bad}; valid fields: {sorted(fields)}")
    return QwenConfig(**{**table[name], **overrides})
