"""Official GPTQ (AutoGPTQ layout) checkpoints: an independent packer written here builds tiny GPTQ checkpoints from
known integer weights, zero points, scales and g_idx (act-order included); loading must reproduce the fp32 weights
bit for bit and the logits of a float model built from them, for 4 and 8 bits."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenkit.checkpoints.gptq import GptqConfig, convert_linear
from qwenkit.checkpoints.loading import load
from qwenkit.checkpoints.synthetic import make_checkpoint
from qwenkit.model.config import QwenConfig
from qwenkit.model.transformer import QWenLMHeadModel
from qwenkit.quant import Int4Linear, Int8Linear, QuantizedLinear

IDS = torch.tensor(
    [[9707, 11, 1879, 374, 264, 1273, 13, 40, 1075], [40, 1075, 279, 5284, 382, 151643, 0, 7, 9]]
)
GROUP = 32
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


# ---- the independent packer (AutoGPTQ's layout, written from its description) -------------------------------


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers `[K, N]` -> int32 `[K * bits / 32, N]`: input `r * (32 / bits) + j` at bits `j * bits` of row r."""
    per = 32 // bits
    words = torch.zeros(q.shape[0] // per, q.shape[1], dtype=torch.int64)
    for j in range(per):
        words |= q[j::per].long() << (bits * j)
    return _to_int32(words)


def pack_qzeros(zeros: torch.Tensor, bits: int, minus_one: bool = True) -> torch.Tensor:
    """Zero points `[G, N]` -> int32 `[G, N * bits / 32]` storing `zero - 1` (mod 2**bits) as AutoGPTQ does."""
    per = 32 // bits
    stored = ((zeros.long() - 1) if minus_one else zeros.long()) & ((1 << bits) - 1)
    words = torch.zeros(zeros.shape[0], zeros.shape[1] // per, dtype=torch.int64)
    for j in range(per):
        words |= stored[:, j::per] << (bits * j)
    return _to_int32(words)


def make_g_idx(k: int, act_order: bool, gen: torch.Generator) -> torch.Tensor:
    """Group of each input. Act-order: the inputs are visited in a random order and grouped in that order."""
    if not act_order:
        return torch.arange(k, dtype=torch.int32) // GROUP
    order = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // GROUP).to(torch.int32)
    return g_idx


def random_gptq_linear(k: int, n: int, bits: int, act_order: bool, gen: torch.Generator, sym: bool = False):
    """(tensors as AutoGPTQ stores them, the fp32 weight `[N, K]` they mean)."""
    groups = k // GROUP
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    if sym:
        zeros = torch.full((groups, n), 1 << (bits - 1))
    else:
        zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen)
        zeros[0, :3] = (
            0  # zero point 0 is stored as -1 -> all ones; the reader's "+ 1 mod 2**bits" restores it
        )
    step = 2.0 / ((1 << bits) * k**0.5)
    scales = (step * (0.5 + torch.rand(groups, n, generator=gen))).half()
    g_idx = make_g_idx(k, act_order, gen)
    g = g_idx.long()
    weight = ((q - zeros[g]).float() * scales.float()[g]).t().contiguous()  # [N, K]
    tensors = {
        "qweight": pack_qweight(q, bits),
        "qzeros": pack_qzeros(zeros, bits),
        "scales": scales,
        "g_idx": g_idx,
    }
    return tensors, weight


@dataclasses.dataclass
class GptqCheckpoint:
    path: Path
    reference: QWenLMHeadModel  # fp32 float model with the exact dequantized weights
    weights: dict[str, torch.Tensor]  # module name -> fp32 weight [N, K]


def build_gptq_checkpoint(
    float_ckpt: Path,
    out: Path,
    bits: int,
    act_order: bool,
    *,
    seed: int = 0,
    sym: bool = False,
    config_file: str = "config.json",
    zero_bias: bool = True,
) -> GptqCheckpoint:
    """A GPTQ checkpoint dir (fp16 non-quantized tensors, like Qwen-*-Chat-Int4) plus its float reference."""
    gen = torch.Generator().manual_seed(seed)
    config = QwenConfig.from_file(float_ckpt)
    source = load_file(float_ckpt / "model.safetensors")
    stored = {k: v.half() for k, v in source.items()}  # embedding, norms, lm_head, c_attn.bias in fp16
    reference_state = {k: v.float() for k, v in stored.items()}
    weights = {}
    for i in range(config.num_hidden_layers):
        for leaf in LINEARS:
            name = f"transformer.h.{i}.{leaf}"
            n, k = source[f"{name}.weight"].shape
            tensors, weight = random_gptq_linear(k, n, bits, act_order, gen, sym=sym)
            del stored[f"{name}.weight"]
            stored.update({f"{name}.{suffix}": t for suffix, t in tensors.items()})
            if f"{name}.bias" not in stored and zero_bias:
                stored[f"{name}.bias"] = torch.zeros(
                    n, dtype=torch.float16
                )  # AutoGPTQ's bias on a no-bias layer
            reference_state[f"{name}.weight"] = weight
            weights[name] = weight
    out.mkdir()
    for name in ("qwen.tiktoken", "generation_config.json", "tokenizer_config.json"):
        shutil.copyfile(float_ckpt / name, out / name)
    quant = {
        "bits": bits,
        "group_size": GROUP,
        "damp_percent": 0.01,
        "desc_act": act_order,
        "static_groups": False,
        "sym": sym,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
    }
    config_dict = dataclasses.replace(config, fp32=False, fp16=True, torch_dtype="float16").to_dict()
    if config_file == "config.json":
        config_dict["quantization_config"] = {**quant, "quant_method": "gptq"}
    else:
        (out / config_file).write_text(json.dumps(quant))
    (out / "config.json").write_text(json.dumps(config_dict))
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})

    reference = QWenLMHeadModel(dataclasses.replace(config, quantization_config=None))
    reference.load_state_dict(reference_state, strict=True)
    return GptqCheckpoint(out, reference.eval(), weights)


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gptq") / "float", dtype="float32", seed=7)


# ---- loading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_checkpoint_dequantizes_exactly_and_matches_float_logits(tmp_path, float_ckpt, bits, act_order):
    ckpt = build_gptq_checkpoint(float_ckpt, tmp_path / "gptq", bits, act_order, seed=bits + act_order)
    model, _ = load(ckpt.path, dtype="float32", device="cpu")
    cls = Int4Linear if bits == 4 else Int8Linear
    for name, weight in ckpt.weights.items():
        module = model.get_submodule(name)
        assert isinstance(module, cls)
        assert (module.perm is not None) == act_order
        assert torch.equal(module.dequantize(), weight), name
        assert (module.bias is not None) == name.endswith("c_attn")  # zero biases of no-bias layers dropped
    assert isinstance(model.lm_head, torch.nn.Linear)  # GPTQ keeps lm_head and the embedding in fp16
    assert model.config.quantization_config["quant_method"] == "gptq"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ckpt.reference(IDS), rtol=1e-4, atol=1e-4)


def test_gptq_from_quantize_config_json_without_zero_biases(tmp_path, float_ckpt):
    ckpt = build_gptq_checkpoint(
        float_ckpt, tmp_path / "gptq", 4, True, config_file="quantize_config.json", zero_bias=False
    )
    model, _ = load(ckpt.path, dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ckpt.reference(IDS), rtol=1e-4, atol=1e-4)
    again, _ = load(ckpt.path, dtype="float32", device="cpu", quantize="int4")  # its own width: fine
    assert torch.equal(again(IDS), model(IDS))


def test_gptq_int8_symmetric_needs_no_offsets(tmp_path, float_ckpt):
    ckpt = build_gptq_checkpoint(float_ckpt, tmp_path / "gptq", 8, False, sym=True)
    model, _ = load(ckpt.path, dtype="float32", device="cpu")
    module = model.transformer.h[0].mlp.w2
    assert module.offsets is None and module.group_size == GROUP
    assert torch.equal(module.dequantize(), ckpt.weights["transformer.h.0.mlp.w2"])


def test_gptq_in_bfloat16(tmp_path, float_ckpt):
    ckpt = build_gptq_checkpoint(float_ckpt, tmp_path / "gptq", 4, True)
    model, _ = load(ckpt.path, dtype="bfloat16", device="cpu")
    assert model.transformer.h[0].attn.c_attn.bias.dtype == torch.bfloat16
    out = model(IDS)
    ref = ckpt.reference(IDS)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999


def test_convert_linear_with_unequal_groups_is_exact():
    """g_idx need not give equal groups: sub-groups of gcd(sizes) inputs keep the conversion exact."""
    gen = torch.Generator().manual_seed(3)
    k, n, bits = 64, 16, 4
    g_idx = torch.tensor([0] * 16 + [1] * 16 + [2] * 32, dtype=torch.int32)[torch.randperm(k, generator=gen)]
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (3, n), generator=gen)
    scales = (0.01 + torch.rand(3, n, generator=gen)).half()
    weight = ((q - zeros[g_idx.long()]).float() * scales.float()[g_idx.long()]).t()
    cfg = GptqConfig(bits=bits, group_size=32)
    module = convert_linear(cfg, pack_qweight(q, bits), pack_qzeros(zeros, bits), scales, g_idx)
    assert module.group_size == 16 and module.perm is not None
    assert torch.equal(module.dequantize(), weight)
    x = torch.randn(3, k)
    torch.testing.assert_close(module(x), x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_gptq_v2_zero_points_are_stored_as_is():
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(0, 256, (64, 8), generator=gen)
    zeros = torch.randint(0, 256, (2, 8), generator=gen)
    scales = torch.rand(2, 8, generator=gen).half()
    g_idx = torch.arange(64, dtype=torch.int32) // 32
    weight = ((q - zeros[g_idx.long()]).float() * scales.float()[g_idx.long()]).t()
    cfg = GptqConfig(bits=8, group_size=32, zero_offset=0)
    module = convert_linear(cfg, pack_qweight(q, 8), pack_qzeros(zeros, 8, minus_one=False), scales, g_idx)
    assert isinstance(module, QuantizedLinear) and module.perm is None
    assert torch.equal(module.dequantize(), weight)


# ---- errors --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq4(tmp_path_factory, float_ckpt) -> Path:
    return build_gptq_checkpoint(float_ckpt, tmp_path_factory.mktemp("gptq") / "g4", 4, True).path


def _variant(src: Path, dst: Path, edit_state=None, edit_config=None) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        shutil.copyfile(path, dst / path.name)
    if edit_state is not None:
        state = load_file(src / "model.safetensors")
        edit_state(state)
        save_file(state, dst / "model.safetensors")
    if edit_config is not None:
        config = json.loads((src / "config.json").read_text())
        edit_config(config["quantization_config"])
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _set(key: str, fn):
    return lambda s: s.update({key: fn(s[key])})


@pytest.mark.parametrize(
    "edit_state, edit_config, message",
    [
        (lambda s: s.pop("transformer.h.0.mlp.w1.qzeros"), None, "lacks tensors.*w1.qzeros"),
        (lambda s: s.pop("transformer.h.1.attn.c_attn.bias"), None, "lacks tensors.*c_attn.bias"),
        (_set("transformer.h.0.mlp.w2.qweight", lambda t: t[:-1].contiguous()), None, "w2.qweight.*shape"),
        (_set("transformer.h.0.mlp.w2.qweight", lambda t: t.float()), None, "stored as F32, not I32"),
        (_set("transformer.h.1.mlp.c_proj.g_idx", lambda t: t + 5), None, "g_idx values must lie in"),
        (None, lambda q: q.update(bits=3), "bits=3 are not supported"),
        (None, lambda q: q.update(bits=8), "(qweight|qzeros).*shape"),  # the files hold 4-bit tensors
        (None, lambda q: q.update(checkpoint_format="marlin"), "'marlin' is not supported"),
        (lambda s: [s.pop(k) for k in list(s) if k.endswith((".qweight", ".qzeros"))], None, "no `.qweight`"),
    ],
)
def test_broken_gptq_checkpoint_is_refused(tmp_path, gptq4, edit_state, edit_config, message):
    broken = _variant(gptq4, tmp_path / "broken", edit_state, edit_config)
    with pytest.raises(ValueError, match=message):
        load(broken, dtype="float32", device="cpu")


def test_gptq_with_conflicting_quantize_is_refused(gptq4):
    with pytest.raises(ValueError, match="already quantized \\(GPTQ 4-bit\\)"):
        load(gptq4, dtype="float32", device="cpu", quantize="int8")
