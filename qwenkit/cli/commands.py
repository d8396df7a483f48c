"""The `qwenkit` command line: one subcommand per job, heavy imports only inside the subcommand that needs them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _make_checkpoint(args: argparse.Namespace) -> int:
    from ..checkpoints.synthetic import make_checkpoint

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


def _generate(args: argparse.Namespace) -> int:
    from ..checkpoints.loading import load
    from ..generation.chat import resolve_generation_config
    from ..generation.generate import stream
    from ..generation.sampling import SamplingParams
    from .chat import check_settings

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load(
        args.model, dtype=args.dtype, device=args.device, kv_cache_dtype=args.kv_cache, lora=args.lora
    )
    cfg = resolve_generation_config(model)
    conf = _sampling_overrides(args)
    check_settings(cfg, conf)
    params = SamplingParams.from_generation_config(cfg, **conf, seed=args.seed)
    ids = tokenizer.encode(prompt, allowed_special=set())  # user text is plain text
    try:
        for chunk in stream(model, tokenizer, ids, params):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    sys.stdout.write("\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ..bench import format_result, run_bench, write_json

    result = run_bench(
        args.model, dtype=args.dtype, device=args.device, quantize=args.quantize, gen_tokens=args.gen,
        prompt_tokens=args.prompt_len, runs=args.runs, threads=args.threads, memory=not args.no_memory,
        kv_cache=args.kv_cache,
    )  # fmt: skip
    print(format_result(result))
    if args.json:
        write_json(result, args.json)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from ..checkpoints.quantize import quantize_checkpoint
    from ..quant import QuantScheme

    scheme = QuantScheme(QuantScheme.parse(args.to).bits, args.group_size, not args.no_lm_head)
    out = quantize_checkpoint(args.model, args.out, scheme, device=args.device, overwrite=args.overwrite)
    groups = "per output channel" if scheme.group_size == -1 else f"groups of {scheme.group_size}"
    print(f"Wrote {args.model} quantized to {scheme.name} ({groups}) to {out}; open it with -m {out}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .chat import main_chat

    return main_chat(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        from ..server.run import serve
    except ImportError as exc:
        raise ValueError(f"{exc}; install the server extra: pip install 'qwenkit[server]'") from exc
    return serve(args)


def _sampling_overrides(args: argparse.Namespace) -> dict[str, object]:
    names = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
    conf: dict[str, object] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.greedy:
        conf["do_sample"] = False
    return conf


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m", "--model", required=True,
        help="model directory in the official layout, or a hub id such as Qwen/Qwen-1_8B-Chat",
    )  # fmt: skip
    p.add_argument(
        "--dtype", default="auto", help="auto (default: bf16/fp16 on GPU, fp32 on CPU), bf16, fp16, fp32"
    )
    p.add_argument(
        "--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda, ..."
    )
    _add_kv_cache_arg(p)
    p.add_argument(
        "--lora", default=None, metavar="DIR", help="apply a LoRA adapter (qwenkit finetune, peft) to the model"
    )


def _add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-cache", default=None, choices=["int8", "fp32", "bf16", "fp16"],
        help="KV cache kind (default: fp32 on CPU, the model dtype on GPU; int8 = a quarter of fp32's memory)",
    )  # fmt: skip


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults come from the model's generation_config.json)")
    g.add_argument("--seed", type=int, default=None, help="random seed; the same seed repeats an answer")
    g.add_argument("--temperature", type=float, default=None, help="0 means greedy")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1 = off (Qwen chat uses 1.1)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="upper bound on the answer length")
    g.add_argument(
        "--greedy", action="store_true", help="always pick the most likely token (do_sample=False)"
    )


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (continuous batching, streaming, tools)",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health, /tokenize and /detokenize "
        "with continuous batching. Needs the server extra: pip install 'qwenkit[server]'. See docs/server.md.",
    )
    _add_model_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set QWENKIT_API_KEY)"
    )
    p.add_argument("--max-concurrency", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument(
        "--max-queue", type=int, default=32, help="sequences that may wait; beyond: 429 (default 32)"
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="allow this browser origin (repeatable)",
    )
    p.add_argument("--model-name", default=None, help="the model id clients send (default: last part of -m)")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's seq_length)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    p.add_argument("--log-prompts", action="store_true", help="log prompts (escaped); off by default")
    p.add_argument("--no-web", action="store_true", help="do not serve the chat page at / (API only)")
    p.add_argument(
        "--prefix-cache-mb", type=int, default=2048,
        help="memory for the shared prefix cache of computed prompt blocks, MiB (default 2048; 0 = off)",
    )  # fmt: skip
    ops = p.add_argument_group("operations (see docs/server.md)")
    ops.add_argument("--metrics-key", default=None,
                     help="Bearer key for GET /metrics (or set QWENKIT_METRICS_KEY; default: --api-key)")  # fmt: skip
    ops.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                     help="on SIGTERM/SIGINT, seconds to let requests finish before cutting them (default 30)")  # fmt: skip
    ops.add_argument("--request-timeout", type=float, default=None, metavar="S",
                     help="wall-clock limit per generation request, seconds (default: none)")  # fmt: skip
    ops.add_argument("--stream-idle-timeout", type=float, default=60.0, metavar="S",
                     help="free a stream's slot when its client reads nothing for S seconds (default 60; 0 = off)")  # fmt: skip
    p.set_defaults(handler=_serve)


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

    p = sub.add_parser(
        "chat",
        help="interactive streaming chat in the terminal",
        description="Chat with a Qwen chat model. On a terminal: type a message and press Enter; :help lists "
        "the commands, Ctrl-C stops an answer, Ctrl-D or :q exits. With stdin from a pipe or file: one query "
        "per line, one answer per query on stdout.",
    )
    _add_model_args(p)
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    p.add_argument("--max-window-size", type=int, default=None, help="token budget for system + history")
    p.add_argument("--verbose", action="store_true", help="print token counts and tokens/s after each answer")
    p.add_argument(
        "--no-prefix-cache", action="store_true",
        help="prefill the whole conversation every turn (default: reuse the previous turn's KV cache)",
    )  # fmt: skip
    _add_sampling_args(p)
    p.set_defaults(handler=_chat)

    p = sub.add_parser(
        "generate",
        help="print a raw continuation of a text (streamed)",
        description="Continue PROMPT with the model, without any chat template (use '-' to read stdin).",
    )
    _add_model_args(p)
    p.add_argument("prompt", help="text to continue, or - for stdin")
    _add_sampling_args(p)
    p.set_defaults(handler=_generate)

    p = sub.add_parser(
        "bench",
        help="measure speed and memory (the model card's profile)",
        description="Measure decode speed (N tokens after a 1-token context, greedy, never stopping early), "
        "prefill speed, and peak memory for encoding 2048 tokens and for generating at the end of an 8192-token "
        "context. Without -m, a full-size synthetic Qwen-1.8B checkpoint is created once in ~/.cache/qwenkit "
        "(or $QWENKIT_CACHE) and measured, so it works offline.",
    )
    p.add_argument("-m", "--model", default=None, help="model directory or hub id (default: synthetic 1.8B)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16, float32, auto")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument(
        "--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization at load"
    )
    p.add_argument(
        "--gen", type=int, default=256, help="tokens to generate for the speed figure (default 256)"
    )
    p.add_argument(
        "--prompt-len", type=int, default=512, help="prompt length for the prefill figure (default 512)"
    )
    p.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the two peak-memory cases")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the figures as JSON")
    _add_kv_cache_arg(p)
    p.set_defaults(handler=_bench)

    p = sub.add_parser(
        "quantize",
        help="write a weight-only int8/int4 copy of a checkpoint (loads without re-quantizing)",
        description="Quantize every transformer linear and the lm_head of a float checkpoint (int8: symmetric "
        "per output channel; int4: asymmetric per group of inputs) and write the result in the official layout, "
        "with the scheme in config.json. The embedding, norms and biases keep the checkpoint's dtype.",
    )
    p.add_argument("-m", "--model", required=True, help="float checkpoint directory or hub id")
    p.add_argument("--to", required=True, choices=["int8", "int4"], help="weight format")
    p.add_argument(
        "--group-size", type=int, default=None, help="inputs per scale (default: int4 128, int8 whole row)"
    )
    p.add_argument("--no-lm-head", action="store_true", help="keep lm_head in the float dtype")
    p.add_argument(
        "--device", default="auto", help="where to quantize: auto (default: cuda if available), cpu"
    )
    p.add_argument("-o", "--out", required=True, help="output directory (created)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT")
    p.set_defaults(handler=_quantize)
    _add_serve_parser(sub)
    from .eval import add_eval_parser  # the handler imports its heavy modules lazily

    add_eval_parser(sub)
    from .finetune import add_finetune_parsers

    add_finetune_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"qwenkit {args.command}: error: {exc}", file=sys.stderr)
        return 2

