"""Continuous batching: one worker thread owns the model; requests join and leave the running batch at any step.

Each request brings one or more sequences (OpenAI's `n`). A sequence waits in a FIFO queue until a cache slot is
free, is prefilled into its slot one chunk per iteration (interleaved with decode steps, so running streams keep
flowing while a long prompt is read), then joins one batched decode step per iteration over rows
0..highest busy slot; other rows get a dummy token at a harmless position. Every sequence has its own sampling
params, generator, seen-mask row, UTF-8-safe decoder and stop-string matcher. Events reach the asyncio side
through `loop.call_soon_threadsafe`; cancellation flags are read every iteration. With a `PrefixStore`, a
prompt's leading blocks already computed (by any request) are copied into the slot instead of prefilled, and
every computed prompt (and, at the end, prompt + answer) is offered back to the store. `abort_all()` ends every
sequence with an error event (the end of a drain); an optional `ServerMetrics` hears of every token. The engine
knows nothing of HTTP, prompts or tools.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from ..generation.generate import PREFILL_CHUNK, RowText
from ..generation.sampling import SamplingParams, make_generator, sample
from ..tokenizer.tokenization import QWenTokenizer
from .backend import Backend
from .metrics import ServerMetrics
from .prefix_cache import PrefixStore

LOG = logging.getLogger("qwenkit.server")


@dataclass(frozen=True)
class Event:
    """News about one sequence: released text, tokens so far, and on its last event why it ended."""

    index: int  # which sequence (choice) of the request
    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" on the last event
    error: str | None = None  # set on the last event when generation failed or was aborted
    code: str | None = None  # with `error`: GENERATION_FAILED, SHUTTING_DOWN or the code given to abort_all()


GENERATION_FAILED = "generation_failed"
SHUTTING_DOWN = "server_shutting_down"


class QueueFullError(Exception):
    """The engine holds max_slots + max_queue sequences already; try again later."""


class EngineClosedError(Exception):
    """The engine takes no new requests (the server is shutting down)."""


class RequestHandle:
    """The asyncio side of a submitted request: iterate `events()`; `cancel()` frees its slots."""

    def __init__(self, n: int, loop: asyncio.AbstractEventLoop, wake: threading.Condition) -> None:
        self.n = n
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = False
        self._wake = wake

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop generating; the worker drops the sequences within one iteration. Safe to call twice."""
        if not self._cancelled:
            self._cancelled = True
            with self._wake:
                self._wake.notify()

    def deliver(self, event: Event) -> None:
        """Called by the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled = True

    async def events(self, deadline: float | None = None) -> AsyncIterator[Event]:
        """All events of all sequences, in order, until each sequence has ended.

        Raises asyncio.TimeoutError once `deadline` (a `time.monotonic()` value) passes first.
        """
        remaining = self.n
        while remaining:
            if deadline is None:
                event = await self._queue.get()
            elif not self._queue.empty():
                event = self._queue.get_nowait()
            else:
                event = await asyncio.wait_for(self._queue.get(), max(deadline - time.monotonic(), 0.0))
            if event.finish_reason is not None or event.error is not None:
                remaining -= 1
            yield event


@dataclass(eq=False)
class _Sequence:
    handle: RequestHandle
    index: int
    prompt: list[int]
    params: SamplingParams
    text: RowText
    slot: int = -1
    order: int = 0  # admission number: prefill goes first come, first served
    prefilled: int = 0  # prompt tokens already in the cache
    alpha: float = 1.0
    generator: torch.Generator | None = None
    last_token: int = -1  # sampled, not yet fed; written at position next_pos
    next_pos: int = 0
    generated: int = 0
    reused: int = 0  # prompt tokens copied from the prefix store instead of prefilled
    fed: list[int] | None = None  # generated tokens fed back (their keys follow the prompt's in the slot)
    submitted: float = 0.0  # time.monotonic() at submit
    last_token_at: float = 0.0

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)


class Engine:
    """The batching engine over a `Backend`; `start()` the worker, `submit()` from the event loop."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: QWenTokenizer,
        *,
        max_queue: int,
        prefix_store: PrefixStore | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.backend = backend
        # Shared prefix cache (default: the backend's own, if any); the backend must offer read_kv/write_kv.
        self.prefix_store = (
            prefix_store if prefix_store is not None else getattr(backend, "prefix_store", None)
        )
        self.tokenizer = tokenizer
        self.max_slots = backend.max_slots
        self.max_queue = max_queue
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: collections.deque[_Sequence] = collections.deque()  # guarded by _cond
        self._running = 0  # sequences in slots; guarded by _cond
        self._slots: list[_Sequence | None] = [None] * self.max_slots  # worker thread only
        self._seen = torch.zeros(self.max_slots, backend.vocab_size, dtype=torch.bool, device=backend.device)
        self._admitted = 0  # worker thread only
        self._stopping = False
        self._closed = False  # guarded by _cond: submit() refuses
        self._abort: tuple[str, str] | None = None  # guarded by _cond: (message, code) for every sequence
        self._thread = threading.Thread(target=self._run, name="qwenkit-engine", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def abort_all(self, message: str, code: str = SHUTTING_DOWN) -> None:
        """End every queued and running sequence with an error event (`message`, `code`) within one iteration,
        and refuse later submits (EngineClosedError)."""
        with self._cond:
            self._closed = True
            self._abort = (message, code)
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        """Sequences running and waiting; with a prefix store also its `prefix_cache_*` counters."""
        with self._cond:
            out = {"running": self._running, "waiting": len(self._pending)}
        if self.prefix_store is not None:
            out.update(self.prefix_store.stats())
        return out

    def submit(
        self, items: Sequence[tuple[Sequence[int], SamplingParams]], loop: asyncio.AbstractEventLoop
    ) -> RequestHandle:
        """Queue one sequence per (prompt ids, params) item, all or none; event `index` = item position.

        Raises QueueFullError when running + waiting sequences would pass max_slots + max_queue, and
        EngineClosedError after abort_all().
        """
        for prompt, _ in items:
            if not prompt or len(prompt) >= self.backend.max_len:
                raise ValueError(f"prompts must have 1..{self.backend.max_len - 1} tokens, got {len(prompt)}")
        handle = RequestHandle(len(items), loop, self._cond)
        now = time.monotonic()
        seqs = [
            _Sequence(
                handle, i, list(prompt), p, RowText(self.tokenizer, p.stop, True, "replace"), submitted=now
            )
            for i, (prompt, p) in enumerate(items)
        ]
        with self._cond:
            if self._closed:
                raise EngineClosedError
            if self._running + len(self._pending) + len(seqs) > self.max_slots + self.max_queue:
                raise QueueFullError
            self._pending.extend(seqs)
            self._cond.notify()
        return handle

    # ---- worker ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled()
                while not self._stopping and not self._pending and not any(self._slots):
                    self._cond.wait()
                    self._drop_cancelled()
                if self._stopping:
                    break
                if self._abort is not None:
                    self._end_all(*self._abort)
                    self._abort = None
                    continue
                self._admit()
            try:
                self._prefill_step()
                self._decode_step()
            except Exception as exc:  # a failed step fails the sequences in it, never the server
                LOG.exception("generation step failed")
                for seq in [s for s in self._slots if s is not None]:
                    self._end(seq, None, "", f"generation failed: {type(exc).__name__}", GENERATION_FAILED)
        with self._cond:
            self._end_all("the server is shutting down", SHUTTING_DOWN)

    def _end_all(self, message: str, code: str) -> None:
        """Under the lock: end every queued and running sequence with an error event."""
        pending = list(self._pending)
        self._pending.clear()
        for seq in [s for s in self._slots if s is not None] + pending:
            self._end(seq, None, "", message, code)

    def _drop_cancelled(self) -> None:
        """Under the lock: forget cancelled sequences, queued or running (their slots become free)."""
        if any(s.handle.cancelled for s in self._pending):
            self._pending = collections.deque(s for s in self._pending if not s.handle.cancelled)
        for slot, seq in enumerate(self._slots):
            if seq is not None and seq.handle.cancelled:
                self._slots[slot] = None
                self._running -= 1

    def _admit(self) -> None:
        """Under the lock: move queued sequences into free slots (lowest first, to keep the batch narrow)."""
        for slot in range(self.max_slots):
            if not self._pending:
                return
            if self._slots[slot] is None:
                seq = self._pending.popleft()
                seq.slot = slot
                self._admitted += 1
                seq.order = self._admitted
                try:
                    seq.alpha = self.backend.ntk_alpha(len(seq.prompt))
                    seq.generator = make_generator(seq.params.seed, self.backend.device)
                    self._seen[slot].zero_()
                    self._seen[slot, torch.tensor(seq.prompt, device=self.backend.device)] = True
                except Exception as exc:  # this request fails; the worker (and every other request) goes on
                    LOG.exception("admitting a request failed")
                    self._end(seq, None, "", f"generation failed: {type(exc).__name__}", GENERATION_FAILED)
                    continue
                self._slots[slot] = seq
                self._running += 1

    def _prefill_step(self) -> None:
        """Prefill up to PREFILL_CHUNK prompt tokens, earliest-admitted sequences first (a long prompt goes in
        chunks over several iterations); sample the first token of every sequence whose prompt is complete."""
        waiting = sorted((s for s in self._slots if s is not None and not s.decoding), key=lambda s: s.order)
        budget = PREFILL_CHUNK
        done, last_logits = [], []
        for seq in waiting:
            if budget <= 0:
                break
            self._reuse_prefix(seq)
            chunk = seq.prompt[seq.prefilled : seq.prefilled + budget]
            logits = self.backend.prefill(seq.slot, chunk, seq.prefilled, seq.alpha)  # [V]
            seq.prefilled += len(chunk)
            budget -= len(chunk)
            self._offer_prefix(seq, seq.prompt, seq.prefilled)
            if seq.decoding:
                seq.next_pos = len(seq.prompt)
                seq.fed = []
                if self.prefix_store is not None:
                    self.prefix_store.count(seq.reused)
                    if self.metrics is not None:
                        self.metrics.on_prefix_lookup(seq.reused)
                done.append(seq)
                last_logits.append(logits)
        if done:
            self._sample(done, torch.stack(last_logits))

    def _decode_step(self) -> None:
        """One token for every decoding sequence, in one batched forward over rows 0..highest of them."""
        active = [s for s in self._slots if s is not None and s.decoding]
        if not active:
            return
        width = max(s.slot for s in active) + 1
        tokens, positions, alphas = [0] * width, [0] * width, [1.0] * width
        for slot in range(width):
            seq = self._slots[slot]
            if seq is None:
                continue  # idle row: dummy token at position 0, logits ignored
            if seq.decoding:
                tokens[slot], positions[slot], alphas[slot] = seq.last_token, seq.next_pos, seq.alpha
            else:  # mid-prefill row: the dummy lands where the next prompt chunk will overwrite it
                positions[slot] = seq.prefilled
        logits = self.backend.decode(tokens, positions, alphas)  # [width, V]
        for seq in active:
            seq.next_pos += 1
            if seq.fed is not None:
                seq.fed.append(seq.last_token)
        rows = torch.tensor([s.slot for s in active], device=logits.device)
        self._sample(active, logits[rows])

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Pick the next token of each sequence from its logits row `[len(seqs), V]` and act on it."""
        rows = torch.tensor([s.slot for s in seqs], device=self._seen.device)
        tokens = sample(
            logits,
            [s.params for s in seqs],
            [s.generator for s in seqs],
            seen_mask=self._seen[rows],
            valid_vocab_size=len(self.tokenizer),
        )
        self._seen[rows, tokens.to(self._seen.device)] = True
        for seq, token in zip(seqs, tokens.tolist(), strict=True):
            self._accept(seq, token)

    def _reuse_prefix(self, seq: _Sequence) -> None:
        """Copy the stored blocks that continue `seq`'s prompt into its slot (no-op without a store)."""
        store = self.prefix_store
        if store is None:
            return
        aligned = seq.prefilled - seq.prefilled % store.block_size
        for pos, data in store.lookup(seq.prompt, seq.alpha, start=aligned):
            end = pos + store.block_size
            if end > seq.prefilled:  # a block partly computed already is copied whole: same keys/values
                self.backend.write_kv(seq.slot, pos, data)
                seq.reused += end - max(pos, seq.prefilled)
                seq.prefilled = end

    def _offer_prefix(self, seq: _Sequence, tokens: list[int], upto: int) -> None:
        """Offer the whole blocks of `tokens[:upto]`, computed in `seq`'s slot, to the prefix store."""
        if self.prefix_store is not None:
            slot = seq.slot
            self.prefix_store.insert(tokens, seq.alpha, lambda a, b: self.backend.read_kv(slot, a, b), upto)

    def _accept(self, seq: _Sequence, token: int) -> None:
        if token in seq.params.stop_token_ids:
            self._end(seq, "stop", seq.text.close())
            return
        seq.generated += 1
        if self.metrics is not None:
            now = time.monotonic()
            if seq.generated == 1:
                self.metrics.on_first_token(now - seq.submitted)
            else:
                self.metrics.on_token(now - seq.last_token_at)
            seq.last_token_at = now
        text, stopped = seq.text.push(token)
        if stopped:
            self._end(seq, "stop", text)
        elif seq.generated >= seq.params.max_new_tokens or seq.next_pos >= self.backend.max_len:
            self._end(seq, "length", text + seq.text.close())
        else:
            seq.last_token = token
            if text:
                seq.handle.deliver(Event(seq.index, text, seq.generated))

    def _end(
        self, seq: _Sequence, reason: str | None, text: str, error: str | None = None, code: str | None = None
    ) -> None:
        """Send the last event of `seq` and free its slot."""
        if reason is not None and seq.fed is not None:
            # Prompt + answer is the prefix the next turn of this conversation starts with.
            self._offer_prefix(seq, seq.prompt + seq.fed, len(seq.prompt) + len(seq.fed))
        seq.handle.deliver(Event(seq.index, text, seq.generated, reason, error, code))
        if self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None
            with self._cond:
                self._running -= 1
