"""The finetuning loop: epochs of shuffled batches, gradient accumulation, clipping, AdamW + cosine, bf16
autocast on GPUs that have it, a progress line (loss, tokens/s, ETA), periodic and Ctrl-C checkpoints, exact
resume, eval loss per epoch and data-parallel training under `torchrun` (PyTorch DDP: gloo on CPU, NCCL on GPU).

Model loading and freezing are `train.setup`; the data is `train.data`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoints.adapter_files import save_adapter
from ..checkpoints.quantize import save_model
from ..model.transformer import QWenLMHeadModel
from .data import IGNORE_TOKEN_ID
from .setup import TrainConfig, build_optimizer, prepare_model
from .state import latest_checkpoint, load_state, rng_state, save_state, set_rng_state


@dataclass
class TrainResult:
    """What a run did: per-step mean training losses (a resumed run includes the earlier steps), eval losses
    per epoch, the optimizer steps done, and whether Ctrl-C stopped it."""

    losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    steps: int = 0
    interrupted: bool = False
    checkpoint: Path | None = None


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the label positions (the official model's loss: logits[:, :-1]
    against labels[:, 1:], IGNORE_TOKEN_ID skipped)."""
    logits = model(input_ids)  # [B, T, V] fp32
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).long(), ignore_index=IGNORE_TOKEN_ID
    )


def trim(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) cut to the longest row of the batch: the padding after it is eod ids with ignored
    labels, which a causal model's other positions never see, so the loss is that of the padded batch."""
    length = int(batch["attention_mask"].sum(1).max().clamp(min=2))
    return batch["input_ids"][:, :length].long(), batch["labels"][:, :length]


class _World:
    """Rank and size of a `torchrun` launch (1 process otherwise); sets up and ends the process group."""

    def __init__(self, device: torch.device) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Only the trainable tensors are synchronised: the frozen base is identical on every rank.
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ids = [model.device.index] if model.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def mean(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.size


def step_batches(n: int, config: TrainConfig, world: _World, epoch: int) -> list[list[torch.Tensor]]:
    """This rank's micro-batches (index tensors) of `epoch`, grouped per optimizer step. The order is a
    permutation drawn from `seed + epoch`, the same on every rank; each global batch of `batch_size * world`
    rows is split across ranks."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch))
    global_batch = config.batch_size * world.size
    micro = []
    for start in range(0, n, global_batch):
        rows = order[start : start + global_batch][world.rank :: world.size]
        micro.append(rows if len(rows) else order[start : start + 1])  # a short last batch: every rank gets rows
    return [micro[i : i + config.grad_accum] for i in range(0, len(micro), config.grad_accum)]


def train(
    model: QWenLMHeadModel,
    data: dict[str, torch.Tensor],
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    eval_data: dict[str, torch.Tensor] | None = None,
    resume: bool | str | os.PathLike[str] = False,
    base_model: str = "",
    source_dir: str | os.PathLike[str] | None = None,
    stream: TextIO | None = sys.stderr,
) -> TrainResult:
    """Finetune `model` on preprocessed `data` (`train.data.preprocess`) and write the result to `out_dir`:
    the adapter (peft format) for LoRA / Q-LoRA, a full checkpoint in the official layout for full training.

    `resume` True continues from the latest `out_dir/checkpoint-N`, a path from that checkpoint. Ctrl-C
    writes a checkpoint of the last finished step and returns with `interrupted` set.
    """
    config = config.resolved()
    out = Path(out_dir)
    world = _World(model.device)
    params = prepare_model(model, config)
    n = len(data["input_ids"])
    if n == 0:
        raise ValueError("the training set is empty; give a data file with at least one conversation")
    per_epoch = len(step_batches(n, config, world, 0))
    total = math.ceil(per_epoch * config.epochs)
    total = min(total, config.max_steps) if config.max_steps else total
    optimizer, scheduler = build_optimizer(model, config, math.ceil(per_epoch * config.epochs))
    torch.manual_seed(config.seed + world.rank)
    result = TrainResult()
    source = latest_checkpoint(out) if resume is True else (Path(resume) if resume else None)
    if resume is True and source is None:
        raise FileNotFoundError(f"--resume: no checkpoint-N directory with a training state in {out}")
    if source is not None:
        state = load_state(source, model, optimizer, scheduler, config)
        set_rng_state(state["rng"][min(world.rank, len(state["rng"]) - 1)])
        result.losses, result.steps = state["losses"], state["step"]
    runner = world.wrap(model)
    autocast = _autocast(model)
    boundary_rng = _gather_rng(world)
    progress = _Progress(stream if world.main else None, total, result.steps)
    try:
        epoch = result.steps // per_epoch
        while result.steps < total:
            steps = step_batches(n, config, world, epoch)
            for micro in steps[result.steps - epoch * per_epoch :]:
                loss, tokens = _accumulate(runner, data, micro, autocast)
                with _ctrl_c_after():  # a step is applied whole or not at all: the Ctrl-C checkpoint is exact
                    _update(params, optimizer, scheduler, config)
                    result.steps += 1
                    result.losses.append(world.mean(loss))
                    boundary_rng = _gather_rng(world)
                progress.update(result.losses[-1], scheduler.get_last_lr()[0], tokens * world.size)
                if result.steps % config.save_steps == 0 and world.main:
                    result.checkpoint = _save(out, result, model, optimizer, scheduler, boundary_rng, config, base_model)
                if result.steps >= total:
                    break
            epoch += 1
            if eval_data is not None and (result.steps % per_epoch == 0 or result.steps >= total):
                result.eval_losses.append(world.mean(evaluate(model, eval_data, config.batch_size)))
                progress.note(f"epoch {epoch}: eval loss {result.eval_losses[-1]:.4f}")
    except KeyboardInterrupt:
        result.interrupted = True
        if world.main:
            result.checkpoint = _save(out, result, model, optimizer, scheduler, boundary_rng, config, base_model)
            progress.note(f"interrupted: saved {result.checkpoint}; continue with --resume")
        return result
    progress.close()
    if world.main:
        _save_final(model, config, out, base_model, source_dir)
    if world.size > 1:
        dist.barrier()
    return result


def _accumulate(runner, data, micro, autocast) -> tuple[float, int]:
    """Forward and backward over one step's micro-batches (gradients summed in `.grad`); returns (mean
    micro-batch loss, tokens seen on this rank)."""
    total_loss, tokens = 0.0, 0
    for i, rows in enumerate(micro):
        ids, labels = trim({k: v[rows] for k, v in data.items()})
        ids, labels = ids.to(_device(runner)), labels.to(_device(runner))
        sync = i == len(micro) - 1 or not hasattr(runner, "no_sync")
        with (runner.no_sync() if not sync else contextlib.nullcontext()), autocast:
            loss = causal_lm_loss(runner, ids, labels) / len(micro)
            loss.backward()
        total_loss += loss.item()
        tokens += ids.numel()
    return total_loss, tokens


def _update(params, optimizer, scheduler, config: TrainConfig) -> None:
    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _ctrl_c_after():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it as KeyboardInterrupt at its end, so
    weights, optimizer, scheduler and step count never disagree. Off the main thread (no signals): a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:  # None: a handler not set from Python, which cannot be put back; Python's default instead
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if held:
        raise KeyboardInterrupt


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int) -> float:
    """Token-weighted mean loss of `model` over `data` (no dropout)."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for start in range(0, len(data["input_ids"]), batch_size):
        ids, labels = trim({k: v[start : start + batch_size] for k, v in data.items()})
        ids, labels = ids.to(model.device), labels.to(model.device)
        n = int((labels[:, 1:] != IGNORE_TOKEN_ID).sum())
        if n:
            loss_sum += float(causal_lm_loss(model, ids, labels)) * n
            count += n
    model.train(was_training)
    return loss_sum / max(1, count)


def _save(out, result, model, optimizer, scheduler, rng, config, base_model) -> Path:
    path = save_state(out, result.steps, model, optimizer, scheduler, rng, result.losses, config)
    if config.method != "full":
        save_adapter(model, path, config.lora, base_model)
    return path


def _save_final(model: QWenLMHeadModel, config: TrainConfig, out: Path, base_model: str, source_dir) -> None:
    if config.method == "full":
        model.eval()
        save_model(model, out, source_dir=source_dir, overwrite=True)
    else:
        save_adapter(model, out, config.lora, base_model)


def _gather_rng(world: _World) -> list:
    """Every rank's RNG state (index = rank), so a resumed run restores each rank's dropout stream."""
    mine = rng_state()
    if world.size == 1:
        return [mine]
    states: list = [None] * world.size
    dist.all_gather_object(states, mine)
    return states


def _device(runner: nn.Module) -> torch.device:
    return getattr(runner, "module", runner).device


def _autocast(model: QWenLMHeadModel):
    """bf16 autocast for fp32 weights on a GPU with bf16; nothing on CPU (its bf16 matmuls are emulated on
    CPUs without AVX-512 BF16, and the frozen bf16 base already runs its products in fp32 tiles there)."""
    dev = model.device
    on = dev.type == "cuda" and torch.cuda.is_bf16_supported() and model.dtype == torch.float32
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on)


class _Progress:
    """One status line: step, loss, learning rate, tokens/s and ETA (rewritten in place on a terminal)."""

    def __init__(self, stream: TextIO | None, total: int, done: int) -> None:
        self.stream, self.total, self.start_step = stream, total, done
        self.step, self.start, self.tokens = done, time.perf_counter(), 0
        self.tty = bool(stream) and stream.isatty()

    def update(self, loss: float, lr: float, tokens: int) -> None:
        self.step += 1
        self.tokens += tokens
        if self.stream is None:
            return
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / max(1, self.step - self.start_step)
        eta = int(per_step * (self.total - self.step))
        line = (
            f"step {self.step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {self.tokens / elapsed:.0f} tok/s  "
            f"{per_step:.2f} s/step  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        )
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\n")
