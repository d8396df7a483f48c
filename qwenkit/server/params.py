"""One function from an API request to SamplingParams (one per choice), and the refusals of what we do not do.

Defaults: a field the request leaves out takes the model's generation_config (Qwen-*-Chat: top_p 0.8,
repetition_penalty 1.1, max_new_tokens 512, sampling on), not OpenAI's defaults; `temperature` 0 means greedy.
`max_tokens` is clamped to the context left after the prompt (the choice then ends with "length"); a prompt that
leaves no room is a 400 `context_length_exceeded`. Seeds: choice i uses `seed + i` (mod 2**64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..generation.sampling import SamplingParams
from .errors import APIError, bad_request
from .protocol import ChatCompletionRequest, CompletionRequest

Request = ChatCompletionRequest | CompletionRequest


def refuse_unsupported(req: Request) -> None:
    """400 for options whose non-default values this server cannot honour (instead of silently ignoring them)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0):
            raise bad_request(
                f"'{name}' is not supported by this server (only 0); use 'repetition_penalty' (a qwenkit "
                "extra, > 0, 1 = off, the model's default is 1.1) instead.",
                param=name,
                code="unsupported_parameter",
            )
    if req.logit_bias:
        raise bad_request(
            "'logit_bias' is not supported; leave it out.", "logit_bias", "unsupported_parameter"
        )
    if req.logprobs:
        raise bad_request("'logprobs' is not supported; leave it out.", "logprobs", "unsupported_parameter")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs:
            raise bad_request("'top_logprobs' is not supported.", "top_logprobs", "unsupported_parameter")
        if req.response_format is not None and req.response_format.type != "text":
            raise bad_request(
                "Only response_format {'type': 'text'} is supported.",
                "response_format",
                "unsupported_parameter",
            )
    else:
        if req.echo:
            raise bad_request("'echo' is not supported; leave it out.", "echo", "unsupported_parameter")
        if req.suffix:
            raise bad_request("'suffix' is not supported; leave it out.", "suffix", "unsupported_parameter")
        if req.best_of not in (None, req.n):
            raise bad_request(
                "'best_of' must equal 'n' (or be left out).", "best_of", "unsupported_parameter"
            )


def context_error(prompt_len: int, max_len: int, param: str) -> APIError:
    return bad_request(
        f"This model's maximum context length is {max_len} tokens, and your prompt has {prompt_len} tokens, "
        "which leaves no room for a reply. Shorten the messages or the prompt.",
        param=param,
        code="context_length_exceeded",
    )


def sampling_params(
    req: Request,
    generation_config: Mapping[str, Any],
    *,
    prompt_len: int,
    max_len: int,
    stop_token_ids: Sequence[int],
    extra_stop: Sequence[str] = (),
) -> list[SamplingParams]:
    """SamplingParams for each of the request's `n` choices (or a 400 APIError)."""
    room = max_len - prompt_len
    if room < 1:
        raise context_error(
            prompt_len, max_len, "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        )
    requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    overrides: dict[str, Any] = {
        "temperature": req.temperature,
        "do_sample": None if req.temperature is None else req.temperature > 0,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "repetition_penalty": req.repetition_penalty,
        "max_new_tokens": min(requested or generation_config.get("max_new_tokens") or 512, room),
        "stop": (*stop, *extra_stop),
        "stop_token_ids": tuple(stop_token_ids),
    }
    try:
        base = SamplingParams.from_generation_config(generation_config, **overrides)
    except ValueError as exc:  # only a broken generation_config.json gets here; the request was validated
        raise APIError(
            500, f"The server's generation config is invalid: {exc}", type="server_error"
        ) from None
    if req.seed is None:
        return [base] * req.n
    return [replace(base, seed=(req.seed + i) % 2**64) for i in range(req.n)]
