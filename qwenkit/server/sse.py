"""Server-sent events: one `data: {json}` line per event, the last event of a cut stream, and a streaming
response whose client must keep reading (`--stream-idle-timeout`). What the events say is completions.py's job.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Message, Send

from .errors import APIError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(model: BaseModel) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


def abort_event(base: dict[str, Any], cut: Sequence[dict[str, Any]], error: APIError) -> bytes:
    """The last event of a cut stream: a chunk (`base` with no choices) whose `cut` choices end with
    `finish_reason: "abort"`, carrying the error object too."""
    chunk = {**base, "choices": [{**c, "logprobs": None, "finish_reason": "abort"} for c in cut]}
    return b"data: " + json.dumps({**chunk, **error.body()}).encode() + b"\n\n"


class IdleBoundStream(StreamingResponse):
    """A StreamingResponse whose every write must be taken by the client within `idle_timeout` seconds; past
    that, `on_idle` runs (the request is cancelled, its slot freed) and the connection is dropped."""

    def __init__(self, body: AsyncIterator[bytes], idle_timeout: float, on_idle: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.idle_timeout = idle_timeout
        self.on_idle = on_idle

    async def stream_response(self, send: Send) -> None:
        async def bounded(message: Message) -> None:
            await asyncio.wait_for(send(message), self.idle_timeout)

        try:
            await super().stream_response(bounded)
        except asyncio.TimeoutError:
            self.on_idle()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def event_stream(
    body: AsyncIterator[bytes], idle_timeout: float | None, on_idle: Callable[[], None]
) -> StreamingResponse:
    """The SSE response for `body`; with `idle_timeout`, bounded as in IdleBoundStream."""
    if idle_timeout is None:
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    return IdleBoundStream(body, idle_timeout, on_idle)
