"""Shared test fixtures: tiny random Qwen models (fp32, deterministic seeds) built from the `tiny` preset."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from qwenkit.model.config import preset
from qwenkit.model.transformer import QWenLMHeadModel


def _init_scaled(model: QWenLMHeadModel, gen: torch.Generator) -> None:
    """Weights large enough that attention and MLP visibly matter: std 1/sqrt(fan_in), embeddings std 1."""
    for name, p in model.named_parameters():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif name == "transformer.wte.weight":
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def _init_checkpoint_style(model: QWenLMHeadModel, gen: torch.Generator) -> None:
    """The official init: normal(0, 0.02), output projections scaled by 1/sqrt(2 * layers), zero bias."""
    c_proj_std = 0.02 / math.sqrt(2 * model.config.num_hidden_layers)
    for name, p in model.named_parameters():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            std = c_proj_std if name.endswith("c_proj.weight") else 0.02
            p.copy_(std * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., QWenLMHeadModel]:
    """Factory: `make_tiny_model(seed=0, init="scaled" | "checkpoint", **config_overrides)` -> fp32 eval model.

    Defaults to the `tiny` preset with a 1000-token vocabulary (enough for parity, fast to run).
    """

    def make(*, seed: int = 0, init: str = "scaled", **overrides) -> QWenLMHeadModel:
        config = preset("tiny", **{"vocab_size": 1000, **overrides})
        model = QWenLMHeadModel(config, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            {"scaled": _init_scaled, "checkpoint": _init_checkpoint_style}[init](model, gen)
        return model.eval()

    return make


@pytest.fixture
def greedy_ids() -> Callable[..., list[list[int]]]:
    """Factory: `greedy_ids(model, prompts, kind, n=24)` -> the new ids of each prompt, generated together
    (TokenGenerator, greedy, a KV cache of kind `kind`; ids below the tiny models' 1000-token vocabulary)."""
    from qwenkit.generation.generate import TokenGenerator
    from qwenkit.generation.sampling import SamplingParams

    def run(model: QWenLMHeadModel, prompts: list[list[int]], kind: str, n: int = 24) -> list[list[int]]:
        model.set_kv_cache_dtype(kind)
        gen = TokenGenerator(
            model, prompts, SamplingParams(temperature=0, max_new_tokens=n), valid_vocab_size=1000
        )
        rows: list[list[int]] = [[] for _ in prompts]
        while not gen.done:
            for i, tok in enumerate(gen.step()):
                if tok is not None:
                    rows[i].append(tok)
        model.set_kv_cache_dtype(None)
        return rows

    return run
