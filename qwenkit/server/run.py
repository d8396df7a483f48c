"""`qwenkit serve`: turn the command-line flags into ServerOptions and a model loader, then run uvicorn.

The listening socket opens at once; the model loads in the background (`/health` says 503 until it is ready),
and a failed load stops the server with exit status 1. Context length: `--max-model-len`, default the model's
`seq_length` (8192 for Qwen-1.8B-Chat), at most 32768 (dynamic NTK + logn keep quality up to there). The first
SIGTERM/SIGINT drains (lifecycle.py) and then exits with status 0; a second one exits at once with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path
from types import FrameType

import torch
import uvicorn

from ..generation.chat import resolve_generation_config
from ..generation.generate import MAX_CONTEXT
from .app import Loaded, ServerOptions, create_app
from .backend import ModelBackend
from .lifecycle import Lifecycle

LOG = logging.getLogger("qwenkit.server")
API_KEY_ENV = "QWENKIT_API_KEY"
METRICS_KEY_ENV = "QWENKIT_METRICS_KEY"


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
    for flag, value in (
        ("--shutdown-timeout", args.shutdown_timeout),
        ("--request-timeout", args.request_timeout),
        ("--stream-idle-timeout", args.stream_idle_timeout),
    ):
        if value is not None and not value >= 0:  # `not >=` also refuses nan
            raise ValueError(f"{flag} must be a number of seconds >= 0, got {value}")
    if args.request_timeout == 0:
        raise ValueError("--request-timeout must be > 0 seconds (leave it out for no limit)")
    name = args.model_name or Path(str(args.model).rstrip("/")).name or str(args.model)
    return ServerOptions(
        model_name=name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        cors_origins=tuple(args.cors_origin or ()),
        log_prompts=args.log_prompts,
        web=not args.no_web,
        metrics_key=args.metrics_key or os.environ.get(METRICS_KEY_ENV) or None,
        shutdown_timeout=args.shutdown_timeout,
        request_timeout=args.request_timeout,
        stream_idle_timeout=args.stream_idle_timeout or None,  # 0 turns the bound off
    )


def model_loader(args: argparse.Namespace, options: ServerOptions) -> Loaded:
    """Load the checkpoint and wrap it for the engine (runs in the background thread)."""
    from ..checkpoints.loading import load

    kv_cache = getattr(args, "kv_cache", None)
    lora = getattr(args, "lora", None)
    model, tokenizer = load(
        args.model, dtype=args.dtype, device=args.device, kv_cache_dtype=kv_cache, lora=lora
    )
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the checkpoint's embedding has {model.config.vocab_size} rows but its tokenizer {len(tokenizer)} "
            "tokens, so some prompts could not be embedded; use the qwen.tiktoken that belongs to this checkpoint"
        )
    max_len = resolve_max_len(args.max_model_len, model.config.seq_length)
    prefix_bytes = max(getattr(args, "prefix_cache_mb", 0) or 0, 0) << 20
    backend = ModelBackend(model, options.max_concurrency, max_len, prefix_cache_bytes=prefix_bytes)
    return Loaded(backend, tokenizer, resolve_generation_config(model))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT drains (new requests get 503 meanwhile; uvicorn alone would
    close the socket at once and cut streams after 5 s) before exiting, and a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.forced = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self.should_exit or self._drain_requested:
            LOG.warning("second signal: exiting now without waiting for requests")
            self.forced = True
            self.force_exit = True
            self.should_exit = True
            return
        self._drain_requested = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.lifecycle.drain()
        finally:
            self.should_exit = True


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; 1 if the model failed to load."""
    options = options_from_args(args)
    if args.threads is not None:
        # Fewer intra-op threads than cores leaves room for the event loop; on a busy machine, spinning OpenMP
        # threads that lose their core stall every op of a step.
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failures: list[BaseException] = []
    server: list[DrainingServer] = []

    def on_load_error(exc: BaseException) -> None:
        failures.append(exc)
        server[0].should_exit = True

    app = create_app(options, lambda: model_loader(args, options), on_load_error)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, access_log=False, timeout_graceful_shutdown=5, log_level="info"
    )
    server.append(DrainingServer(config, app.state.lifecycle))
    if options.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        LOG.warning("listening on %s without --api-key", args.host)
    server[0].run()
    if server[0].forced:
        # "At once": do not wait in interpreter shutdown for the engine thread, which may be inside a torch op
        # (finalizing under it aborted the process with SIGABRT).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 1 if failures else 0
