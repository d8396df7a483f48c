"""Prometheus metrics for `GET /metrics`, kept in one `ServerMetrics` object with its own registry.

The engine reports tokens and latencies (`on_first_token`, `on_token`), the routes report prompt tokens and
aborted requests, and `RequestCounter` (a pure ASGI middleware) counts every HTTP request by route template and
status. The prefix cache's outcome per sequence arrives through `on_prefix_lookup`. Rendering uses `prometheus_client`, never hand-written text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Time to first token: from the engine accepting a request to its first sampled token (queueing included).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# Time between two tokens of one sequence (one decode step, plus the prefill chunks interleaved with it).
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
ABORT_REASONS = ("request_timeout", "stream_idle_timeout", "shutdown")

MEDIA_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """Every metric the server exports. Thread-safe: the engine's worker thread and the event loop both write."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "qwenkit_http_requests", "HTTP requests answered, by route template and status code.",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.aborted = Counter(
            "qwenkit_requests_aborted",
            "Generation requests ended early: request_timeout (--request-timeout), stream_idle_timeout "
            "(--stream-idle-timeout, the client stopped reading), shutdown (cut at the end of a drain).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "qwenkit_prompt_tokens", "Prompt tokens of accepted generation requests.", registry=r
        )
        self.generation_tokens = Counter(
            "qwenkit_generation_tokens",
            "Tokens generated (as counted in usage.completion_tokens).",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "qwenkit_prefix_cache_hits", "Sequences whose prompt began with blocks from the prefix cache.",
            registry=r,
        )  # fmt: skip
        self.prefix_cache_misses = Counter(
            "qwenkit_prefix_cache_misses", "Sequences (with a prefix cache) that reused nothing.", registry=r
        )
        self.prefix_cache_reused_tokens = Counter(
            "qwenkit_prefix_cache_reused_tokens", "Prompt tokens copied from the prefix cache, not prefilled.",
            registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "qwenkit_time_to_first_token_seconds", "Seconds from accepting a sequence to its first token.",
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_per_output_token = Histogram(
            "qwenkit_time_per_output_token_seconds", "Seconds between consecutive tokens of a sequence.",
            buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("qwenkit_queue_depth", "Sequences waiting for a slot.", registry=r)
        self.running = Gauge("qwenkit_running_slots", "Sequences in KV-cache slots (prefilling or decoding).",
                             registry=r)  # fmt: skip
        self.slots = Gauge("qwenkit_slots", "KV-cache slots (--max-concurrency).", registry=r)
        self.draining = Gauge(
            "qwenkit_draining", "1 while the server drains for shutdown, else 0.", registry=r
        )
        info = Gauge("qwenkit_model_info", "The served model (value always 1).", ["model"], registry=r)
        info.labels(model=model_name).set(1)
        for reason in ABORT_REASONS:  # export zeros from the start, so rate() works before the first abort
            self.aborted.labels(reason=reason)

    def bind_engine(self, stats: Callable[[], dict[str, int]], slots: int) -> None:
        """Read queue depth and running slots from the engine at scrape time."""
        self.queue_depth.set_function(lambda: stats()["waiting"])
        self.running.set_function(lambda: stats()["running"])
        self.slots.set(slots)

    # ---- hooks the engine and the routes call ---------------------------------------------------------------

    def on_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)
        self.generation_tokens.inc()

    def on_token(self, seconds_since_previous: float) -> None:
        self.time_per_output_token.observe(seconds_since_previous)
        self.generation_tokens.inc()

    def on_prefix_lookup(self, reused_tokens: int) -> None:
        """A sequence's prompt is in its slot; `reused_tokens` of it came from the prefix cache."""
        (self.prefix_cache_hits if reused_tokens > 0 else self.prefix_cache_misses).inc()
        self.prefix_cache_reused_tokens.inc(reused_tokens)

    def on_abort(self, reason: str) -> None:
        if reason not in ABORT_REASONS:
            raise ValueError(f"unknown abort reason {reason!r}; expected one of {ABORT_REASONS}")
        self.aborted.labels(reason=reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: count each HTTP request by its route template (`/v1/models/{model_id:path}`, not the
    concrete path, so labels stay few) and final status; unmatched paths count as route `other`, requests that sent no response as status `none`."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.requests.labels(route=route, status=str(status[0]) if status[0] else "none").inc()
