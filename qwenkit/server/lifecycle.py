"""Graceful drain: once shutdown starts, new requests get 503 while the requests in flight finish or are cut.

`Lifecycle.drain()` (run.py calls it on the first SIGTERM/SIGINT) turns `draining` on, waits up to
`shutdown_timeout` seconds for the in-flight requests, then asks the engine to end the rest (streams send a
final event with an error, whole answers a 503) and waits for them to be written. `DrainGate`, an ASGI
middleware, counts requests in flight and refuses new ones while draining; probes and /metrics always pass.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from .errors import error_body
from .logs import LOG

# Routes answered while draining: orchestrators keep probing and scraping until the process exits.
ALWAYS_SERVED = frozenset({"/health", "/ready", "/metrics"})
RETRY_AFTER_S = 5
CUT_GRACE_S = 5.0  # after the cut: time for the ended requests to write their last bytes
POLL_S = 0.05


class Lifecycle:
    """Drain state shared by the gate, the routes (`/ready`) and run.py (signals)."""

    def __init__(self, shutdown_timeout: float) -> None:
        if shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {shutdown_timeout}")
        self.shutdown_timeout = shutdown_timeout
        self.draining = False
        self.in_flight = 0  # requests past the gate and not yet answered (event-loop thread only)
        self._cut: Callable[[], None] | None = None

    def on_cut(self, cut: Callable[[], None]) -> None:
        """What ends the remaining requests when the drain times out (the engine's abort_all)."""
        self._cut = cut

    async def drain(self) -> None:
        """Refuse new requests, let the ones in flight finish up to `shutdown_timeout`, then cut the rest."""
        if self.draining:
            return
        self.draining = True
        LOG.info(
            "draining: %d request(s) in flight, up to %gs to finish", self.in_flight, self.shutdown_timeout
        )
        if await self._wait_idle(self.shutdown_timeout):
            LOG.info("drained: every request finished")
            return
        LOG.warning("shutdown timeout reached: ending %d request(s) now", self.in_flight)
        if self._cut is not None:
            self._cut()
        if not await self._wait_idle(CUT_GRACE_S):
            LOG.warning("%d request(s) still open after the cut; closing their connections", self.in_flight)

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        return not self.in_flight


class DrainGate:
    """ASGI middleware: while draining, answer 503 (Retry-After, Connection: close) to every request but
    ALWAYS_SERVED; otherwise count the request in flight until its response is sent."""

    def __init__(self, app: Any, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in ALWAYS_SERVED:
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            await _refuse(send)
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


def shutting_down_body() -> dict[str, Any]:
    return error_body(
        "The server is shutting down; retry on another instance or after it restarts.",
        "service_unavailable",
        code="server_shutting_down",
    )


async def _refuse(send: Any) -> None:
    body = json.dumps(shutting_down_body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
