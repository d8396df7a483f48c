"""`qwenkit eval`: load a model (optionally quantized) and run one evaluation task of `qwenkit.eval`."""

from __future__ import annotations

import argparse


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate on C-Eval, MMLU, GSM8K, HumanEval or tool use (the official scripts, batched)",
        description="Run the official Qwen evaluation of one task (same prompts, greedy, same answer extraction "
        "and averaging), batched. Records go to OUT/TASK/*.jsonl (a rerun resumes), the summary to "
        "OUT/TASK/summary.{json,md} beside the model card's figures. Needs: pip install 'qwenkit[eval]'. "
        "See docs/eval.md for the data.",
    )
    p.add_argument("-m", "--model", required=True, help="model directory in the official layout, or a hub id")
    p.add_argument("--task", required=True, choices=["ceval", "mmlu", "gsm8k", "humaneval", "tools"])
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="local data in the official layout (default: the Hugging Face dataset, online)",
    )
    p.add_argument(
        "--dtype", default="auto", help="auto (default: bf16/fp16 on GPU, fp32 on CPU), bf16, fp16, fp32"
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.add_argument(
        "--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization at load"
    )
    p.add_argument("--limit", type=int, default=None, help="at most N questions per subject (the first N)")
    p.add_argument("--subjects", nargs="+", default=None, help="only these subjects (official names)")
    p.add_argument("--batch-size", type=int, default=16, help="questions generated together (default 16)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length bound (default: the model's generation config, 512 for Qwen chat)",
    )
    p.add_argument("--fewshot", action="store_true", help="gsm8k: the official 4-shot prompt")
    p.add_argument("--timeout", type=float, default=3.0, help="humaneval: seconds per sample (default 3)")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    p.add_argument("--out", default="eval-results", help="output directory (default eval-results)")
    p.add_argument("--overwrite", action="store_true", help="redo questions already recorded in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")  # fmt: skip
    p.set_defaults(handler=main_eval)


def main_eval(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoints.loading import load
    from ..eval import evaluate, precision_name
    from ..quant import weight_precision

    for name in ("limit", "batch_size", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    dtype = str(model.dtype).removeprefix("torch.")
    weights = weight_precision(model)  # also a checkpoint stored quantized (qwenkit int4/int8, GPTQ)
    settings = {"model": str(args.model), "dtype": dtype, "quantize": args.quantize, "weights": weights}
    _, text = evaluate(
        model, tokenizer, args.task, data_dir=args.data, subjects=args.subjects, limit=args.limit,
        out_dir=args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, fewshot=args.fewshot,
        timeout=args.timeout, overwrite=args.overwrite, settings=settings,
        precision=precision_name(dtype, weights), progress=not args.no_progress,
    )  # fmt: skip
    print(text)
    return 0
