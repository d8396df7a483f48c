"""--stream-idle-timeout: a stream whose client takes no write for that long is cancelled (its slot freed, the
abort counted), while a client that reads is never cut. The backend never stops on its own, so only a limit ends
a stream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import httpx
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from server_support import Running, free_port, wait_healthy

from qwenkit import QWenTokenizer
from qwenkit.generation.sampling import OFFICIAL_GENERATION_CONFIG, SamplingParams
from qwenkit.server import completions
from qwenkit.server.app import Loaded, ServerOptions, create_app
from qwenkit.server.engine import Engine, RequestHandle
from qwenkit.server.metrics import ServerMetrics

IDLE = 1.0


class EndlessBackend:
    """Every position forces the same ordinary token: a stream that only a limit can end."""

    def __init__(self, token: int, max_slots: int, max_len: int) -> None:
        self.token, self.max_slots, self.max_len = token, max_slots, max_len
        self.vocab_size = 151936
        self.device = torch.device("cpu")

    def ntk_alpha(self, prompt_len: int) -> float:
        return 1.0

    def _logits(self, rows: int) -> torch.Tensor:
        logits = torch.zeros(rows, self.vocab_size)
        logits[:, self.token] = 100.0
        return logits

    def prefill(self, slot: int, ids: Sequence[int], start: int, alpha: float) -> torch.Tensor:
        return self._logits(1)[0]

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], alphas: Sequence[float]
    ) -> torch.Tensor:
        return self._logits(len(tokens))


@pytest.fixture(scope="module")
def endless(tokenizer: QWenTokenizer) -> Iterator[tuple[Running, object]]:
    options = ServerOptions(model_name="endless", max_concurrency=2, max_queue=2, stream_idle_timeout=IDLE)
    backend = _backend(tokenizer)
    config = {**OFFICIAL_GENERATION_CONFIG, "do_sample": False}
    app = create_app(options, lambda: Loaded(backend, tokenizer, config))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield Running(url), port
    finally:
        server.should_exit = True
        thread.join(15)


def _backend(tokenizer: QWenTokenizer) -> EndlessBackend:
    return EndlessBackend(tokenizer.encode(" hello")[0], 2, 32768)


def _sample(text: str, name: str, reason: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("reason") == reason:
                return s.value
    raise AssertionError(f"{name} missing")


def _aborted(url: str, reason: str) -> float:
    return _sample(httpx.get(f"{url}/metrics", timeout=10).text, "qwenkit_requests_aborted_total", reason)


def test_unread_stream_frees_its_slot(tokenizer):
    """ASGI level: the client's transport never takes a body write (as when its socket buffers are full); the
    idle bound cancels the request (the engine frees its slot), closes the body generator, and counts it."""
    metrics = ServerMetrics("endless")
    engine = Engine(_backend(tokenizer), tokenizer, max_queue=2, metrics=metrics)
    served = completions.Served(
        engine, tokenizer, {}, "endless", 32768, (tokenizer.im_end_id,), 1 << 20,
        metrics=metrics, stream_idle_timeout=IDLE,
    )  # fmt: skip
    closed: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"data: {}\n\n"
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)

    async def run() -> tuple[float, RequestHandle]:
        handle = engine.submit([([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=30000))],
                               asyncio.get_running_loop())  # fmt: skip
        response = completions._stream_response(served, handle, body())
        stuck = asyncio.Event()

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                await stuck.wait()  # the client reads nothing

        async def receive() -> dict:
            await stuck.wait()
            return {"type": "http.disconnect"}

        start = time.monotonic()
        await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        return time.monotonic() - start, handle

    engine.start()
    try:
        took, handle = asyncio.run(asyncio.wait_for(run(), 30))
        assert IDLE <= took < IDLE + 10 and closed == [True] and handle.cancelled
        deadline = time.monotonic() + 10
        while engine.stats()["running"] != 0:
            assert time.monotonic() < deadline, "the cancelled stream kept its slot"
            time.sleep(0.02)
    finally:
        engine.shutdown()
    assert _sample(metrics.render().decode(), "qwenkit_requests_aborted_total", "stream_idle_timeout") == 1


def test_a_reading_client_is_never_cut(endless):
    server, _ = endless
    before = _aborted(server.url, "stream_idle_timeout")
    body = {"model": "endless", "prompt": "go", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        text = "".join(r.iter_text())
    assert text.rstrip().endswith("data: [DONE]") and '"abort"' not in text
    assert '"finish_reason":"length"' in text
    assert _aborted(server.url, "stream_idle_timeout") == before
