"""`qwenkit finetune` (full, LoRA, Q-LoRA on the official data format) and `qwenkit merge-lora` (an adapter
folded into a full checkpoint in the official layout).

Only flags -> `qwenkit.train` settings and messages live here; data, model preparation and the loop are
`qwenkit.train`, adapter files and merging `qwenkit.checkpoints`. Under `torchrun` every process runs this
command; only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


def add_finetune_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `finetune` and `merge-lora` on the `qwenkit` subcommand parser."""
    _add_finetune_parser(sub)
    _add_merge_parser(sub)


def _add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="finetune on chat data: full, LoRA or Q-LoRA (the official finetune.py's labels and defaults)",
        description="Finetune a Qwen chat model on conversations in the official format "
        '([{"id", "conversations": [{"from": "user"|"assistant", "value"}]}], or OpenAI-style '
        '{"messages": [...]} records as JSONL) with the labels and defaults of the official finetune.py. '
        "LoRA / Q-LoRA write a peft-format adapter to OUT (qwenkit chat -m MODEL --lora OUT; peft's "
        "PeftModel.from_pretrained); full writes a checkpoint in the official layout. Ctrl-C saves "
        "OUT/checkpoint-N and --resume continues it exactly. Several processes: run it under torchrun "
        "(DDP; gloo on CPU, NCCL on GPU). See docs/finetune.md.",
    )
    p.add_argument("-m", "--model", required=True, help="base model directory (official layout) or hub id")
    p.add_argument("--data", required=True, metavar="FILE", help="training data: official JSON, or JSONL")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory: new or empty (or --resume)")
    p.add_argument(
        "--method",
        default="lora",
        choices=["full", "lora", "qlora"],
        help="lora (default): fp32 adapters on the frozen bf16 base; qlora: adapters on an int4 base (an "
        "official GPTQ Int4 checkpoint as stored, a float one quantized at load); full: every weight, fp32",
    )
    p.add_argument("--eval-data", default=None, metavar="FILE", help="held-out data; loss shown per epoch")
    p.add_argument(
        "--system",
        default=None,
        metavar="TEXT",
        help="system prompt of every conversation (default: the official 'You are a helpful assistant.')",
    )
    g = p.add_argument_group("LoRA / Q-LoRA (the official defaults)")
    g.add_argument("--lora-r", metavar="N", type=int, default=64, help="adapter rank (default 64)")
    g.add_argument(
        "--lora-alpha",
        metavar="X",
        type=float,
        default=16,
        help="the update is scaled by alpha / r (default 16)",
    )
    g.add_argument(
        "--lora-dropout", metavar="P", type=float, default=0.05, help="dropout on the adapter input (0.05)"
    )
    g.add_argument(
        "--lora-targets",
        default="c_attn,c_proj,w1,w2",
        metavar="NAMES",
        help="comma-separated names of the linear layers to adapt (default c_attn,c_proj,w1,w2)",
    )
    g = p.add_argument_group("training (default: the official script's value for the method)")
    g.add_argument(
        "--max-len", metavar="N", type=int, default=512, help="tokens per conversation, longer ones cut (512)"
    )
    g.add_argument("--epochs", metavar="N", type=float, default=5, help="passes over the data (default 5)")
    g.add_argument(
        "--lr",
        metavar="X",
        type=float,
        default=None,
        help="peak learning rate (3e-4 LoRA / Q-LoRA, 1e-5 full)",
    )
    g.add_argument(
        "--batch-size",
        metavar="N",
        type=int,
        default=None,
        help="rows per micro-batch and process (2; full 1)",
    )
    g.add_argument(
        "--grad-accum",
        metavar="N",
        type=int,
        default=None,
        help="micro-batches per optimizer step (8; full 16)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute each block's activations in the backward: far less memory, ~1/3 more time (on)",
    )
    g.add_argument(
        "--max-steps", metavar="N", type=int, default=None, help="stop after this many optimizer steps"
    )
    g.add_argument(
        "--seed", metavar="N", type=int, default=42, help="seed of the data order and dropout (default 42)"
    )
    g.add_argument(
        "--save-steps",
        metavar="N",
        type=int,
        default=1000,
        help="write OUT/checkpoint-N every N steps (1000)",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue the run in OUT from its latest checkpoint-N (or from CHECKPOINT); same settings",
    )
    g = p.add_argument_group("device")
    g.add_argument(
        "--dtype",
        default="auto",
        help="base weights: auto (bf16 for LoRA / Q-LoRA, fp32 for full), bf16, fp32",
    )
    g.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda")
    g.add_argument(
        "--threads",
        metavar="N",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice)",
    )
    p.set_defaults(handler=main_finetune)


def _add_merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge-lora",
        help="fold a LoRA adapter into its base model and write a full checkpoint (official layout)",
        description="Load MODEL with the adapter, add B @ A * alpha / r (computed in fp32) to every adapted "
        "weight and write the merged model in the official layout (config, tokenizer, safetensors shards) in "
        "MODEL's dtype. MODEL must be float: merge a Q-LoRA adapter onto the float checkpoint, then quantize",
    )
    p.add_argument("-m", "--model", required=True, help="base model directory (float weights) or hub id")
    p.add_argument("--lora", required=True, metavar="DIR", help="adapter directory (qwenkit finetune, peft)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; new or empty)")
    p.add_argument("--dtype", default=None, help="dtype to write (default: MODEL's torch_dtype), bf16, fp32")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT")
    p.set_defaults(handler=main_merge)


def main_finetune(args: argparse.Namespace) -> int:
    """Entry point of `qwenkit finetune`; the exit status is 130 after Ctrl-C (a checkpoint saved)."""
    from ..checkpoints.lora import LoraSpec
    from ..train.data import DEFAULT_SYSTEM, load_conversations
    from ..train.setup import TrainConfig
    from ..train.state import latest_checkpoint

    main = int(os.environ.get("RANK", "0")) == 0
    out = Path(args.out)
    if not args.resume and out.is_dir() and any(out.iterdir()):
        raise ValueError(
            f"--out {out} is not empty; pass a new directory, or --resume to continue the run there"
        )
    if args.resume is True and latest_checkpoint(out) is None:
        raise FileNotFoundError(f"--resume: {out} holds no checkpoint-N directory with a training state")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    lora = LoraSpec(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets
    )
    config = TrainConfig(
        method=args.method,
        lora=lora,
        max_len=args.max_len,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing,
        save_steps=args.save_steps,
        max_steps=args.max_steps,
        seed=args.seed,
        system_message=args.system if args.system is not None else DEFAULT_SYSTEM,
    ).resolved()
    # Everything a user can get wrong in the files is checked before the (slow) model load.
    train_convs = load_conversations(args.data)
    eval_convs = load_conversations(args.eval_data) if args.eval_data else None
    try:
        return _run_finetune(args, config, train_convs, eval_convs, main)
    except KeyboardInterrupt:  # before the loop started or after it ended: the loop saves its own
        print(
            "qwenkit finetune: interrupted outside the training steps; nothing new was saved", file=sys.stderr
        )
        return INTERRUPTED


def _run_finetune(
    args: argparse.Namespace, config: Any, train_convs: list, eval_convs: list | None, main: bool
) -> int:
    from ..checkpoints.loading import resolve_model_dir
    from ..train.loop import train
    from ..train.setup import load_for_training

    device = _process_device(args.device)
    model, tokenizer = load_for_training(args.model, config.method, dtype=args.dtype, device=device)
    data = _preprocess(train_convs, tokenizer, config, args.data, main)
    eval_data = _preprocess(eval_convs, tokenizer, config, args.eval_data, main) if eval_convs else None
    result = train(
        model,
        data,
        config,
        args.out,
        eval_data=eval_data,
        resume=_resume_arg(args.resume),
        base_model=str(args.model),
        source_dir=resolve_model_dir(args.model),
        stream=sys.stderr,
    )
    if result.interrupted:
        return INTERRUPTED
    if main:
        what = "checkpoint" if config.method == "full" else "LoRA adapter"
        use = f"-m {args.out}" if config.method == "full" else f"-m {args.model} --lora {args.out}"
        steps = f"{result.steps} step" + ("" if result.steps == 1 else "s")
        loss = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
        print(f"Wrote the {what} to {args.out} ({steps}{loss}); chat with it: qwenkit chat {use}")
    return 0


def _process_device(device: str) -> str:
    """Under torchrun, "auto" means this process's own GPU (LOCAL_RANK), as DDP with NCCL expects."""
    local = os.environ.get("LOCAL_RANK")
    if device != "auto" or local is None:
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    torch.cuda.set_device(int(local))
    return f"cuda:{local}"


def _preprocess(convs: list, tokenizer: Any, config: Any, path: str, main: bool) -> dict:
    """`train.data.preprocess`, its truncation warning as one `qwenkit finetune: warning:` line (rank 0)."""
    from ..train.data import preprocess

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = preprocess(convs, tokenizer, config.max_len, config.system_message)
    for w in caught:
        if main:
            print(f"qwenkit finetune: warning: {path}: {w.message}", file=sys.stderr)
    return data


def _resume_arg(value: bool | str) -> bool | Path:
    if value is True or value is False:
        return value
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--resume {value}: no such directory; pass OUT/checkpoint-N, or --resume alone"
        )
    return path


def main_merge(args: argparse.Namespace) -> int:
    """Entry point of `qwenkit merge-lora`."""
    from ..checkpoints.gptq import gptq_config
    from ..checkpoints.loading import load, resolve_model_dir
    from ..checkpoints.lora import merge_lora
    from ..checkpoints.quantize import save_model
    from ..model.config import QwenConfig

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} is not empty; pass a new directory or --overwrite")
    model_dir = resolve_model_dir(args.model)
    config = QwenConfig.from_file(model_dir / "config.json")
    if config.quantization_config or gptq_config(config, model_dir) is not None:
        raise ValueError(
            f"{args.model} is quantized; an adapter cannot be merged into quantized weights. Merge onto "
            "the float checkpoint (e.g. Qwen-1_8B-Chat, not -Int4), then `qwenkit quantize` the result"
        )
    model, _ = load(
        model_dir, dtype=args.dtype or config.torch_dtype or "bfloat16", device="cpu", lora=args.lora
    )
    n = merge_lora(model)
    save_model(model, out, source_dir=model_dir, overwrite=args.overwrite)
    print(f"Merged {args.lora} into {args.model} ({n} layers) and wrote {out}; open it with -m {out}")
    return 0
