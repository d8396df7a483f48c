"""The FastAPI application: routes, API-key check, CORS, error shapes, and loading the model in the background.

`create_app(options, loader)` returns an app whose lifespan runs `loader` in a thread (so `/health` answers 503
while the weights load, then 200) and then starts the batching engine. Every error, including unknown routes and
internal failures, is `{"error": {"message", "type", "param", "code"}}`. The generation routes live in
completions.py; reading the command line and running uvicorn is run.py's job.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..tokenizer.tokenization import QWenTokenizer
from .backend import Backend
from .chat_prompt import chat_prompt_ids
from .completions import Served, chat_completions, completions, tool_specs
from .engine import SHUTTING_DOWN, Engine
from .errors import APIError, bad_request, error_body, read_request
from .lifecycle import DrainGate, Lifecycle
from .logs import LOG, AccessLog
from .metrics import MEDIA_TYPE, RequestCounter, ServerMetrics
from .protocol import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest
from .web import add_web_routes

DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: far above any prompt that fits a 32k context


@dataclass(frozen=True)
class ServerOptions:
    """Serving policy (what the command-line flags set)."""

    model_name: str
    api_key: str | None = None
    max_concurrency: int = 8
    max_queue: int = 32
    cors_origins: Sequence[str] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_prompts: bool = False
    web: bool = True  # the chat page at / (web/); `--no-web` turns it off
    metrics_key: str | None = None  # Bearer key for /metrics (default: the api_key)
    shutdown_timeout: float = 30.0  # seconds a drain waits for requests in flight before cutting them
    request_timeout: float | None = None  # wall-clock seconds per generation request (None: no limit)
    stream_idle_timeout: float | None = 60.0  # seconds a stream may wait for its reader (None: no bound)


@dataclass
class Loaded:
    """What a loader returns: a backend with max_concurrency slots, the tokenizer, the generation config."""

    backend: Backend
    tokenizer: QWenTokenizer
    generation_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class _State:
    metrics: ServerMetrics
    lifecycle: Lifecycle
    served: Served | None = None
    error: str | None = None


def _bring_up(state: _State, options: ServerOptions, loader: Callable[[], Loaded]) -> None:
    loaded = loader()
    tok = loaded.tokenizer
    engine = Engine(loaded.backend, tok, max_queue=options.max_queue, metrics=state.metrics)
    state.metrics.bind_engine(engine.stats, engine.max_slots)
    state.lifecycle.on_cut(
        lambda: engine.abort_all(
            f"the shutdown timeout ({options.shutdown_timeout:g}s) ran out", SHUTTING_DOWN
        )
    )
    engine.start()
    state.served = Served(
        engine=engine,
        tokenizer=tok,
        generation_config=loaded.generation_config,
        model_name=options.model_name,
        max_len=loaded.backend.max_len,
        stop_token_ids=(tok.im_end_id, tok.im_start_id, tok.eod_id),
        max_body_bytes=options.max_body_bytes,
        log_prompts=options.log_prompts,
        metrics=state.metrics,
        request_timeout=options.request_timeout,
        stream_idle_timeout=options.stream_idle_timeout,
    )
    LOG.info("ready: model %s, context %d tokens", options.model_name, loaded.backend.max_len)


def create_app(
    options: ServerOptions,
    loader: Callable[[], Loaded],
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The ASGI app. `loader` runs in a background thread at startup; `on_load_error` is told if it fails."""
    state = _State(ServerMetrics(options.model_name), Lifecycle(options.shutdown_timeout))
    state.metrics.draining.set_function(lambda: float(state.lifecycle.draining))

    def load() -> None:
        try:
            _bring_up(state, options, loader)
        except BaseException as exc:
            state.error = f"{type(exc).__name__}: {exc}"
            LOG.error("loading the model failed: %s", state.error)
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="qwenkit-load", daemon=True).start()
        yield
        if state.served is not None:
            state.served.engine.shutdown()

    app = FastAPI(title="qwenkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lifecycle = state.lifecycle  # run.py starts the drain on SIGTERM/SIGINT
    _install_error_handlers(app)
    app.add_middleware(DrainGate, lifecycle=state.lifecycle)
    if options.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(options.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(AccessLog)
    app.add_middleware(RequestCounter, metrics=state.metrics)

    def ready() -> Served:
        if state.served is None:
            message = (
                "The model failed to load" if state.error else "The model is still loading; retry shortly."
            )
            raise APIError(
                503, message, type="service_unavailable", code="model_not_ready", headers={"Retry-After": "5"}
            )
        return state.served

    auth = Depends(_auth_dependency(options.api_key))
    _add_routes(app, ready, auth)
    _add_ops_routes(app, state, Depends(_auth_dependency(options.metrics_key or options.api_key)))
    if options.web:
        add_web_routes(app, ready, auth)
    return app


def _auth_dependency(api_key: str | None) -> Callable[[Request], None]:
    expected = api_key.encode() if api_key else None

    def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest runs in time independent of where the strings differ.
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)):
            raise APIError(
                401,
                "Missing or invalid API key; send 'Authorization: Bearer <key>'.",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(_: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), kind),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        err = bad_request(f"Invalid request: {exc.errors()[0].get('msg', 'bad input')}.")
        return JSONResponse(err.body(), status_code=400)

    async def internal_error(_: Request, exc: Exception) -> Response:
        LOG.exception("internal error", exc_info=exc)
        return JSONResponse(error_body("Internal server error.", "server_error"), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


def _add_routes(app: FastAPI, ready: Callable[[], Served], auth: Any) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        served = ready()
        engine = served.engine
        return {"status": "ok", "model": served.model_name, **engine.stats(), "max_concurrency": engine.max_slots,
                "max_queue": engine.max_queue}  # fmt: skip

    @app.get("/v1/models", dependencies=[auth])
    async def list_models() -> dict[str, Any]:
        served = ready()
        return ModelList(data=[ModelCard(id=served.model_name, max_model_len=served.max_len)]).model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=[auth])
    async def get_model(model_id: str) -> dict[str, Any]:
        served = ready()
        served.check_model(model_id)
        return ModelCard(id=served.model_name, max_model_len=served.max_len).model_dump()

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(request: Request) -> Response:
        return await chat_completions(request, ready())

    @app.post("/v1/completions", dependencies=[auth])
    async def complete(request: Request) -> Response:
        return await completions(request, ready())

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(request: Request) -> dict[str, Any]:
        served = ready()
        req = await read_request(request, TokenizeRequest, served.max_body_bytes)
        if req.model is not None:
            served.check_model(req.model)
        ids = await run_in_threadpool(_tokenize, served.tokenizer, req)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.max_len}

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(request: Request) -> dict[str, Any]:
        served = ready()
        req = await read_request(request, DetokenizeRequest, served.max_body_bytes)
        if req.model is not None:
            served.check_model(req.model)
        limit = len(served.tokenizer)
        bad = next((i for i, t in enumerate(req.tokens) if t >= limit), None)
        if bad is not None:
            raise bad_request(f"Token ids must be in [0, {limit}); got {req.tokens[bad]}.", f"tokens[{bad}]")
        return {"prompt": served.tokenizer.decode(req.tokens)}


def _add_ops_routes(app: FastAPI, state: _State, metrics_auth: Any) -> None:
    @app.get("/ready")
    async def ready_probe() -> Response:
        """200 when the model is loaded and the server is not draining (a readiness probe), else 503."""
        if state.served is None or state.lifecycle.draining:
            why = "draining" if state.lifecycle.draining else ("failed" if state.error else "loading")
            return JSONResponse({"status": why}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", dependencies=[metrics_auth])
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=MEDIA_TYPE)


def _tokenize(tokenizer: QWenTokenizer, req: TokenizeRequest) -> list[int]:
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Send exactly one of 'prompt' (text) or 'messages' (a chat).", "prompt")
    if req.prompt is not None:
        return tokenizer.encode(req.prompt, allowed_special="all" if req.allow_special else set())
    tools = tool_specs([t.function for t in req.tools]) if req.tools else None
    return chat_prompt_ids(tokenizer, req.messages or [], tools)
