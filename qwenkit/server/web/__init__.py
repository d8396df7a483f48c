"""The browser chat page at `/`: static files shipped in this package, served with a strict Content-Security-Policy.

The page (index.html, app.css and the ES modules app.js, api.js, store.js, markdown.js) is plain JS with no build step, no CDN and no network beyond
this server: it calls the server's own `/v1/chat/completions` like any other client, with the user's API key
when the server has one. `GET /web/config` (behind the API key, like `/v1/models`) tells it the model name, the
context length and the sampling defaults of the model's generation_config. Generation, auth and error shapes are
app.py's and completions.py's job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

from ...generation.sampling import SamplingParams
from ..completions import Served

# The page's own files, with their media types; nothing outside this table is served.
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "store.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# Scripts and styles only from this server, no inline code, no eval, no plugins, no framing, and Trusted Types
# so that a string can never reach an HTML sink (innerHTML and friends throw): the page builds DOM nodes only.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded server never runs an old page
}


def page_file(name: str) -> bytes:
    """The bytes of one of the page's files (index.html or a STATIC_FILES name), read from the package."""
    return resources.files(__package__).joinpath(name).read_bytes()


def sampling_defaults(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """What a request that leaves the fields out gets: temperature (0 = greedy), top_p, max_tokens."""
    params = SamplingParams.from_generation_config(generation_config)
    return {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_new_tokens}


def _file_route(body: bytes, media_type: str) -> Callable[[], Any]:
    async def serve_file() -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    return serve_file


def add_web_routes(app: FastAPI, ready: Callable[[], Served], auth: Any) -> None:
    """Serve the page at `/`, its files under `/web/`, and `GET /web/config` (behind `auth`)."""
    app.add_api_route("/", _file_route(page_file("index.html"), "text/html; charset=utf-8"), methods=["GET"])
    for name, media_type in STATIC_FILES.items():
        app.add_api_route(f"/web/{name}", _file_route(page_file(name), media_type), methods=["GET"])

    @app.get("/web/config", dependencies=[auth])
    async def web_config() -> dict[str, Any]:
        served = ready()
        return {
            "model": served.model_name,
            "max_model_len": served.max_len,
            "defaults": sampling_defaults(served.generation_config),
        }
