"""Generation in three layers: a batched token generator, a stream of chunks, and whole results.

`TokenGenerator` prefills right-padded prompts into a static KV cache and then decodes one token per row per step
(one batched forward), with the dynamic-NTK alpha fixed at each row's prompt length. `stream()` turns one row's
tokens into text deltas (UTF-8 safe, stop strings held back and never released); `generate()` and
`generate_batch()` return whole results. Prompt layout is chat_format's job; the HTTP engine builds on these.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..tokenizer.tokenization import QWenTokenizer, StreamDecoder
from .prefix import PrefixCache
from .protocol import CausalLM
from .sampling import SamplingParams, build_seen_mask, make_generator, sample, update_seen_mask
from .stopping import StopStringMatcher

FinishReason = Literal["stop", "length"]

# Dynamic NTK + logn keep Qwen v1 usable up to this many positions (the official logn table's size).
MAX_CONTEXT = 32768
# Long prompts are prefilled in chunks so attention scores stay small ([H, chunk, keys] per row).
PREFILL_CHUNK = 1024
# A batch prefills the prefix all its prompts share once when it is at least this long (below, the extra
# forward and the copies cost more than they save).
MIN_SHARED_PREFIX = 16


@dataclass
class Chunk:
    """One step of a stream: the sampled token, the text it released, and on the last chunk why it ended."""

    token_id: int | None  # None on a final chunk that only flushes held-back text
    text: str
    finish_reason: FinishReason | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids, stop token excluded
    finish_reason: FinishReason
    prompt_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    timings: list[float] = field(default_factory=list, repr=False)  # seconds per generated token

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class CacheReuse:
    """One KV cache for a run of generations (the batches of an eval): each takes it when it has enough rows
    and positions (else a new one replaces it). A fresh cache per batch pays its page faults every batch: the
    2 x 450 MB fp32 cache of 16 MMLU prompts took 2.7 s to allocate on the Intel Xeon VM, 7% of the batch.
    Not cleared between generations, as a server's slots are not: see `KVCache.reset`."""

    def __init__(self) -> None:
        self.cache: Any = None
        self._kind: object = None  # the model and its default cache kind the cache was made for

    def take(self, model: CausalLM, rows: int, positions: int) -> Any:
        kind = (id(model), getattr(model, "kv_cache_dtype", None))
        cache = self.cache
        fits = cache is not None and cache.max_batch_size >= rows and cache.max_seq_len >= positions
        if not fits or kind != self._kind:
            self.cache = None  # freed before its successor is allocated
            self.cache = cache = model.new_cache(rows, positions)
            self._kind = kind
        return cache if cache.max_batch_size == rows else cache.rows(0, rows)


class TokenGenerator:
    """Prefill a batch of prompts, then decode one token per unfinished row per `step()`.

    Rows finish on a stop token id, at `max_new_tokens`, at the context limit, or when the caller calls
    `finish(row)` (e.g. a stop string matched). Finished rows stay in the batch with their position frozen, so
    their cache slots are rewritten harmlessly and the shapes stay fixed. With a `prefix` cache (one prompt
    only), the prompt's longest prefix already in it is not prefilled again, and what this generation writes is
    recorded there for the next one; `close()` (called when done) hands the prefix cache back.
    """

    def __init__(
        self,
        model: CausalLM,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        *,
        valid_vocab_size: int,
        max_context: int = MAX_CONTEXT,
        prefix: PrefixCache | None = None,
        reuse: CacheReuse | None = None,
    ) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(self.params) != len(prompts):
            raise ValueError(f"got {len(self.params)} SamplingParams for {len(prompts)} prompts")
        lengths = [len(p) for p in prompts]
        if max(lengths) >= max_context:
            raise ValueError(
                f"prompt of {max(lengths)} tokens leaves no room in the {max_context}-token context; "
                "shorten the prompt (or history)"
            )
        self.model = model
        self.valid_vocab_size = valid_vocab_size
        self.device = model.device
        self.prompt_lengths = lengths
        # Each row may run to its own prompt + max_new_tokens, capped by the context.
        self.limits = [
            min(n + p.max_new_tokens, max_context) for n, p in zip(lengths, self.params, strict=True)
        ]
        alphas = [model.ntk_alpha(n) for n in lengths]
        self.alpha = torch.tensor(alphas, device=self.device)
        if prefix is not None and len(prompts) != 1:
            raise ValueError(f"a prefix cache serves one prompt at a time, got {len(prompts)} prompts")
        self.prefix = prefix if prefix is not None and prefix.acquire() else None  # busy: do without
        self.reused = 0  # leading prompt positions taken from the prefix cache
        self.shared = 0  # leading positions all rows share, prefilled once (set by the prefill)
        if self.prefix is not None:
            self.cache, self.reused = self.prefix.take(model, prompts[0], alphas[0], max(self.limits))
        elif reuse is not None:
            self.cache = reuse.take(model, len(prompts), max(self.limits))
        else:
            self.cache = model.new_cache(len(prompts), max(self.limits))
        self.prompts = [list(p) for p in prompts]
        self.generators = [
            make_generator(p.seed, self.device) if p.seed is not None and not p.greedy else None
            for p in self.params
        ]
        self.stop_ids = [set(p.stop_token_ids) for p in self.params]
        self.finish_reasons: list[FinishReason | None] = [None] * len(prompts)
        self.next_pos = list(lengths)  # per row: where the next fed token is written
        self.last_tokens: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        if any(p.repetition_penalty != 1.0 for p in self.params):
            padded = _right_pad(self.prompts, -1).to(self.device)
            self.seen = build_seen_mask(padded, model.config.vocab_size, pad_id=-1)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def finish(self, row: int, reason: FinishReason = "stop") -> None:
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason
        if self.done:
            self.close()

    def close(self) -> None:
        """Hand the prefix cache back (its kept ids stay valid); safe to call twice."""
        if self.prefix is not None:
            self.prefix.release()
            self.prefix = None

    @torch.inference_mode()
    def step(self) -> list[int | None]:
        """Sample the next token of every unfinished row; None for rows already finished or stopping now.

        A row that samples one of its stop ids gets None and finish reason "stop" (the stop id is not output).
        """
        if self.done:
            raise RuntimeError("generation is finished; check `done` before calling step()")
        logits = self._prefill() if self.last_tokens is None else self._decode()
        tokens = sample(
            logits, self.params, self.generators, seen_mask=self.seen, valid_vocab_size=self.valid_vocab_size
        )
        out: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            if self.finish_reasons[row] is not None:
                out.append(None)
            elif token in self.stop_ids[row]:
                self.finish_reasons[row] = "stop"
                out.append(None)
            else:
                out.append(token)
                # This token goes to position next_pos; the row may hold positions up to limit - 1.
                if self.next_pos[row] + 1 >= self.limits[row]:
                    self.finish_reasons[row] = "length"
        if self.seen is not None:
            update_seen_mask(self.seen, tokens)
        self.last_tokens = tokens
        if self.done:
            self.close()
        return out

    def _prefill(self) -> torch.Tensor:
        bsz, longest = len(self.prompts), max(self.prompt_lengths)
        ids = _right_pad(self.prompts, 0).to(self.device)
        self.shared = self._prefill_shared_prefix(ids)
        last = torch.tensor(self.prompt_lengths, device=self.device) - 1  # [B] index of each row's last token
        logits = torch.empty((bsz, self.model.config.vocab_size), device=self.device)
        for start in range(max(self.reused, self.shared), longest, PREFILL_CHUNK):
            chunk = ids[:, start : start + PREFILL_CHUNK]
            positions = torch.arange(start, start + chunk.shape[1], device=self.device).expand(bsz, -1)
            index = (last - start).clamp(0, chunk.shape[1] - 1)
            # The linear layers skip each row's padding (eval batches: 101-140-token prompts, ~35% padding).
            real = (last + 1 - start).clamp(0, chunk.shape[1]) if bsz > 1 else None
            out = self.model(chunk, positions, self.cache, self.alpha, output_index=index, input_lengths=real)
            in_chunk = (last >= start) & (last < start + chunk.shape[1])
            logits[in_chunk] = out[in_chunk]
        if self.prefix is not None:
            self.prefix.record(self.prompts[0][self.reused :])
        return logits

    def _prefill_shared_prefix(self, ids: torch.Tensor) -> int:
        """Prefill the leading tokens all rows share (a system prompt, an eval template) once, in row 0, and copy
        its keys/values to the other rows; return how many positions that covers (0: not worth it). Exact: those
        positions hold the same tokens under the same NTK alpha in every row. Each row keeps at least its last
        token for the batched prefill, which gives its logits."""
        if len(self.prompts) < 2 or self.reused or bool((self.alpha != self.alpha[0]).any()):
            return 0
        shared = min(self.prompt_lengths) - 1
        differs = (ids[:, :shared] != ids[:1, :shared]).any(0).nonzero()
        if len(differs):
            shared = int(differs[0])
        if shared < MIN_SHARED_PREFIX:
            return 0
        row0 = self.cache.rows(0, 1)
        for start in range(0, shared, PREFILL_CHUNK):
            chunk = ids[:1, start : min(shared, start + PREFILL_CHUNK)]
            positions = torch.arange(start, start + chunk.shape[1], device=self.device)[None]
            end = torch.tensor([chunk.shape[1] - 1], device=self.device)
            self.model(chunk, positions, row0, self.alpha[:1], output_index=end)  # only the cache is wanted
        block = self.cache.read(0, 0, shared)
        for row in range(1, len(self.prompts)):
            self.cache.write(row, 0, block)
        return shared

    def _decode(self) -> torch.Tensor:
        assert self.last_tokens is not None
        running = [r is None for r in self.finish_reasons]
        # Finished rows are fed at position 0: their cache row is dead, and their logits are ignored.
        feed = [pos if run else 0 for pos, run in zip(self.next_pos, running, strict=True)]
        positions = torch.tensor(feed, device=self.device)[:, None]
        logits = self.model(self.last_tokens[:, None], positions, self.cache, self.alpha)[:, 0]  # [B, V]
        self.next_pos = [pos + run for pos, run in zip(self.next_pos, running, strict=True)]
        if self.prefix is not None:  # one row, running (a finished single row is never decoded)
            self.prefix.record([int(self.last_tokens[0])])
        return logits


def _right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """LongTensor [B, longest] holding each row at its start, `value` after it."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


class RowText:
    """Text of one row: ids -> UTF-8-safe deltas -> stop-string hold-back."""

    def __init__(
        self, tokenizer: QWenTokenizer, stops: Sequence[str], skip_special: bool, errors: str | None
    ):
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special, errors=errors)
        self.matcher = StopStringMatcher(stops)

    def push(self, token: int) -> tuple[str, bool]:
        return self.matcher.push(self.decoder.push(token))

    def close(self) -> str:
        text, stopped = self.matcher.push(self.decoder.flush())
        return text if stopped else text + self.matcher.flush()


def stream(
    model: CausalLM,
    tokenizer: QWenTokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    skip_special_tokens: bool = False,
    errors: str | None = None,
    prefix: PrefixCache | None = None,
) -> Iterator[Chunk]:
    """Generate from one prompt as a stream of chunks; the last chunk carries the finish reason.

    Stop strings (`params.stop`) never appear: text that may still become one is held back until the match
    fails. Stop token ids end generation and are not part of the output. With a `prefix` cache, the prompt's
    prefix already computed there is reused (see `PrefixCache`).
    """
    gen = TokenGenerator(model, [prompt_ids], params, valid_vocab_size=len(tokenizer), prefix=prefix)
    try:
        yield from _stream_rows(gen, RowText(tokenizer, params.stop, skip_special_tokens, errors))
    finally:  # also when the consumer stops early or Ctrl-C lands mid-step
        gen.close()


def _stream_rows(gen: TokenGenerator, row: RowText) -> Iterator[Chunk]:
    """The chunks of row 0 of `gen`: released text per token, the finish reason on the last chunk."""
    while not gen.done:
        token = gen.step()[0]
        if token is None:
            break
        text, stopped = row.push(token)
        if stopped:
            gen.finish(0, "stop")
            yield Chunk(token, text, "stop")
            return
        if gen.done:
            yield Chunk(token, text + row.close(), gen.finish_reasons[0])
            return
        yield Chunk(token, text)
    yield Chunk(None, row.close(), gen.finish_reasons[0])


def generate(
    model: CausalLM,
    tokenizer: QWenTokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    **kwargs: bool | str | PrefixCache | None,
) -> GenerationResult:
    """Generate from one prompt and return the whole result (text, ids, finish reason, timings)."""
    start = last = time.perf_counter()
    texts, ids, timings = [], [], []
    finish: FinishReason = "length"
    for chunk in stream(model, tokenizer, prompt_ids, params, **kwargs):
        now = time.perf_counter()
        texts.append(chunk.text)
        if chunk.token_id is not None:
            ids.append(chunk.token_id)
            timings.append(now - last)
        last = now
        if chunk.finish_reason is not None:
            finish = chunk.finish_reason
    prefill = timings[0] if timings else time.perf_counter() - start
    return GenerationResult("".join(texts), ids, finish, len(prompt_ids), prefill, sum(timings[1:]), timings)


def generate_batch(
    model: CausalLM,
    tokenizer: QWenTokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    skip_special_tokens: bool = False,
    errors: str | None = None,
    reuse: CacheReuse | None = None,
) -> list[GenerationResult]:
    """Generate from several prompts together: one batched forward per step for all unfinished rows.

    With greedy sampling each row equals the same prompt generated alone. `reuse`: take the KV cache from there
    (successive batches share one allocation).
    """
    gen = TokenGenerator(model, prompts, params, valid_vocab_size=len(tokenizer), reuse=reuse)
    rows = [RowText(tokenizer, p.stop, skip_special_tokens, errors) for p in gen.params]
    texts: list[list[str]] = [[] for _ in prompts]
    ids: list[list[int]] = [[] for _ in prompts]
    closed = [False] * len(prompts)
    start = time.perf_counter()
    prefill = 0.0
    while not gen.done:
        for i, token in enumerate(gen.step()):
            if token is None:
                continue
            ids[i].append(token)
            text, stopped = rows[i].push(token)
            texts[i].append(text)
            if stopped:
                gen.finish(i, "stop")
                closed[i] = True
        prefill = prefill or time.perf_counter() - start
    for i, row in enumerate(rows):
        if not closed[i]:
            texts[i].append(row.close())
    total = time.perf_counter() - start
    return [
        GenerationResult("".join(t), i, r or "length", len(p), prefill, total - prefill)
        for t, i, r, p in zip(texts, ids, gen.finish_reasons, prompts, strict=True)
    ]
