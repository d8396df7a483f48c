"""The two generation routes: `/v1/chat/completions` and `/v1/completions`, whole or streamed (SSE).

Every check that can fail (body, schema, model name, tools, context length, queue) runs before the first byte,
so a stream never starts with an error. Streamed and whole answers are built from the same events through the
same parsers, so at temperature 0 their texts agree. A client that goes away cancels its sequences: streams
through the response's disconnect handling, whole answers through a watcher on the connection. A request cut
short (--request-timeout, a drain's end, a stream left unread past --stream-idle-timeout) ends cleanly: a stream
with a last event holding `finish_reason: "abort"` and an `error` object, then `[DONE]`; a whole answer with an error.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..generation.sampling import SamplingParams
from . import react, sse
from .chat_prompt import chat_prompt_ids
from .engine import SHUTTING_DOWN, EngineClosedError, Event, QueueFullError, RequestHandle
from .errors import APIError, bad_request, read_request
from .logs import LOG, escape
from .params import context_error, refuse_unsupported, sampling_params
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaToolCall,
    FunctionCallOut,
    FunctionDef,
    ToolCallOut,
    Usage,
)
from .served import Served


@dataclass
class _Choice:
    """One choice being assembled from engine events through its parser (plain text or ReAct)."""

    index: int
    parser: react.PlainParser | react.ReactParser
    parts: list[str] = field(default_factory=list)
    call: react.ParsedCall | None = None
    finish_reason: str | None = None
    tokens: int = 0

    def feed(self, event: Event) -> str:
        """Consume an event; return the content it releases (the call, if any, lands in `self.call`)."""
        if event.code == SHUTTING_DOWN:
            raise APIError(
                503,
                f"The request was cut: {event.error}; retry on another instance or after it restarts.",
                type="service_unavailable",
                code=SHUTTING_DOWN,
                headers={"Retry-After": "5"},
            )
        if event.error is not None:
            raise APIError(500, f"Generation failed: {event.error}", type="server_error", code=event.code)
        self.tokens = event.completion_tokens
        text = self.parser.push(event.text)
        if event.finish_reason is not None:
            tail, self.call = self.parser.finish(event.finish_reason)
            text += tail
            self.finish_reason = "tool_calls" if self.call else event.finish_reason
        self.parts.append(text)
        return text


def _usage(prompt_tokens: int, choices: Sequence[_Choice]) -> Usage:
    completion = sum(c.tokens for c in choices)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
    )


def _submit(
    served: Served, items: list[tuple[list[int], SamplingParams]], prompt_tokens: int
) -> RequestHandle:
    capacity = served.engine.max_slots + served.engine.max_queue
    if len(items) > capacity:
        raise bad_request(
            f"This request needs {len(items)} sequences; this server runs at most {capacity}.", "n"
        )
    try:
        handle = served.engine.submit(items, asyncio.get_running_loop())
    except EngineClosedError:
        raise APIError(
            503,
            "The server is shutting down; retry on another instance or after it restarts.",
            type="service_unavailable",
            code=SHUTTING_DOWN,
            headers={"Retry-After": "5"},
        ) from None
    except QueueFullError:
        raise APIError(
            429,
            "The server is at capacity (all slots busy and the queue full); retry after a short wait.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        ) from None
    if served.metrics is not None:
        served.metrics.prompt_tokens.inc(prompt_tokens)
    return handle


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _finished(request: Request, handle: RequestHandle, work: Awaitable[None]) -> bool:
    """Run `work`: True when it completed; False when the client went away first (the request is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # re-raises a generation error as its APIError
            return True
        return False
    finally:
        handle.cancel()  # a no-op for sequences that have ended
        for t in (task, watcher):
            t.cancel()


async def _events(served: Served, handle: RequestHandle, deadline: float | None) -> AsyncIterator[Event]:
    """The request's events; past `deadline` an APIError (504, counted). Cut requests are counted here too."""
    try:
        async for event in handle.events(deadline):
            if event.code == SHUTTING_DOWN:
                served.aborted("shutdown")
            yield event
    except asyncio.TimeoutError:
        handle.cancel()
        raise served.timed_out() from None


async def _collect(
    served: Served, handle: RequestHandle, choices: Sequence[_Choice], deadline: float | None
) -> None:
    """Feed every event to its choice; raise the request's APIError when it fails, is cut or times out."""
    async for event in _events(served, handle, deadline):
        choices[event.index].feed(event)


def _stream_response(served: Served, handle: RequestHandle, body: AsyncIterator[bytes]) -> Response:
    def on_idle() -> None:
        handle.cancel()
        served.aborted("stream_idle_timeout")

    return sse.event_stream(body, served.stream_idle_timeout, on_idle)


def tool_specs(defs: Sequence[FunctionDef]) -> list[react.ToolSpec]:
    return [react.ToolSpec(d.name, d.description or "", d.parameters) for d in defs]


def _offered_tools(req: ChatCompletionRequest) -> list[react.ToolSpec] | None:
    """The tools the model may call (None: no tool use), after tool_choice / function_call."""
    if req.tools and req.functions:
        raise bad_request("Send either 'tools' or the legacy 'functions', not both.", "functions")
    defs = [t.function for t in req.tools] if req.tools else list(req.functions or [])
    choice = req.tool_choice if req.tools or req.tool_choice is not None else req.function_call
    param = "tool_choice" if req.tools or req.tool_choice is not None else "function_call"
    if not defs:
        if choice not in (None, "none", "auto"):
            raise bad_request(f"'{param}' names a function but no tools were given.", param)
        return None
    if choice == "none":
        return None
    specs = tool_specs(defs)
    if choice is None or isinstance(
        choice, str
    ):  # "auto"; "required" cannot be enforced with ReAct prompting
        return specs
    name = choice.function.name if hasattr(choice, "function") else choice.name
    chosen = [s for s in specs if s.name == name]
    if not chosen:
        raise bad_request(f"'{param}' names '{name}', which is not among the given tools.", param)
    return chosen


def _log_request(served: Served, rid: str, prompts: Sequence[list[int]], n: int, stream: bool) -> None:
    LOG.info("%s: %s prompt tokens, n=%d, stream=%s", rid, "+".join(str(len(p)) for p in prompts), n, stream)
    if served.log_prompts:
        for p in prompts:
            LOG.info("%s prompt: %s", rid, escape(served.tokenizer.decode(p)))


# ---- chat -------------------------------------------------------------------------------------------------------


async def chat_completions(request: Request, served: Served) -> Response:
    deadline = served.deadline(time.monotonic())
    req = await read_request(request, ChatCompletionRequest, served.max_body_bytes)
    served.check_model(req.model)
    refuse_unsupported(req)
    tools = _offered_tools(req)
    prompt = await run_in_threadpool(chat_prompt_ids, served.tokenizer, req.messages, tools)
    params = sampling_params(
        req,
        served.generation_config,
        prompt_len=len(prompt),
        max_len=served.max_len,
        stop_token_ids=served.stop_token_ids,
        extra_stop=(react.OBSERVATION,) if tools else (),
    )
    handle = _submit(served, [(prompt, p) for p in params], len(prompt))
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    _log_request(served, rid, [prompt], req.n, req.stream)
    names = [t.name for t in tools or []]
    choices = [_Choice(i, react.ReactParser(names) if tools else react.PlainParser()) for i in range(req.n)]
    legacy = bool(req.functions)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _chat_stream(served, rid, handle, choices, len(prompt), legacy, include_usage, deadline)
        return _stream_response(served, handle, body)
    if not await _finished(request, handle, _collect(served, handle, choices, deadline)):
        return Response(status_code=499)  # nobody is listening
    out = [
        ChatChoice(index=c.index, message=_message(c, legacy), finish_reason=c.finish_reason) for c in choices
    ]
    response = ChatCompletionResponse(
        id=rid, model=served.model_name, choices=out, usage=_usage(len(prompt), choices)
    )
    return JSONResponse(response.model_dump(mode="json"))


def _call_out(call: react.ParsedCall) -> FunctionCallOut:
    return FunctionCallOut(name=call.name, arguments=call.arguments)


def _message(choice: _Choice, legacy: bool) -> AssistantMessage:
    text = "".join(choice.parts)
    if choice.call is None:
        return AssistantMessage(content=text)
    return AssistantMessage(
        content=text or None,
        tool_calls=[ToolCallOut(id=choice.call.id, function=_call_out(choice.call))],
        function_call=_call_out(choice.call) if legacy else None,
    )


async def _chat_stream(
    served: Served,
    rid: str,
    handle: RequestHandle,
    choices: list[_Choice],
    prompt_tokens: int,
    legacy: bool,
    include_usage: bool,
    deadline: float | None,
) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(index: int, delta: ChatDelta, finish: str | None = None) -> bytes:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish)
        return sse.event(
            ChatCompletionChunk(id=rid, created=created, model=served.model_name, choices=[choice])
        )

    error: APIError | None = None
    try:
        for c in choices:
            yield chunk(c.index, ChatDelta(role="assistant", content=""))
        try:
            async for event in _events(served, handle, deadline):
                c = choices[event.index]
                text = c.feed(event)
                if text:
                    yield chunk(c.index, ChatDelta(content=text))
                if c.call is not None:
                    call = DeltaToolCall(index=0, id=c.call.id, function=_call_out(c.call))
                    yield chunk(
                        c.index, ChatDelta(tool_calls=[call], function_call=call.function if legacy else None)
                    )
                if c.finish_reason is not None:
                    yield chunk(c.index, ChatDelta(), c.finish_reason)
        except APIError as exc:
            error = exc
        if error is not None:
            base = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": served.model_name,
            }
            cut = [{"index": c.index, "delta": {}} for c in choices if c.finish_reason is None]
            yield sse.abort_event(base, cut, error)
        elif include_usage:
            usage = _usage(prompt_tokens, choices)
            yield sse.event(
                ChatCompletionChunk(id=rid, created=created, model=served.model_name, choices=[], usage=usage)
            )
        yield b"data: [DONE]\n\n"
    finally:
        handle.cancel()


# ---- completions ------------------------------------------------------------------------------------------------


async def completions(request: Request, served: Served) -> Response:
    deadline = served.deadline(time.monotonic())
    req = await read_request(request, CompletionRequest, served.max_body_bytes)
    served.check_model(req.model)
    refuse_unsupported(req)
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    prompts = await run_in_threadpool(
        lambda: [served.tokenizer.encode(t, allowed_special=set()) for t in texts]
    )
    items: list[tuple[list[int], SamplingParams]] = []
    for k, prompt in enumerate(prompts):
        if not prompt:
            raise bad_request("The prompt is empty; send at least one character.", "prompt")
        if len(prompt) >= served.max_len:
            raise context_error(
                len(prompt), served.max_len, "prompt" if len(prompts) == 1 else f"prompt[{k}]"
            )
        params = sampling_params(
            req,
            served.generation_config,
            prompt_len=len(prompt),
            max_len=served.max_len,
            stop_token_ids=served.stop_token_ids,
        )
        items += [(prompt, p) for p in params]
    prompt_tokens = sum(len(p) for p in prompts)
    handle = _submit(served, items, prompt_tokens)
    rid = f"cmpl-{uuid.uuid4().hex}"
    _log_request(served, rid, prompts, req.n, req.stream)
    choices = [_Choice(i, react.PlainParser()) for i in range(len(items))]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _completion_stream(served, rid, handle, choices, prompt_tokens, include_usage, deadline)
        return _stream_response(served, handle, body)
    if not await _finished(request, handle, _collect(served, handle, choices, deadline)):
        return Response(status_code=499)  # nobody is listening
    out = [
        CompletionChoice(text="".join(c.parts), index=c.index, finish_reason=c.finish_reason) for c in choices
    ]
    usage = _usage(prompt_tokens, choices)
    response = CompletionResponse(
        id=rid, created=int(time.time()), model=served.model_name, choices=out, usage=usage
    )
    return JSONResponse(response.model_dump(mode="json"))


async def _completion_stream(
    served: Served,
    rid: str,
    handle: RequestHandle,
    choices: list[_Choice],
    prompt_tokens: int,
    include_usage: bool,
    deadline: float | None,
) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(choice_list: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse.event(
            CompletionResponse(
                id=rid, created=created, model=served.model_name, choices=choice_list, usage=usage
            )
        )

    error: APIError | None = None
    try:
        try:
            async for event in _events(served, handle, deadline):
                c = choices[event.index]
                text = c.feed(event)
                if text or c.finish_reason is not None:
                    yield chunk([CompletionChoice(text=text, index=c.index, finish_reason=c.finish_reason)])
        except APIError as exc:
            error = exc
        if error is not None:
            base = {"id": rid, "object": "text_completion", "created": created, "model": served.model_name}
            cut = [{"text": "", "index": c.index} for c in choices if c.finish_reason is None]
            yield sse.abort_event(base, cut, error)
        elif include_usage:
            yield chunk([], _usage(prompt_tokens, choices))
        yield b"data: [DONE]\n\n"
    finally:
        handle.cancel()
