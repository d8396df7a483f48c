"""Long conversations and long context (issue 14): prefix reuse, int8 KV cache, decode speed over long caches.

    python benchmarks/long_context.py ttft   -m /work/ckpt/1.8b --threads 2   # 10th chat turn, ~2,000 history tokens
    python benchmarks/long_context.py server -m /work/ckpt/1.8b --threads 2   # 8 requests, shared 1,000-token system
    python benchmarks/long_context.py decode -m /work/ckpt/1.8b-int4 --threads 2 --label int4 --gen 8

Each prints one JSON line per figure. Memory at 8,192 positions: `qwenkit bench --kv-cache int8` (the card's case).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch

from qwenkit.checkpoints.loading import load
from qwenkit.generation.chat import prepare_chat
from qwenkit.generation.generate import generate
from qwenkit.generation.prefix import PrefixCache
from qwenkit.generation.sampling import SamplingParams


def _history(tok, turns: int, tokens_per_turn: int) -> list[tuple[str, str]]:
    words = "the quick brown fox jumps over the lazy dog while it rains in spring".split()
    text = " ".join(words[i % len(words)] for i in range(tokens_per_turn // 2))
    return [(f"Question {i}: {text}", f"Answer {i}: {text}") for i in range(turns)]


def ttft(model, tok, args) -> None:
    """Time to first token of turn 10 whose history (9 turns) is ~2,000 tokens, with and without reuse."""
    history = _history(tok, 8, 240)
    prefix = PrefixCache()
    one = {"do_sample": False, "max_new_tokens": 1}
    # Turn 9 fills the prefix cache as a chat would (its answer is one token here); turn 10 is measured.
    prompt9, params = prepare_chat(model, tok, "Turn nine?", history, "You are a helpful assistant.", None, None,
                                   dict(one, max_new_tokens=8))  # fmt: skip
    answer9 = generate(model, tok, prompt9, params, prefix=prefix).text.strip()
    history = [*history, ("Turn nine?", answer9)]
    prompt10, params = prepare_chat(model, tok, "And the tenth?", history, "You are a helpful assistant.", None,
                                    None, dict(one))  # fmt: skip
    for label, pc in (("without reuse", None), ("with reuse", prefix)):
        before = prefix.reused_tokens
        start = time.perf_counter()
        generate(model, tok, prompt10, params, prefix=pc)
        seconds = time.perf_counter() - start
        reused = prefix.reused_tokens - before if pc is not None else 0
        print(json.dumps({"case": f"ttft turn 10, {label}", "prompt_tokens": len(prompt10), "reused": reused,
                          "seconds": round(seconds, 3)}), flush=True)  # fmt: skip


def server(model, tok, args) -> None:
    """8 concurrent requests sharing a ~1,000-token system prompt through the engine, with and without the store."""
    from qwenkit.server.backend import ModelBackend
    from qwenkit.server.engine import Engine

    system = tok.encode(" ".join(["You are a careful assistant and answer with precise facts."] * 90))[:1000]
    prompts = [system + tok.encode(f" User {i} asks: what is {i} plus {i}?") for i in range(8)]
    params = SamplingParams(temperature=0, max_new_tokens=args.gen)
    for label, mb in (("without prefix cache", 0), ("with prefix cache", 2048)):
        backend = ModelBackend(model, 8, 2048, prefix_cache_bytes=mb << 20)
        engine = Engine(backend, tok, max_queue=8)
        engine.start()

        async def one(engine, prompt, t0):
            handle = engine.submit([(prompt, params)], asyncio.get_running_loop())
            first, n = None, 0
            async for event in handle.events():
                first = first or time.perf_counter() - t0
                n = event.completion_tokens
            return first, n

        async def run_all(engine):
            t0 = time.perf_counter()
            out = await asyncio.gather(*(one(engine, p, t0) for p in prompts))
            return out, time.perf_counter() - t0

        results, total = asyncio.run(run_all(engine))
        engine.shutdown()
        firsts = [f for f, _ in results]
        tokens = sum(n for _, n in results)
        print(json.dumps({"case": f"server 8 requests, {label}", "mean_ttft_s": round(sum(firsts) / 8, 2),
                          "max_ttft_s": round(max(firsts), 2), "total_s": round(total, 2),
                          "completion_tok_s": round(tokens / total, 2), **engine.stats()}), flush=True)  # fmt: skip


@torch.inference_mode()
def decode(model, tok, args) -> None:
    """Decode tok/s (forward passes, no sampling) at the end of a context of each length, per cache kind.

    The cache is not prefilled (a 16k prefill takes many minutes on 2 cores): it is allocated zeroed (every page
    written, so resident) and the measured steps attend to all `ctx` positions, as at the end of a real context;
    attention does the same work whatever the values. NTK alpha and logn follow the context length.
    `--attention sdpa` turns the decode kernel off (the dispatcher's PyTorch path) for comparison.
    """
    from qwenkit.kernels import cpu, describe_cpu

    if args.attention == "sdpa":
        cpu.decode_attention = lambda *a, **k: None  # the dispatcher then runs SDPA (int8: dequantized window)
    print(json.dumps({"cpu": describe_cpu(), "threads": torch.get_num_threads(), "attention": args.attention}))
    rows = []
    for kind in args.kv_caches:
        for ctx in args.contexts:
            cache = model.new_cache(1, ctx + args.warmup + args.gen, dtype=kind)
            alpha = model.ntk_alpha(ctx)
            ids = torch.tensor([[100]])
            for pos in range(ctx, ctx + args.warmup):
                model(ids, torch.tensor([[pos]]), cache, alpha)
            start = time.perf_counter()
            for pos in range(ctx + args.warmup, ctx + args.warmup + args.gen):
                model(ids, torch.tensor([[pos]]), cache, alpha)
            tok_s = args.gen / (time.perf_counter() - start)
            row = {"case": "decode", "weights": args.quantize or args.label or args.dtype, "kv_cache": kind,
                   "context": ctx, "alpha": alpha, "attention": args.attention, "tok_s": round(tok_s, 2)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            del cache
    print("| weights | KV cache | " + " | ".join(f"ctx {c}" for c in args.contexts) + " | ratio at 8k |")
    print("|---|---|" + "---|" * (len(args.contexts) + 1))
    for kind in args.kv_caches:
        # Runs in order (a context may repeat: `--contexts 1 8192 1 8192`); each 8k figure is divided by the
        # latest context-1 figure before it, so that pairs stay pairs.
        runs = [r for r in rows if r["kv_cache"] == kind]
        ratios, base = [], None
        for r in runs:
            if r["context"] == 1:
                base = r["tok_s"]
            elif r["context"] == 8192 and base:
                ratios.append(f"{r['tok_s'] / base:.2f}")
        cells = " | ".join(f"{r['tok_s']:.2f}" for r in runs)
        print(f"| {rows[0]['weights']} | {kind} | {cells} | {', '.join(ratios) or '-'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["ttft", "server", "decode"])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache", default=None, help="cache kind for ttft/server (default fp32 on CPU)")
    p.add_argument("--kv-caches", nargs="+", default=["fp32", "int8"], help="cache kinds for decode")
    p.add_argument("--contexts", nargs="+", type=int, default=[1, 2048, 8192, 16384])
    p.add_argument("--gen", type=int, default=16, help="decode steps per figure / tokens per server request")
    p.add_argument("--warmup", type=int, default=2, help="decode steps before the timed ones")
    p.add_argument("--attention", choices=["kernel", "sdpa"], default="kernel", help="decode attention path")
    p.add_argument("--label", default=None, help="name of the weights in the table (default: dtype/quantize)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model, dtype=args.dtype, quantize=args.quantize, kv_cache_dtype=args.kv_cache,
                      progress=False)  # fmt: skip
    {"ttft": ttft, "server": server, "decode": decode}[args.what](model, tok, args)


if __name__ == "__main__":
    main()
