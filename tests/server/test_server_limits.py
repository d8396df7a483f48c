"""Engine behaviour of a real `qwenkit serve` under load: the queue and 429, a responsive event loop while
generations stream, requests joining a running batch, and cancellation on client disconnect (stream or not)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_support import API_KEY, CONCURRENCY, MODEL, QUEUE

LONG = {"model": MODEL, "temperature": 0, "max_tokens": 1000}


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Count slowly from {i} to a thousand."}]


def _health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=5).json()


def _wait_for(server, predicate, timeout: float, step: float = 0.02) -> float:
    """Seconds until `predicate(health)` holds; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate(_health(server)):
            return time.monotonic() - start
        time.sleep(step)
    pytest.fail(f"condition not reached within {timeout}s; last health {_health(server)}")


def _open_stream(http: httpx.Client, i: int) -> httpx.Response:
    request = http.build_request(
        "POST", "/v1/chat/completions", json={**LONG, "messages": _messages(i), "stream": True}
    )
    response = http.send(request, stream=True)
    assert response.status_code == 200
    return response


@pytest.fixture
def idle(server):
    """Each test starts and ends with an idle engine."""
    _wait_for(server, lambda h: h["running"] == 0 and h["waiting"] == 0, 10)
    yield
    _wait_for(server, lambda h: h["running"] == 0 and h["waiting"] == 0, 10)


def test_queue_then_429_health_stays_fast_and_disconnect_frees_slots(server, http, idle):
    streams = [_open_stream(http, i) for i in range(CONCURRENCY + QUEUE)]
    try:
        _wait_for(server, lambda h: h["running"] == CONCURRENCY and h["waiting"] == QUEUE, 10)
        # Past the queue: 429 with Retry-After and an error body, for whole and streamed requests alike.
        for stream in (False, True):
            r = http.post("/v1/chat/completions", json={**LONG, "messages": _messages(99), "stream": stream})
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"].isdigit() and r.json()["error"]["code"] == "rate_limit_exceeded"
        # The event loop is never blocked by generation: /health answers fast while 4 sequences decode.
        for _ in range(10):
            start = time.monotonic()
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
            assert time.monotonic() - start < 0.2
        # Streams are really flowing (content arrives), not just open.
        lines = streams[0].iter_lines()
        assert sum(1 for _, line in zip(range(6), lines, strict=False) if line.startswith("data: ")) >= 3
    finally:
        for s in streams:
            s.close()
    # Disconnected streams, running or queued, are dropped and their slots freed within a second.
    assert _wait_for(server, lambda h: h["running"] == 0 and h["waiting"] == 0, 5) < 1.0


def test_non_stream_disconnect_cancels(server, idle):
    with httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=httpx.Timeout(10, read=0.5),
    ) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json={**LONG, "messages": _messages(1)})
    gave_up = time.monotonic()
    _wait_for(server, lambda h: h["running"] == 0 and h["waiting"] == 0, 5)
    assert time.monotonic() - gave_up < 1.0


def test_short_request_joins_and_leaves_a_running_batch(server, http, idle):
    long = _open_stream(http, 7)
    try:
        _wait_for(server, lambda h: h["running"] == 1, 10)
        r = http.post("/v1/chat/completions", json={**LONG, "messages": _messages(8), "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        assert _health(server)["running"] == 1  # the long one is still generating
    finally:
        long.close()


def test_streams_from_threads_all_complete(server, client, idle):
    """Many concurrent clients, more than the slots: every one gets a complete, well-formed answer."""
    results: list[str | None] = [None] * (CONCURRENCY + 2)

    def run(i: int) -> None:
        stream = client.chat.completions.create(
            model=MODEL, messages=_messages(i), temperature=0, max_tokens=5, stream=True
        )
        finishes = [ch.finish_reason for c in stream for ch in c.choices if ch.finish_reason]
        results[i] = finishes[0] if len(finishes) == 1 else None

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r in ("stop", "length") for r in results), results
