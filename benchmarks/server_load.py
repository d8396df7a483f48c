"""Load test of `qwenkit serve`: throughput under concurrency, time to first token, errors, and memory growth.

Starts a server (on a synthetic tiny checkpoint unless -m is given) on 127.0.0.1, then:
  1. one streaming client alone (the single-stream baseline),
  2. N concurrent streaming clients (aggregate tokens/s, p50/p95 time to first token),
  3. a mix of requests (streamed and whole chats, completions, n=2, tool calls, streams dropped mid-way, whole
     requests abandoned by a client timeout) with bounded client concurrency.
Reports throughput, TTFT, error counts (anything but 200 and 429 is an error; dropped requests are not) and the
server's RSS after warm-up and at the end. Prints a markdown summary; --json also writes the figures.

    python benchmarks/server_load.py [-m MODEL] [--clients 16] [--requests 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MB = 1024 * 1024
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object"},
    },
}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/PID/status (Linux only)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "qwenkit", "serve", "-m", model, "--port", str(port), "--model-name", "bench",
        "--max-concurrency", str(args.clients), "--max-queue", str(args.queue),
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy in 300 s")


def chat_body(i: int, args: argparse.Namespace, **extra) -> dict:
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": f"Request {i}: tell me a long story about the sea."}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": i,
        **extra,
    }


async def stream_chat(client: httpx.AsyncClient, body: dict, drop_after: int | None = None) -> dict:
    """One streamed chat: status, time to first content, completion tokens (from the usage chunk)."""
    start = time.perf_counter()
    out = {"status": 0, "ttft": None, "tokens": 0, "seconds": 0.0, "dropped": False}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            return out
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                out["tokens"] = data["usage"]["completion_tokens"]
            if any(ch["delta"].get("content") for ch in data.get("choices", [])):
                chunks += 1
                if out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - start
            if drop_after is not None and chunks >= drop_after:
                out["dropped"] = True
                break
    out["seconds"] = time.perf_counter() - start
    return out


async def whole_request(
    client: httpx.AsyncClient, path: str, body: dict, timeout: float | None = None
) -> dict:
    try:
        r = await client.post(path, json=body, timeout=timeout or client.timeout)
    except httpx.ReadTimeout:
        return {"status": 0, "dropped": True, "tokens": 0}
    tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
    return {"status": r.status_code, "dropped": False, "tokens": tokens}


async def mixed_request(client: httpx.AsyncClient, i: int, args: argparse.Namespace) -> dict:
    kind = random.Random(i).choice(
        ["stream", "stream", "whole", "completion", "n2", "tools", "drop", "abandon"]
    )
    chat = "/v1/chat/completions"
    if kind == "stream":
        result = await stream_chat(client, chat_body(i, args))
    elif kind == "drop":
        result = await stream_chat(client, chat_body(i, args), drop_after=2)
    elif kind == "whole":
        result = await whole_request(client, chat, chat_body(i, args))
    elif kind == "abandon":
        result = await whole_request(
            client, chat, chat_body(i, args, max_tokens=10 * args.max_tokens), timeout=0.3
        )
    elif kind == "n2":
        result = await whole_request(client, chat, chat_body(i, args, n=2, temperature=0.8))  # choices differ
    elif kind == "tools":
        result = await whole_request(client, chat, chat_body(i, args, tools=[TOOL]))
    else:
        body = {
            "model": "bench",
            "prompt": f"Story {i}:",
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
        }
        result = await whole_request(client, "/v1/completions", body)
    return {**result, "kind": kind}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_phases(url: str, pid: int, args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=args.clients * 4, max_keepalive_connections=args.clients * 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        # Warm-up: every kind of request once or more, so allocator pools and code paths are in place.
        await asyncio.gather(*(mixed_request(client, 100_000 + i, args) for i in range(2 * args.clients)))
        await asyncio.sleep(1.0)
        single = await stream_chat(client, chat_body(0, args))
        start = time.perf_counter()
        burst = await asyncio.gather(*(stream_chat(client, chat_body(i, args)) for i in range(args.clients)))
        burst_seconds = time.perf_counter() - start
        await asyncio.sleep(1.0)
        rss_warm = rss(pid)
        gate = asyncio.Semaphore(args.clients + args.clients // 2)  # more clients than slots: some queue

        async def gated(i: int) -> dict:
            async with gate:
                return await mixed_request(client, i, args)

        mixed, mixed_seconds, rss_rounds = [], 0.0, []
        for round_ in range(args.rounds):
            start = time.perf_counter()
            base = 1000 + round_ * args.requests
            mixed += await asyncio.gather(*(gated(base + i) for i in range(args.requests)))
            mixed_seconds += time.perf_counter() - start
            await asyncio.sleep(2.0)
            rss_rounds.append(round(rss(pid) / MB, 1))
        health = (await client.get("/health")).json()
        rss_end = rss(pid)
    result = summarize(single, burst, burst_seconds, mixed, mixed_seconds, rss_warm, rss_end, health)
    return {**result, "rss_after_each_round_mb": rss_rounds}


def summarize(single, burst, burst_seconds, mixed, mixed_seconds, rss_warm, rss_end, health) -> dict:
    single_tps = single["tokens"] / single["seconds"]
    burst_tokens = sum(r["tokens"] for r in burst)
    ttfts = [r["ttft"] for r in burst if r["ttft"] is not None]
    statuses: dict[str, int] = {}
    for r in mixed:
        key = "dropped" if r["dropped"] else str(r["status"])
        statuses[key] = statuses.get(key, 0) + 1
    errors = sum(1 for r in [*burst, *mixed] if not r["dropped"] and r["status"] not in (200, 429))
    return {
        "single_stream_tokens_per_s": round(single_tps, 1),
        "concurrent_clients": len(burst),
        "aggregate_tokens_per_s": round(burst_tokens / burst_seconds, 1),
        "speedup_vs_single": round(burst_tokens / burst_seconds / single_tps, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
        "mixed_requests": len(mixed),
        "mixed_seconds": round(mixed_seconds, 1),
        "mixed_outcomes": statuses,
        "mixed_ttft_p95_s": round(percentile([r["ttft"] for r in mixed if r.get("ttft")] or [0.0], 0.95), 3),
        "errors": errors,
        "rss_after_warmup_mb": round(rss_warm / MB, 1),
        "rss_end_mb": round(rss_end / MB, 1),
        "rss_growth_mb": round((rss_end - rss_warm) / MB, 1),
        "idle_after": health.get("running") == 0 and health.get("waiting") == 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-m", "--model", default=None, help="model dir (default: a synthetic tiny checkpoint)"
    )
    parser.add_argument(
        "--clients", type=int, default=16, help="concurrent streams = server slots (default 16)"
    )
    parser.add_argument("--queue", type=int, default=64, help="server --max-queue (default 64)")
    parser.add_argument("--requests", type=int, default=200, help="mixed requests per round (default 200)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of mixed requests (default 1)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="server --threads")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from qwenkit.checkpoints.synthetic import make_checkpoint

            model = str(make_checkpoint(Path(tmp) / "tiny", preset="tiny", dtype="float32"))
        proc, url = start_server(model, args, Path(tmp) / "server.log")
        try:
            result = asyncio.run(run_phases(url, proc.pid, args))
        finally:
            proc.terminate()
            proc.wait(30)
    print("| figure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = result["errors"] == 0 and result["rss_growth_mb"] < 50 and result["idle_after"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
