"""Resumable training checkpoints: `OUT/checkpoint-STEP/` holds the trainable weights, optimizer, scheduler, RNG
states and the loss history at an optimizer-step boundary (plus the adapter in peft's format for LoRA), so a
resumed run continues exactly. Deciding when to save is left to `train.loop`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_FILE = "training_state.pt"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings a resumed run must share with the run it continues (others, like save_steps, may change).
_MUST_MATCH = ("method", "lora", "max_len", "epochs", "lr", "batch_size", "grad_accum", "weight_decay",
               "adam_beta2", "warmup_ratio", "seed", "system_message")  # fmt: skip


def rng_state() -> dict[str, Any]:
    """The RNG states dropout draws from (CPU, and every CUDA device when present)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(
    out_dir: Path, step: int, model: nn.Module, optimizer, scheduler, rng: dict[str, Any], losses: list[float],
    config: Any,
) -> Path:  # fmt: skip
    """Write `out_dir/checkpoint-{step}/training_state.pt` (atomically: a temporary file renamed)."""
    path = out_dir / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "losses": list(losses),
        "config": dataclasses.asdict(config),
    }
    tmp = path / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path / STATE_FILE)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The `checkpoint-N` directory with the largest N that holds a complete state, or None."""
    found = []
    if out_dir.is_dir():
        for child in out_dir.iterdir():
            match = _CHECKPOINT.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def load_state(path: Path, model: nn.Module, optimizer, scheduler, config: Any) -> dict[str, Any]:
    """Restore weights, optimizer and scheduler from a checkpoint directory; returns the state (step, rng,
    losses). ValueError when the checkpoint was made with different settings or another model."""
    file = path / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no {STATE_FILE}; pass an OUT/checkpoint-N directory or --resume")
    state = torch.load(file, map_location="cpu", weights_only=False)
    saved, now = state["config"], dataclasses.asdict(config)
    changed = [k for k in _MUST_MATCH if saved.get(k) != now.get(k)]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume from {path}: settings differ ({diffs}); use the original settings")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state["trainable"]):
        raise ValueError(f"cannot resume from {path}: its trainable weights do not match this model's")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state
