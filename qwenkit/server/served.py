"""`Served`: everything the routes need once the model is loaded (engine, tokenizer, limits, metrics), and the
errors of requests ended early (timeouts). Building it is app.py's job; using it, the routes'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..tokenizer.tokenization import QWenTokenizer
from .engine import Engine
from .errors import APIError
from .logs import LOG, escape
from .metrics import ServerMetrics


@dataclass
class Served:
    """Everything the routes need once the model is loaded."""

    engine: Engine
    tokenizer: QWenTokenizer
    generation_config: dict[str, Any]
    model_name: str
    max_len: int
    stop_token_ids: tuple[int, ...]
    max_body_bytes: int
    log_prompts: bool = False
    metrics: ServerMetrics | None = None
    request_timeout: float | None = None  # seconds per request, wall clock (None: no limit)
    stream_idle_timeout: float | None = (
        None  # seconds a stream may wait for the client to read (None: forever)
    )

    def deadline(self, arrived: float) -> float | None:
        return None if self.request_timeout is None else arrived + self.request_timeout

    def aborted(self, reason: str) -> None:
        LOG.warning("request ended early: %s", reason)
        if self.metrics is not None:
            self.metrics.on_abort(reason)

    def timed_out(self) -> APIError:
        self.aborted("request_timeout")
        return APIError(
            504,
            f"The request took longer than this server's --request-timeout of {self.request_timeout:g}s; "
            "ask for fewer tokens (max_tokens) or a shorter prompt.",
            type="timeout_error",
            code="request_timeout",
        )

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"The model '{escape(name, 200)}' does not exist on this server; it serves "
                f"'{self.model_name}' (see GET /v1/models).",
                type="not_found_error",
                param="model",
                code="model_not_found",
            )
