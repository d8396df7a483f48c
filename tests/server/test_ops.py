"""Operations of a real `qwenkit serve` subprocess: graceful drain on SIGTERM (streams finish, or end with a final
abort event and [DONE] when the shutdown timeout is tiny; new requests get 503; /ready 503 while /health stays
200; exit within timeout + 5 s), a second signal exits at once, /metrics (parsed with prometheus_client) moving by
the right amounts, and --request-timeout ending a request cleanly and freeing its slot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import API_KEY, Running, free_port, sse_data, wait_healthy

from qwenkit.checkpoints.synthetic import make_checkpoint

METRICS_KEY = "metrics-key-0123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXIT_MARGIN = 5.0  # the bound: exit within the shutdown timeout + 5 s


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ops") / "tiny", preset="tiny", dtype="float32", seed=0)


def _start(checkpoint: Path, log: Path, *extra: str) -> Running:
    port = free_port()
    cmd = [
        sys.executable, "-m", "qwenkit", "serve", "-m", str(checkpoint), "--port", str(port), "--api-key", API_KEY,
        "--max-model-len", "4096", "--dtype", "float32", "--device", "cpu", "--threads", "1", "--no-web", *extra,
    ]  # fmt: skip
    # As in the web tests: the C++ kernels (built at first use, still changing) are not what these tests check.
    env = {**os.environ, "QWENKIT_DISABLE_EXT": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
    except BaseException:
        proc.kill()
        raise
    return Running(url, log, proc)


@pytest.fixture
def launch(checkpoint: Path, tmp_path: Path) -> Iterator:
    started: list[Running] = []

    def go(*extra: str) -> Running:
        started.append(_start(checkpoint, tmp_path / f"server{len(started)}.log", *extra))
        return started[-1]

    yield go
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def _body(max_tokens: int, stream: bool, i: int = 0) -> dict:
    return {"model": "tiny", "temperature": 0, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": f"Count slowly from {i} to a thousand."}]}  # fmt: skip


class _Stream(threading.Thread):
    """Reads one streamed chat completion to its end in a thread; keeps the SSE payloads (or the failure)."""

    def __init__(self, url: str, max_tokens: int, i: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.i = url, max_tokens, i
        self.first = threading.Event()
        self.data: list[str] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            body = _body(self.max_tokens, True, self.i)
            with httpx.stream(
                "POST", f"{self.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120
            ) as r:
                assert r.status_code == 200, r.read()
                text = ""
                for piece in r.iter_text():
                    text += piece
                    if "\n\n" in text:
                        self.first.set()
            self.data = sse_data(text)  # fails on a truncated or malformed event
        except BaseException as exc:  # a protocol error shows up here
            self.failure = exc
        finally:
            self.first.set()

    def finishes(self) -> list[str]:
        chunks = [json.loads(d) for d in self.data[:-1]]
        return [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]


def _open_streams(server: Running, n: int, max_tokens: int) -> list[_Stream]:
    streams = [_Stream(server.url, max_tokens, i) for i in range(n)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first.wait(60) and s.failure is None, s.failure
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health", timeout=5).json()["running"] < n:
        assert time.monotonic() < deadline, "streams never all ran"
        time.sleep(0.05)
    return streams


def _assert_refused_while_draining(server: Running) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/ready", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/ready never turned 503"
        time.sleep(0.02)
    health = httpx.get(f"{server.url}/health", timeout=5)
    assert health.status_code == 200, health.text
    for stream in (False, True):
        r = httpx.post(f"{server.url}/v1/chat/completions", json=_body(5, stream), headers=AUTH, timeout=10)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["code"] == "server_shutting_down"


def _wait_exit(server: Running, within: float) -> float:
    start = time.monotonic()
    rc = server.proc.wait(within)
    assert rc == 0, server.log.read_text()[-3000:]
    return time.monotonic() - start


def test_sigterm_lets_running_streams_finish_and_refuses_new_requests(launch):
    timeout = 60.0
    server = launch("--max-concurrency", "4", "--shutdown-timeout", str(timeout))
    streams = _open_streams(server, 4, max_tokens=150)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    _assert_refused_while_draining(server)
    for s in streams:
        s.join(timeout)
        assert s.failure is None, s.failure
        assert s.data[-1] == "[DONE]" and s.finishes() in (["length"], ["stop"]), s.data[-3:]
    assert time.monotonic() - sent < timeout  # finished inside the shutdown timeout
    _wait_exit(server, timeout + EXIT_MARGIN - (time.monotonic() - sent))


def test_tiny_shutdown_timeout_ends_streams_with_an_abort_event_then_done(launch):
    timeout = 1.0
    server = launch("--max-concurrency", "4", "--shutdown-timeout", str(timeout))
    streams = _open_streams(server, 3, max_tokens=3000)
    whole: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: whole.append(
            httpx.post(
                f"{server.url}/v1/chat/completions", json=_body(3000, False), headers=AUTH, timeout=120
            )
        ),
        daemon=True,
    )
    waiter.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health", timeout=5).json()["running"] < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    _assert_refused_while_draining(server)
    for s in streams:
        s.join(30)
        assert s.failure is None, s.failure  # a clean end, never a protocol error
        assert s.data[-1] == "[DONE]"
        last = json.loads(s.data[-2])
        assert last["error"]["code"] == "server_shutting_down"
        assert [c["finish_reason"] for c in last["choices"]] == ["abort"]
    waiter.join(30)
    assert whole and whole[0].status_code == 503, whole
    assert whole[0].json()["error"]["code"] == "server_shutting_down"
    _wait_exit(server, timeout + EXIT_MARGIN - (time.monotonic() - sent))


def test_second_signal_exits_at_once(launch):
    server = launch("--max-concurrency", "2", "--shutdown-timeout", "60")
    streams = _open_streams(server, 1, max_tokens=3000)
    server.proc.send_signal(signal.SIGTERM)
    _assert_refused_while_draining(server)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    rc = server.proc.wait(10)
    assert time.monotonic() - start < 5 and rc == 1
    streams[0].join(10)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_move_by_known_amounts_and_request_timeout_frees_the_slot(launch):
    server = launch("--max-concurrency", "1", "--request-timeout", "3", "--metrics-key", METRICS_KEY)
    # /metrics needs its own key; the API key does not open it, and nothing is a 500.
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=10).status_code == 401
    before = _metrics(server.url)
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_body(8, False), headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    bad = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "nope"}, headers=AUTH, timeout=10)
    assert bad.status_code == 400
    after = _metrics(server.url)
    route = "/v1/chat/completions"
    assert _delta(before, after, "qwenkit_http_requests_total", route=route, status="200") == 1
    assert _delta(before, after, "qwenkit_http_requests_total", route=route, status="400") == 1
    assert _delta(before, after, "qwenkit_prompt_tokens_total") == usage["prompt_tokens"]
    assert _delta(before, after, "qwenkit_generation_tokens_total") == usage["completion_tokens"]
    assert usage["completion_tokens"] >= 2
    assert _delta(before, after, "qwenkit_time_to_first_token_seconds_count") == 1
    assert (
        _delta(before, after, "qwenkit_time_per_output_token_seconds_count") == usage["completion_tokens"] - 1
    )
    assert after[("qwenkit_running_slots", ())] == 0 and after[("qwenkit_queue_depth", ())] == 0
    assert after[("qwenkit_slots", ())] == 1

    # Past --request-timeout: a stream ends with the abort event and [DONE]; a whole answer with a 504 body.
    start = time.monotonic()
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_body(3000, True), headers=AUTH, timeout=60)
    assert r.status_code == 200 and 2.5 < time.monotonic() - start < 20
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last["error"]["code"] == "request_timeout" and last["choices"][0]["finish_reason"] == "abort"
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_body(3000, False), headers=AUTH, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    # The one slot is free again: the next request starts at once (its first token well inside the timeout).
    start = time.monotonic()
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_body(2, False), headers=AUTH, timeout=60)
    assert r.status_code == 200 and time.monotonic() - start < 2.5, r.text
    final = _metrics(server.url)
    assert _delta(after, final, "qwenkit_requests_aborted_total", reason="request_timeout") == 2
