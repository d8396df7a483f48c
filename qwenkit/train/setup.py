"""Everything before the first step: the training settings (official defaults), loading the base model for a
method (full, LoRA, Q-LoRA on int4 or GPTQ), freezing, gradient checkpointing and the AdamW + cosine schedule.

The loop itself is `train.loop`; adapter files and the LoRA module are `qwenkit.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoints.loading import load
from ..checkpoints.lora import LoraSpec, add_lora, route_frozen_linears
from ..model.transformer import QWenLMHeadModel
from ..tokenizer.tokenization import QWenTokenizer

METHODS = ("full", "lora", "qlora")


@dataclass
class TrainConfig:
    """Training settings; None means the official finetune scripts' value for the method (`resolved()`)."""

    method: str = "lora"
    lora: LoraSpec = field(default_factory=LoraSpec)
    max_len: int = 512
    epochs: float = 5
    lr: float | None = None  # 3e-4 LoRA / Q-LoRA, 1e-5 full
    batch_size: int | None = None  # per process: 2 LoRA / Q-LoRA, 1 full
    grad_accum: int | None = None  # 8 LoRA / Q-LoRA, 16 full
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    warmup_ratio: float = 0.01
    max_grad_norm: float = 1.0  # transformers.Trainer's default, which the official script keeps
    gradient_checkpointing: bool = True
    save_steps: int = 1000
    max_steps: int | None = None  # stop after this many optimizer steps (benchmarks, smoke runs)
    seed: int = 42
    system_message: str = "You are a helpful assistant."

    def resolved(self) -> TrainConfig:
        """A copy with every None filled in from the official defaults of `method`, validated."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        full = self.method == "full"
        out = dataclasses.replace(
            self,
            lr=self.lr if self.lr is not None else (1e-5 if full else 3e-4),
            batch_size=self.batch_size or (1 if full else 2),
            grad_accum=self.grad_accum or (16 if full else 8),
        )
        for name in ("max_len", "batch_size", "grad_accum", "save_steps"):
            value = getattr(out, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not out.epochs > 0 or not out.lr > 0:
            raise ValueError(f"epochs and lr must be positive, got epochs={out.epochs!r}, lr={out.lr!r}")
        if out.max_steps is not None and out.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {out.max_steps!r}")
        return out


def load_for_training(
    model: str | os.PathLike[str], method: str, dtype: str = "auto", device: str = "auto"
) -> tuple[QWenLMHeadModel, QWenTokenizer]:
    """Load the base model for `method`: float weights for full and LoRA, int4 for Q-LoRA (an official GPTQ
    Int4 checkpoint loads as stored; a float one is quantized to qwenkit int4 while it is read). dtype "auto" is
    bf16 for LoRA / Q-LoRA (the frozen base; adapters train in fp32) and fp32 for full finetuning."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if dtype == "auto":  # full: fp32 master weights (bf16 autocast on GPUs that have it)
        dtype = "float32" if method == "full" else "bfloat16"
    return load(model, dtype=dtype, device=device, quantize="int4" if method == "qlora" else None)


def prepare_model(model: QWenLMHeadModel, config: TrainConfig) -> list[nn.Parameter]:
    """Freeze what `config.method` does not train, add fresh LoRA layers (LoRA / Q-LoRA), switch on gradient
    checkpointing; return the trainable parameters."""
    model.requires_grad_(False)
    if config.method == "full":
        if model.config.quantization_config:
            raise ValueError("full finetuning needs float weights; this model is quantized (use --method qlora)")
        model.requires_grad_(True)
    else:
        if config.method == "lora" and model.config.quantization_config:
            raise ValueError("this model is quantized: use --method qlora, or LoRA on the float checkpoint")
        add_lora(model, config.lora)  # fp32 adapters: small, and the optimizer needs full precision
        for name, param in model.named_parameters():
            param.requires_grad_(".lora_" in name)
        route_frozen_linears(model)  # lm_head's backward: fp32 tiles, no saved float weight
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def enable_gradient_checkpointing(model: QWenLMHeadModel) -> None:
    """Recompute each block's activations in the backward instead of keeping them (PyTorch's non-reentrant
    checkpoint, RNG state preserved so dropout repeats); the module names do not change."""
    for block in model.transformer.h:
        if not isinstance(block.forward, functools.partial):
            block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block))


def _checkpointed(forward, x: torch.Tensor, step) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return forward(x, step)
    return checkpoint(forward, x, step, use_reentrant=False)


def build_optimizer(
    model: nn.Module, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (beta2 0.95, weight decay 0.1 except biases and norms, as transformers.Trainer groups them) and the
    cosine schedule with linear warmup over `ceil(warmup_ratio * total_steps)` steps."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or ".ln_" in name or "ln_f" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=(0.9, config.adam_beta2), eps=1e-8
    )
    warmup = math.ceil(config.warmup_ratio * total_steps)
    schedule = functools.partial(cosine_with_warmup, warmup=warmup, total=total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def cosine_with_warmup(step: int, *, warmup: int, total: int) -> float:
    """transformers' `get_cosine_schedule_with_warmup` factor at `step`."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
