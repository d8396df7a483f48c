"""`qwenkit serve`: turn the command-line flags into ServerOptions and a model loader, then run uvicorn.

The listening socket opens at once; the model loads in the background (`/health` says 503 until it is ready),
and a failed load stops the server with exit status 1. Context length: `--max-model-len`, default the model's
`seq_length` (8192 for Qwen-1.8B-Chat), at most 32768 (dynamic NTK + logn keep quality up to there).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
import uvicorn

from ..generation.chat import resolve_generation_config
from ..generation.generate import MAX_CONTEXT
from .app import Loaded, ServerOptions, create_app
from .backend import ModelBackend

API_KEY_ENV = "QWENKIT_API_KEY"


def resolve_max_len(requested: int | None, seq_length: int) -> int:
    """The server's context length: `requested`, else the model's seq_length; within 2..MAX_CONTEXT."""
    max_len = requested or seq_length
    if not 2 <= max_len <= MAX_CONTEXT:
        raise ValueError(f"--max-model-len must be in [2, {MAX_CONTEXT}], got {max_len}")
    return max_len


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """Validated ServerOptions from `qwenkit serve` flags (ValueError names the flag to fix)."""
    if args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_model_len is not None:
        resolve_max_len(args.max_model_len, 2)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    name = args.model_name or Path(str(args.model).rstrip("/")).name or str(args.model)
    return ServerOptions(
        model_name=name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        cors_origins=tuple(args.cors_origin or ()),
        log_prompts=args.log_prompts,
        web=not args.no_web,
    )


def model_loader(args: argparse.Namespace, options: ServerOptions) -> Loaded:
    """Load the checkpoint and wrap it for the engine (runs in the background thread)."""
    from ..checkpoints.loading import load

    kv_cache = getattr(args, "kv_cache", None)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, kv_cache_dtype=kv_cache)
    max_len = resolve_max_len(args.max_model_len, model.config.seq_length)
    prefix_bytes = max(getattr(args, "prefix_cache_mb", 0) or 0, 0) << 20
    backend = ModelBackend(model, options.max_concurrency, max_len, prefix_cache_bytes=prefix_bytes)
    return Loaded(backend, tokenizer, resolve_generation_config(model))


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; 1 if the model failed to load."""
    options = options_from_args(args)
    if args.threads is not None:
        # Fewer intra-op threads than cores leaves room for the event loop; on a busy machine, spinning OpenMP
        # threads that lose their core stall every op of a step.
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failures: list[BaseException] = []
    server: list[uvicorn.Server] = []

    def on_load_error(exc: BaseException) -> None:
        failures.append(exc)
        server[0].should_exit = True

    app = create_app(options, lambda: model_loader(args, options), on_load_error)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, access_log=False, timeout_graceful_shutdown=5, log_level="info"
    )
    server.append(uvicorn.Server(config))
    if options.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("qwenkit.server").warning("listening on %s without --api-key", args.host)
    server[0].run()
    return 1 if failures else 0
