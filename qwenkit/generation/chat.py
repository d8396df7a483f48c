"""The model card's API: `chat()`, `chat_stream()` and `generate_ids()`, with the official signatures.

`ChatMixin` gives `QWenLMHeadModel` the card's `chat/chat_stream/generate` methods over these functions. Defaults come from the model's
`generation_config.json` (kept as `model.generation_config` by `load`); keyword arguments override them.
Differences from the official code, on purpose: the last token is not dropped when `max_new_tokens` is reached,
extra `stop_words_ids` end the reply without their text, and streaming never re-decodes the whole reply.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..tokenizer.chat_format import DEFAULT_MAX_WINDOW_SIZE, DEFAULT_SYSTEM, History, make_context
from ..tokenizer.chat_format import stop_words_ids as chat_stop_words_ids
from ..tokenizer.tokenization import QWenTokenizer
from ..tokenizer.vocab import official_vocab_file
from .generate import generate, generate_batch, stream
from .prefix import PrefixCache
from .protocol import CausalLM
from .sampling import OFFICIAL_GENERATION_CONFIG, SamplingParams


def resolve_generation_config(model: CausalLM, generation_config: Any = None) -> dict[str, Any]:
    """The generation config to use: the given one (dict or object with `to_dict()`), else the model's."""
    cfg = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if cfg is None:
        return dict(OFFICIAL_GENERATION_CONFIG)  # a model built without load()
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"generation_config must be a dict (or have to_dict()), got {type(cfg).__name__}")
    return dict(cfg)


def prepare_chat(
    model: CausalLM,
    tokenizer: QWenTokenizer,
    query: str,
    history: History | None,
    system: str,
    stop_words_ids: Sequence[Sequence[int]] | None,
    generation_config: Any,
    kwargs: dict[str, Any],
) -> tuple[list[int], SamplingParams]:
    """Prompt ids and sampling params for one chat turn (`kwargs` are the model card's overrides)."""
    cfg = resolve_generation_config(model, generation_config)
    chat_format = cfg.get("chat_format", "chatml")
    max_window_size = kwargs.pop("max_window_size", None) or cfg.get(
        "max_window_size", DEFAULT_MAX_WINDOW_SIZE
    )
    _, context_tokens = make_context(tokenizer, query, history, system, max_window_size, chat_format)
    stop_words = [*(stop_words_ids or []), *chat_stop_words_ids(tokenizer, chat_format)]
    params = _sampling_params(tokenizer, cfg, stop_words, kwargs)
    return context_tokens, params


def _sampling_params(
    tokenizer: QWenTokenizer,
    cfg: Mapping[str, Any],
    stop_words: Sequence[Sequence[int]],
    kwargs: dict[str, Any],
) -> SamplingParams:
    """Params from the generation config and kwargs, plus stop words: single ids end generation on the id;
    longer sequences become stop strings (their text)."""
    ids, strings = [], []
    for word in stop_words:
        word = list(word)
        if not word:
            raise ValueError("stop_words_ids entries must be non-empty lists of token ids")
        if len(word) == 1:
            ids.append(int(word[0]))
        else:
            strings.append(tokenizer.decode(word))
    params = SamplingParams.from_generation_config(cfg, **kwargs)
    return replace(params, stop_token_ids=(*params.stop_token_ids, *ids), stop=(*params.stop, *strings))


def chat_prefix_cache(model: CausalLM, prefix_cache: PrefixCache | bool | None) -> PrefixCache | None:
    """The prefix cache a chat turn uses: the given one; None/True -> the model's own (created on first use,
    kept as `model.chat_prefix_cache`, so consecutive turns of a conversation reuse each other's keys); False
    -> none (every turn prefills its whole prompt)."""
    if isinstance(prefix_cache, PrefixCache):
        return prefix_cache
    if prefix_cache is False:
        return None
    if prefix_cache not in (None, True):
        raise TypeError(f"prefix_cache must be a PrefixCache, True, False or None, got {prefix_cache!r}")
    own = getattr(model, "chat_prefix_cache", None)
    if own is None:
        own = PrefixCache()
        model.chat_prefix_cache = own  # type: ignore[attr-defined]
    return own


def chat(
    model: CausalLM,
    tokenizer: QWenTokenizer,
    query: str,
    history: History | None = None,
    system: str = DEFAULT_SYSTEM,
    stop_words_ids: Sequence[Sequence[int]] | None = None,
    generation_config: Any = None,
    *,
    prefix_cache: PrefixCache | bool | None = None,
    **kwargs: Any,
) -> tuple[str, list[tuple[str, str]]]:
    """One chat turn: `(response, history + [(query, response)])`; the caller's history is not modified.

    kwargs override the generation config: do_sample, temperature, top_p, top_k, repetition_penalty,
    max_new_tokens, max_window_size, seed, stop. The response is stripped of surrounding whitespace, as the
    official `model.chat` does. `prefix_cache`: see `chat_prefix_cache` (reuse is exact: same ids as without).
    """
    history = [tuple(turn) for turn in (history or [])]
    prompt, params = prepare_chat(
        model, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs
    )
    prefix = chat_prefix_cache(model, prefix_cache)
    response = generate(model, tokenizer, prompt, params, errors="replace", prefix=prefix).text.strip()
    return response, [*history, (query, response)]


def chat_stream(
    model: CausalLM,
    tokenizer: QWenTokenizer,
    query: str,
    history: History | None = None,
    system: str = DEFAULT_SYSTEM,
    stop_words_ids: Sequence[Sequence[int]] | None = None,
    generation_config: Any = None,
    *,
    prefix_cache: PrefixCache | bool | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the cumulative response text as it grows (the official `chat_stream` contract), built from
    UTF-8-safe deltas: no broken characters, no special tokens, no re-decoding of the whole reply.
    `prefix_cache`: see `chat_prefix_cache`."""
    prompt, params = prepare_chat(
        model, tokenizer, query, history, system, stop_words_ids, generation_config, kwargs
    )
    text = ""
    prefix = chat_prefix_cache(model, prefix_cache)
    for chunk in stream(
        model, tokenizer, prompt, params, skip_special_tokens=True, errors="ignore", prefix=prefix
    ):
        if chunk.text:
            text += chunk.text
            yield text


def generate_ids(
    model: CausalLM,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    generation_config: Any = None,
    stop_words_ids: Sequence[Sequence[int]] | None = None,
    *,
    tokenizer: QWenTokenizer | None = None,
    **kwargs: Any,
) -> torch.Tensor | list[int] | list[list[int]]:
    """Raw continuation: prompt ids followed by generated ids (stop ids excluded), for one prompt or a batch.

    A tensor `[B, T]` gives a tensor `[B, T + N]` padded with the pad id; a list gives a list (of lists).
    Every Qwen v1 size shares one vocabulary, so without a `tokenizer` the official one is used.
    """
    if tokenizer is None:
        tokenizer = QWenTokenizer(official_vocab_file())
    cfg = resolve_generation_config(model, generation_config)
    kwargs.pop("max_window_size", None)
    params = _sampling_params(tokenizer, cfg, stop_words_ids or [], kwargs)
    is_tensor = isinstance(input_ids, torch.Tensor)
    rows = input_ids.tolist() if is_tensor else list(input_ids)
    single = bool(rows) and isinstance(rows[0], int)
    prompts = [rows] if single else [list(r) for r in rows]
    results = generate_batch(model, tokenizer, prompts, params)
    outputs = [p + r.token_ids for p, r in zip(prompts, results, strict=True)]
    if is_tensor:
        pad = cfg.get("pad_token_id", tokenizer.eod_id)
        width = max(len(o) for o in outputs)
        return torch.tensor([o + [pad] * (width - len(o)) for o in outputs], device=input_ids.device)
    return outputs[0] if single else outputs


class ChatMixin:
    """The model card's `model.chat`, `model.chat_stream` and `model.generate`, with the official signatures.

    `QWenLMHeadModel` inherits these thin methods, so the model layer sits above generation and needs no
    import from a higher layer; the methods only delegate to the functions above.
    """

    def chat(
        self: CausalLM,
        tokenizer: QWenTokenizer,
        query: str,
        history: Sequence[tuple[str, str | None]] | None = None,
        system: str = "You are a helpful assistant.",
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        generation_config: Any = None,
        **kwargs: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        """`(response, history)` for one chat turn; see `qwenkit.generation.chat.chat`."""
        return chat(self, tokenizer, query, history, system, stop_words_ids, generation_config, **kwargs)

    def chat_stream(
        self: CausalLM,
        tokenizer: QWenTokenizer,
        query: str,
        history: Sequence[tuple[str, str | None]] | None = None,
        system: str = "You are a helpful assistant.",
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        generation_config: Any = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """Yield the growing response text; see `qwenkit.generation.chat.chat_stream`."""
        return chat_stream(
            self, tokenizer, query, history, system, stop_words_ids, generation_config, **kwargs
        )

    def generate(
        self: CausalLM,
        input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        generation_config: Any = None,
        stop_words_ids: Sequence[Sequence[int]] | None = None,
        tokenizer: QWenTokenizer | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | list[int] | list[list[int]]:
        """Raw continuation of one prompt or a batch; see `qwenkit.generation.chat.generate_ids`."""
        return generate_ids(self, input_ids, generation_config, stop_words_ids, tokenizer=tokenizer, **kwargs)
