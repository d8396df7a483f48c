"""make_checkpoint: the official file layout, deterministic weights, sharding, and weights that use context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qwenkit.checkpoints.synthetic import _shard_count, make_checkpoint, plan_shards
from qwenkit.model.config import QwenConfig, preset
from qwenkit.model.transformer import QWenLMHeadModel
from qwenkit.tokenizer.vocab import official_vocab_file

# The keys of the official Qwen-1_8B-Chat config.json.
OFFICIAL_CONFIG_KEYS = {
    "architectures", "auto_map", "attn_dropout_prob", "bf16", "emb_dropout_prob", "fp16", "fp32", "hidden_size",
    "initializer_range", "intermediate_size", "kv_channels", "layer_norm_epsilon", "max_position_embeddings",
    "model_type", "no_bias", "num_attention_heads", "num_hidden_layers", "onnx_safe", "rotary_emb_base",
    "rotary_pct", "scale_attn_weights", "seq_length", "softmax_in_fp32", "tie_word_embeddings", "tokenizer_class",
    "torch_dtype", "transformers_version", "use_cache", "use_cache_kernel", "use_cache_quantization",
    "use_dynamic_ntk", "use_flash_attn", "use_logn_attn", "vocab_size",
}  # fmt: skip


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", dtype="float32", shards=2)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", dtype="float32", shards=1)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_files_of_the_official_layout(sharded, single):
    assert sorted(p.name for p in sharded.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "qwen.tiktoken",
        "tokenizer_config.json",
    ]
    names = sorted(p.name for p in single.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "qwen.tiktoken",
        "tokenizer_config.json",
    ]
    assert (sharded / "qwen.tiktoken").read_bytes() == official_vocab_file().read_bytes()


def test_json_files_as_official(sharded):
    assert _read(sharded / "generation_config.json") == {
        "chat_format": "chatml",
        "do_sample": True,
        "eos_token_id": 151643,
        "max_new_tokens": 512,
        "max_window_size": 6144,
        "pad_token_id": 151643,
        "repetition_penalty": 1.1,
        "top_k": 0,
        "top_p": 0.8,
        "transformers_version": "4.37.2",
    }
    assert _read(sharded / "tokenizer_config.json") == {
        "model_max_length": 8192,
        "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }
    config = _read(sharded / "config.json")
    assert set(config) == OFFICIAL_CONFIG_KEYS
    flags = (config["torch_dtype"], config["bf16"], config["fp16"], config["fp32"])
    assert flags == ("float32", False, False, True)
    assert QwenConfig.from_dict(config) == QwenConfig.from_dict({**preset("tiny").to_dict(), **config})


@pytest.mark.parametrize(("dtype", "flags"), [("bf16", (True, False, False)), ("fp16", (False, True, False))])
def test_config_dtype_flags_follow_dtype(tmp_path, dtype, flags):
    ckpt = make_checkpoint(tmp_path / "c", dtype=dtype, overrides={"vocab_size": 512})
    config = _read(ckpt / "config.json")
    assert (config["bf16"], config["fp16"], config["fp32"]) == flags
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert {t.dtype for t in _weights(ckpt).values()} == {expected}
    assert str(expected).removeprefix("torch.") == config["torch_dtype"]


def test_index_consistent_with_shards(sharded):
    index = _read(sharded / "model.safetensors.index.json")
    by_file: dict[str, set[str]] = {}
    for key, name in index["weight_map"].items():
        by_file.setdefault(name, set()).add(key)
    total = 0
    for name, keys in by_file.items():
        with safe_open(sharded / name, framework="pt") as f:
            assert set(f.keys()) == keys
            assert f.metadata() == {"format": "pt"}
            total += sum(f.get_tensor(k).nbytes for k in keys)
    assert index["metadata"]["total_size"] == total
    expected = QWenLMHeadModel(preset("tiny"), device="meta").state_dict()
    shapes = {k: tuple(v.shape) for k, v in _weights(sharded).items()}
    assert shapes == {k: tuple(v.shape) for k, v in expected.items()}


def test_deterministic_by_seed_and_independent_of_sharding(tmp_path, sharded, single):
    a, b = _weights(sharded), _weights(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = _weights(make_checkpoint(tmp_path / "s1", dtype="float32", seed=1))
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(a[key], other[key])


def test_bf16_weights_are_the_fp32_ones_rounded(tmp_path, single):
    bf16 = _weights(make_checkpoint(tmp_path / "bf", dtype="bfloat16"))
    fp32 = _weights(single)
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)


def test_weight_scales(single):
    w = _weights(single)
    assert abs(w["transformer.wte.weight"].std().item() - 1) < 0.01
    assert abs(w["transformer.h.0.attn.c_attn.weight"].std().item() - 64**-0.5) < 0.01
    assert abs(w["transformer.h.1.mlp.c_proj.weight"].std().item() - 128**-0.5) < 0.01
    assert abs(w["transformer.ln_f.weight"].mean().item() - 1) < 0.05


def test_logits_depend_on_context(single):
    config = QwenConfig.from_file(single)
    net = QWenLMHeadModel(config).eval()
    net.load_state_dict(_weights(single))
    ids = torch.tensor([[9707, 11, 1879, 374, 264, 1273, 13]])
    changed = ids.clone()
    changed[0, 0] = 4021
    with torch.no_grad():
        logits = net(ids)[0, -1]
        other = net(changed)[0, -1]  # same last token, different first token
        alone = net(ids[:, -1:])[0, -1]
    assert torch.isfinite(logits).all() and 0.3 < logits.std().item() < 10
    assert (logits - other).abs().mean() > 0.1 * logits.std()
    assert (logits - alone).abs().mean() > 0.1 * logits.std()


def test_overwrite_replaces_only_checkpoint_files(tmp_path):
    out = make_checkpoint(tmp_path / "c", shards=3, overrides={"vocab_size": 512})
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        make_checkpoint(out, overrides={"vocab_size": 512})
    make_checkpoint(out, shards=1, overwrite=True, overrides={"vocab_size": 512})
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_overrides_apply(tmp_path):
    out = make_checkpoint(tmp_path / "c", overrides={"vocab_size": 512, "num_hidden_layers": 3})
    config = _read(out / "config.json")
    assert (config["vocab_size"], config["num_hidden_layers"]) == (512, 3)
    assert "transformer.h.2.ln_1.weight" in _weights(out)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "3b"}, "unknown preset"),
        ({"dtype": "int8"}, "unsupported dtype"),
        ({"shards": 0}, "shards must be"),
        ({"shards": 10_000}, "shards must be"),
        ({"overrides": {"hidden_sise": 8}}, "unknown config fields"),
        ({"overrides": {"bf16": True}}, "dtype="),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_checkpoint(tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_out_dir_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        make_checkpoint(tmp_path / "f")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9])
def test_plan_shards_exact_count(n):
    sizes = [100, 1, 1, 7, 7, 7, 7, 1, 100]
    groups = plan_shards(sizes, n)
    assert len(groups) == n and all(groups)
    assert [i for g in groups for i in g] == list(range(len(sizes)))


def test_default_sharding_of_1_8b_is_two_balanced_shards():
    net = QWenLMHeadModel(preset("1.8b"), device="meta")
    sizes = [p.numel() * 2 for p in net.parameters()]  # bf16
    assert _shard_count(None, sizes) == 2
    groups = plan_shards(sizes, 2)
    totals = [sum(sizes[i] for i in g) for g in groups]
    assert 3.6e9 < sum(totals) < 3.8e9 and max(totals) < 2e9
