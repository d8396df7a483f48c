"""Server logging: one access line per request, control characters escaped, prompts left out.

`escape` makes any client-supplied text safe for a log line (no forged lines, no terminal escapes).
`AccessLog` is a pure ASGI middleware (it never reads the body, so streaming and disconnects are untouched).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

LOG = logging.getLogger("qwenkit.server")

# C0/C1 controls, DEL and the Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str, limit: int = 2000) -> str:
    """`text` with control characters as `\\xNN`/`\\uNNNN`, cut to `limit` characters."""
    cut = text if len(text) <= limit else text[:limit] + f"...[{len(text) - limit} more]"

    def repl(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(repl, cut)


class AccessLog:
    """Log `METHOD PATH STATUS SECONDS` for every HTTP request (no query string, no body, no headers)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [0]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            LOG.info(
                "%s %s %s %.3fs",
                escape(scope.get("method", "?"), 16),
                escape(scope.get("path", "?"), 200),
                status[0] or "-",
                time.perf_counter() - start,
            )
