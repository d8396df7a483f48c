"""Server fixtures: a real `qwenkit serve` subprocess on a tiny random checkpoint, and an in-process server whose
backend is scripted (it forces exact token sequences) for the exact-output cases.

Both listen on 127.0.0.1 only, on a free port, and are started once per test session. Every wait is bounded.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest
from server_support import (
    ALLOWED_ORIGIN,
    API_KEY,
    CONCURRENCY,
    MAX_LEN,
    MODEL,
    QUEUE,
    Running,
    ScriptedBackend,
    free_port,
    wait_healthy,
)

from qwenkit import QWenTokenizer
from qwenkit.checkpoints.synthetic import make_checkpoint
from qwenkit.generation.sampling import OFFICIAL_GENERATION_CONFIG
from qwenkit.tokenizer.vocab import official_vocab_file


@pytest.fixture(scope="session")
def tokenizer() -> QWenTokenizer:
    return QWenTokenizer(official_vocab_file())


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """`qwenkit serve` on a tiny float32 checkpoint: API key, 4 slots + 4 queued, 1024-token context, one CORS
    origin. Its log (stdout + stderr) is kept for the logging tests."""
    root = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(root / MODEL, preset="tiny", dtype="float32", seed=0)
    port = free_port()
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "qwenkit", "serve", "-m", str(ckpt), "--port", str(port),
        "--api-key", API_KEY, "--max-concurrency", str(CONCURRENCY), "--max-queue", str(QUEUE),
        "--max-model-len", str(MAX_LEN), "--cors-origin", ALLOWED_ORIGIN, "--dtype", "float32", "--device", "cpu",
        "--threads", "1",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield Running(url, log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def http(server: Running) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture(scope="session")
def client(server: Running):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def scripted(tokenizer: QWenTokenizer) -> Iterator[Running]:
    """The real app (routes, engine, SSE) in this process, on a scripted backend; no API key."""
    import uvicorn

    from qwenkit.server.app import Loaded, ServerOptions, create_app

    options = ServerOptions(model_name="scripted", max_concurrency=CONCURRENCY, max_queue=QUEUE)
    backend = ScriptedBackend(tokenizer, CONCURRENCY, 512)
    config = {**OFFICIAL_GENERATION_CONFIG, "do_sample": False}  # greedy by default: cheap steps
    app = create_app(options, lambda: Loaded(backend, tokenizer, config))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield Running(url)
    finally:
        server.should_exit = True
        thread.join(15)
