"""Weight-only int8/int4: error bounds of the quantizers, the modules vs their dequantized weights, whole-model
swaps, save + load round trips, load(quantize=...), strict errors on broken quantized checkpoints, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qwenkit import kernels
from qwenkit.checkpoints.loading import load
from qwenkit.checkpoints.quantize import save_quantized
from qwenkit.checkpoints.synthetic import make_checkpoint
from qwenkit.cli.commands import main
from qwenkit.kernels import cpu
from qwenkit.model.transformer import QWenLMHeadModel
from qwenkit.quant import (
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    QuantScheme,
    quantize_int4,
    quantize_int8,
    quantize_model,
    target_linears,
    weight_precision,
)

IDS = torch.tensor([[9707, 11, 1879, 374, 264, 1273, 13, 40], [40, 1075, 279, 5284, 382, 151643, 0, 7]])


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    w[0] = 0.0  # an all-zero row: scale 0 must not divide by zero
    w[1, :] = 0.25  # a constant row
    w[2, 3] = 5.0  # an outlier
    return w


# ---- the quantizers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 16, 64])
def test_int8_error_is_at_most_half_a_step(group_size):
    w = _weight(48, 64)
    q, scales = quantize_int8(w, group_size)
    g = 64 if group_size is None else group_size
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (48, 64 // g)
    assert int(q.abs().max()) <= 127
    deq = kernels.dequantize(q, scales, None, g, torch.float32)
    step = scales.repeat_interleave(g, dim=1)
    assert bool(((w - deq).abs() <= step / 2 * (1 + 1e-6) + 1e-7).all())
    assert torch.equal(deq[0], w[0])  # zero row exact
    assert torch.allclose(deq[1], w[1])  # constant row exact up to rounding of 127 * (x / 127)


@pytest.mark.parametrize("group_size", [8, 32, 64])
def test_int4_error_is_at_most_half_a_step(group_size):
    w = _weight(48, 64, seed=1)
    q, scales, offsets = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scales.shape == offsets.shape == (48, 64 // group_size) and offsets.dtype == torch.float32
    deq = kernels.dequantize(q, scales, offsets, group_size, torch.float32)
    step = scales.repeat_interleave(group_size, dim=1)
    assert bool(((w - deq).abs() <= step / 2 * (1 + 1e-6) + 1e-6).all())
    groups = w.view(48, -1, group_size)
    assert torch.equal(offsets, groups.amin(-1))  # the group minimum is the offset, represented exactly
    assert torch.equal(deq[:2], w[:2])  # zero and constant rows (scale 0) are exact


def test_quantizers_reject_group_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_int4(_weight(4, 64), 48)
    with pytest.raises(ValueError, match="does not divide"):
        Int8Linear.from_linear(nn.Linear(64, 4), group_size=48)
    with pytest.raises(ValueError, match="positive integer"):
        QuantScheme(4, 0)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantScheme(3)
    with pytest.raises(ValueError, match="unknown quantization"):
        QuantScheme.parse("int3")


# ---- the modules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("bias", [False, True])
def test_module_matches_its_dequantized_weight(cls, bias, monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias)
    module = cls.from_linear(linear, group_size=32)
    assert module.qweight.dtype == cls.qweight_dtype and module.scales.shape == (96, 2)
    assert (module.offsets is not None) == (cls is Int4Linear)
    x = torch.randn(3, 5, 64)
    want = F.linear(x, module.dequantize(), linear.bias)
    with monkeypatch.context() as m:
        m.setenv(cpu.DISABLE_ENV, "1")  # the reference kernel: the module's wiring, checked tightly
        torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-5)
    # The default path (the C++ kernels where they build) quantizes activations to int16: ~1e-5 relative.
    assert ((module(x) - want).norm() / want.norm()).item() < 1e-4
    # ... and close to the float layer it replaces (relative error of the output, not of each weight)
    rel = (module(x) - linear(x)).norm() / linear(x).norm()
    assert rel < (0.01 if cls is Int8Linear else 0.1)
    assert set(module.state_dict()) == {"qweight", "scales"} | (
        {"offsets"} if cls is Int4Linear else set()
    ) | ({"bias"} if bias else set())


def test_int8_default_is_per_output_channel_and_int4_default_is_128():
    m8 = Int8Linear.from_linear(nn.Linear(256, 8))
    assert m8.group_size == 256 and m8.scales.shape == (8, 1) and m8.offsets is None
    m4 = Int4Linear.from_linear(nn.Linear(256, 8))
    assert m4.group_size == 128 and m4.scales.shape == (8, 2) and m4.qweight.shape == (8, 128)
    assert Int4Linear.from_linear(nn.Linear(64, 8)).group_size == 64  # narrower than a group: one per row


def test_module_in_bfloat16_model():
    linear = nn.Linear(64, 32, bias=True, dtype=torch.bfloat16)
    module = Int4Linear.from_linear(linear, 32)
    assert module.bias.dtype == torch.bfloat16 and module.scales.dtype == torch.float32
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert module(x).dtype == torch.bfloat16
    want = F.linear(x.float(), module.dequantize(), linear.bias.float())
    torch.testing.assert_close(module(x).float(), want, rtol=2e-2, atol=2e-2)


def test_permuted_module_gathers_inputs():
    """With `perm` (act-order GPTQ), stored column j is input perm[j]: dequantize() and forward undo it."""
    w = _weight(16, 64, seed=2)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    q, scales = quantize_int8(w[:, perm], 16)  # groups are formed over the permuted columns
    module = Int8Linear.from_tensors(q, scales, group_size=16, perm=perm)
    assert torch.equal(module.dequantize()[:, perm], kernels.dequantize(q, scales, None, 16, torch.float32))
    x = torch.randn(4, 64)
    torch.testing.assert_close(module(x), F.linear(x, module.dequantize()), rtol=1e-5, atol=1e-5)


# ---- whole models --------------------------------------------------------------------------------------------


def _float_copy_with(model: nn.Module) -> nn.Module:
    """A float model whose linears carry the quantized model's dequantized weights (the exact reference)."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in quantized}
    for name, module in quantized.items():
        state[f"{name}.weight"] = module.dequantize()
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias
    ref = QWenLMHeadModel(dataclasses.replace(model.config, quantization_config=None))
    ref.load_state_dict(state, strict=True)
    return ref.eval()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_model_swaps_every_linear_and_matches_dequantized_float_model(make_tiny_model, scheme):
    model = make_tiny_model(seed=1)
    base = model(IDS % 1000)
    quantize_model(model, scheme, group_size=32 if scheme == "int4" else None)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == set(target_linears(model)) and len(quantized) == 2 * 5 + 1
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.transformer.wte, nn.Embedding)
    assert model.config.quantization_config == {
        "quant_method": "qwenkit",
        "bits": int(scheme[3]),
        "group_size": -1 if scheme == "int8" else 32,
        "lm_head": True,
        "version": 1,
    }
    out = model(IDS % 1000)
    torch.testing.assert_close(out, _float_copy_with(model)(IDS % 1000), rtol=1e-4, atol=1e-4)
    cos = F.cosine_similarity(out.flatten(), base.flatten(), dim=0)
    assert cos > (0.999 if scheme == "int8" else 0.98)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, scheme)


def test_quantize_model_can_keep_lm_head(make_tiny_model):
    model = quantize_model(make_tiny_model(), "int4", group_size=32, include_lm_head=False)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.transformer.h[0].mlp.w1, Int4Linear)
    assert model.config.quantization_config["lm_head"] is False


def test_weight_precision_reads_the_modules(make_tiny_model):
    assert weight_precision(make_tiny_model()) is None
    assert weight_precision(quantize_model(make_tiny_model(), "int8")) == "int8"
    model = quantize_model(make_tiny_model(), "int4", group_size=32, include_lm_head=False)
    assert weight_precision(model) == "int4"
    model.lm_head = Int8Linear.from_linear(model.lm_head)  # mixed widths: the narrowest is named
    assert weight_precision(model) == "int4"


def test_tied_lm_head_stays_float(make_tiny_model):
    model = quantize_model(make_tiny_model(tie_word_embeddings=True), "int8")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.quantization_config["lm_head"] is False


def test_quantize_model_does_not_touch_a_shared_config(make_tiny_model):
    a = make_tiny_model()
    config = a.config
    quantize_model(a, "int8")
    assert config.quantization_config is None and a.config is not config


# ---- checkpoints ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("quant") / "float", dtype="float32", seed=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, ckpt) -> dict[str, tuple[Path, torch.Tensor]]:
    """{scheme: (quantized checkpoint written by save_quantized, its logits on IDS before saving)}"""
    out = {}
    for scheme in ("int8", "int4"):
        model, _ = load(ckpt, device="cpu", quantize=scheme)
        with torch.no_grad():
            logits = model(IDS)
        out[scheme] = (
            save_quantized(model, tmp_path_factory.mktemp("quant") / scheme, source_dir=ckpt),
            logits,
        )
    return out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_load_quantize_equals_quantize_model(ckpt, saved, scheme):
    model, _ = load(ckpt, device="cpu")
    quantize_model(model, scheme)
    assert torch.equal(model(IDS), saved[scheme][1])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_save_and_load_round_trip(saved, scheme):
    path, logits = saved[scheme]
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "qwen.tiktoken",
        "tokenizer_config.json",
    ]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qwenkit"
    assert config["quantization_config"]["bits"] == int(scheme[3]) and config["torch_dtype"] == "float32"
    stored = load_file(path / "model.safetensors")
    assert stored["transformer.h.0.mlp.w1.qweight"].dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    assert (
        "transformer.h.0.mlp.w1.weight" not in stored
        and stored["transformer.wte.weight"].dtype == torch.float32
    )
    model, _ = load(path, device="cpu")
    assert isinstance(model.transformer.h[1].attn.c_attn, QuantizedLinear)
    assert torch.equal(model(IDS), logits)
    again, _ = load(
        path, device="cpu", quantize=scheme
    )  # naming its own scheme is fine: nothing re-quantized
    assert torch.equal(again(IDS), logits)


def test_save_sharded_and_bfloat16(tmp_path, ckpt):
    model, _ = load(ckpt, dtype="bfloat16", device="cpu", quantize="int4")
    out = save_quantized(model, tmp_path / "q", shard_bytes=2 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again, _ = load(out, dtype="bfloat16", device="cpu")
    assert torch.equal(again(IDS), model(IDS))


def test_conflicting_quantize_is_refused(saved):
    with pytest.raises(ValueError, match="already quantized"):
        load(saved["int4"][0], device="cpu", quantize="int8")
    with pytest.raises(ValueError, match="already quantized"):
        load(saved["int4"][0], device="cpu", quantize=QuantScheme(4, 64))
    with pytest.raises(ValueError, match="unknown quantization"):
        load(saved["int4"][0], device="cpu", quantize="fp8")


def test_only_qwenkit_quantized_models_are_saved(tmp_path, make_tiny_model):
    with pytest.raises(ValueError, match="only models quantized by qwenkit"):
        save_quantized(make_tiny_model(), tmp_path / "x")


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        if path.name != "model.safetensors":
            (dst / path.name).write_bytes(path.read_bytes())
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("transformer.h.1.mlp.c_proj.scales"), "lacks tensors.*mlp.c_proj.scales"),
        (
            lambda s: s.update({"transformer.h.0.mlp.w1.weight": torch.zeros(128, 64)}),
            "does not have.*w1.weight",
        ),
        (
            lambda s: s.update({"lm_head.qweight": s["lm_head.qweight"][:, :-1].contiguous()}),
            "lm_head.qweight.*shape",
        ),
        (
            lambda s: s.update(
                {"transformer.h.0.attn.c_proj.qweight": s["transformer.h.0.attn.c_proj.qweight"].int()}
            ),
            "stored as I32, not U8",
        ),
        (
            lambda s: s.update(
                {"transformer.h.0.attn.c_proj.qweight": s["transformer.h.0.attn.c_proj.qweight"].float()}
            ),
            "stored as F32, not U8",
        ),
    ],
)
def test_broken_quantized_checkpoint_is_refused(tmp_path, saved, edit, message):
    broken = _broken_copy(saved["int4"][0], tmp_path / "broken", edit)
    with pytest.raises(ValueError, match=message):
        load(broken, device="cpu")


def test_quantized_weights_without_quantization_config_are_refused(tmp_path, saved):
    broken = _broken_copy(saved["int8"][0], tmp_path / "noconfig", lambda s: None)
    config = json.loads((broken / "config.json").read_text())
    del config["quantization_config"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not have|lacks"):
        load(broken, device="cpu")


def test_unknown_quant_method_is_refused(tmp_path, ckpt):
    broken = _broken_copy(ckpt, tmp_path / "awq", lambda s: None)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'awq' is not supported"):
        load(broken, device="cpu")


def test_cli_quantize(tmp_path, ckpt, capsys):
    out = tmp_path / "cli"
    assert main(["quantize", "-m", str(ckpt), "--to", "int4", "--group-size", "32", "-o", str(out)]) == 0
    assert "int4" in capsys.readouterr().out
    model, _ = load(out, device="cpu")
    assert model.config.quantization_config["group_size"] == 32
    assert model.transformer.h[0].mlp.c_proj.group_size == 32
    reference, _ = load(ckpt, device="cpu", quantize=QuantScheme(4, 32))
    assert torch.equal(model(IDS), reference(IDS))
    # a non-empty output and an already quantized input are user errors (exit code 2, message on stderr)
    assert main(["quantize", "-m", str(ckpt), "--to", "int8", "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["quantize", "-m", str(out), "--to", "int8", "-o", str(tmp_path / "x")]) == 2
    assert "already quantized" in capsys.readouterr().err
