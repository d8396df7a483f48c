"""CUDA checks (issue #16): skipped on machines without a CUDA device; `benchmarks/gpu_check.sh` runs them.

bf16 CUDA logits against the fp32 CPU reference, the quantized modules on CUDA against the reference kernels,
greedy chat on CUDA against CPU. Written from the CPU side; a GPU run is what verifies them.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qwenkit.quant import Int4Linear, Int8Linear, quantize_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
IDS = torch.tensor([[9707, 11, 1879, 374, 264, 1273, 13, 40], [40, 1075, 279, 5284, 382, 151, 0, 7]])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_cuda_logits_match_fp32_cpu(make_tiny_model):
    ref_model = make_tiny_model(seed=3)
    ids = IDS % ref_model.config.vocab_size
    with torch.inference_mode():
        ref = ref_model(ids)
        gpu = copy.deepcopy(ref_model).to(device="cuda", dtype=torch.bfloat16)
        out = gpu(ids.cuda()).cpu()
    assert _rel(out, ref) < 2e-2  # the same bound as the CPU bf16-vs-fp32 test


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_modules_on_cuda_match_the_reference_kernels(make_tiny_model, scheme):
    model = quantize_model(make_tiny_model(seed=4), scheme)
    cpu_layer = model.transformer.h[0].mlp.w1
    assert isinstance(cpu_layer, Int8Linear | Int4Linear)
    x = torch.randn(3, cpu_layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, cpu_layer.dequantize().float(), cpu_layer.bias)  # reference
        gpu_layer = copy.deepcopy(cpu_layer).cuda()
        out = gpu_layer(x.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_greedy_chat_on_cuda_equals_cpu(make_tiny_model, tmp_path):
    from qwenkit import QWenTokenizer
    from qwenkit.tokenizer.vocab import official_vocab_file

    tok = QWenTokenizer(official_vocab_file())
    cpu = make_tiny_model(seed=5, vocab_size=151936)
    gpu = copy.deepcopy(cpu).cuda()
    kw = {"do_sample": False, "max_new_tokens": 12, "repetition_penalty": 1.0}
    assert gpu.chat(tok, "Hello", **kw)[0] == cpu.chat(tok, "Hello", **kw)[0]
