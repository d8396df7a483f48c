"""The `qwenkit` command line: one subcommand per job, heavy imports only inside the subcommand that needs them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _make_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import make_checkpoint

    out = make_checkpoint(
        args.out,
        preset=args.preset,
        dtype=args.dtype,
        seed=args.seed,
        shards=args.shards,
        overwrite=args.overwrite,
    )
    print(f"Wrote a synthetic {args.preset} checkpoint (random weights) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenkit",
        description="Run Qwen (v1) chat models in plain PyTorch. Use `qwenkit COMMAND --help` for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "make-checkpoint",
        help="write a synthetic checkpoint (official layout, random weights)",
        description="Write a checkpoint in the exact official Hugging Face layout of Qwen-*-Chat with random "
        "weights: for trying the pipeline and for speed measurements without downloading the real weights.",
    )
    p.add_argument("out", help="output directory (created)")
    p.add_argument(
        "--preset", default="tiny", choices=["tiny", "1.8b", "7b"], help="model size (default: tiny)"
    )
    p.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weight dtype"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--shards", type=int, default=None, help="number of safetensors shards (default: ~2 GB each)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT")
    p.set_defaults(handler=_make_checkpoint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"qwenkit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
