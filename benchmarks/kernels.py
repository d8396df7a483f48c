"""Linear-kernel speed at Qwen-1.8B shapes: decode bandwidth (GB/s of weight bytes) and prefill TFLOP/s.

Decode: for each projection shape, 24 distinct weight matrices (one per layer, so no cache holds them; the
lm_head is one 311 MB bf16 matrix) are multiplied in turn by M activation rows; GB/s counts every byte the kernel
must read (quantized weights + scales + offsets). The last table adds the shapes up into the time of all linear
layers of one decode step (attention, norms and sampling excluded). Prefill: M = 512 rows, 4 matrices per shape.
Quantized weights: int8 per output channel (group = K), int4 group 128, bf16 scales and offsets.

    python benchmarks/kernels.py [--threads 2] [--rows 1,4,8] [--repeats 5] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qwenkit import kernels
from qwenkit.kernels import cpu

LAYERS = 24
# (name, N, K, matrices per layer); lm_head is a single matrix
SHAPES = [
    ("attn.c_attn", 6144, 2048, 1),
    ("attn.c_proj", 2048, 2048, 1),
    ("mlp.w1/w2", 5504, 2048, 2),
    ("mlp.c_proj", 2048, 5504, 1),
    ("lm_head", 151936, 2048, 0),
]
INT4_GROUP = 128


def _weights(kind: str, n: int, k: int, count: int, gen: torch.Generator) -> list[tuple]:
    """`count` random weights of one kind, each an argument tuple for the kernel (after x)."""
    out = []
    for _ in range(count):
        if kind == "bf16":
            out.append(((torch.randn(n, k, generator=gen) * 0.02).bfloat16(),))
            continue
        g = k if kind == "int8" else INT4_GROUP
        scales = (torch.rand(n, k // g, generator=gen) * 0.01).bfloat16()
        offsets = (torch.randn(n, k // g, generator=gen) * 0.01).bfloat16()
        if kind == "int8":
            q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        else:
            q = kernels.pack_int4(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
        out.append((q, scales, offsets, g))
    return out


def _nbytes(args: tuple) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


KERNELS: dict[str, tuple[str, Callable]] = {
    "F.linear bf16": ("bf16", lambda x, w: F.linear(x, w)),
    "qwenkit bf16": ("bf16", lambda x, w: kernels.linear_bf16(x, w)),
    "qwenkit int8": ("int8", lambda x, q, s, o, g: kernels.linear_int8(x, q, s, o, g)),
    "qwenkit int4": ("int4", lambda x, q, s, o, g: kernels.linear_int4(x, q, s, o, g)),
}


def _time_pass(fn: Callable, x: torch.Tensor, weights: list[tuple], repeats: int) -> float:
    """Median seconds of one pass over all weights (after one warm-up pass)."""
    for w in weights:
        fn(x, *w)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            fn(x, *w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode(rows: list[int], repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    results = []
    for name, n, k, per_layer in SHAPES:
        count = 1 if per_layer == 0 else LAYERS
        by_kind: dict[str, list[tuple]] = {}
        for label, (kind, fn) in KERNELS.items():
            if kind not in by_kind:
                by_kind.clear()  # keep one kind of weights in memory at a time
                by_kind[kind] = _weights(kind, n, k, count, gen)
            weights = by_kind[kind]
            nbytes = sum(_nbytes(w) for w in weights)
            for m in rows:
                x = torch.randn(m, k, generator=gen).bfloat16()
                sec = _time_pass(fn, x, weights, repeats)
                per_step = sec / count * (per_layer * LAYERS if per_layer else 1)
                results.append(
                    {
                        "shape": name,
                        "N": n,
                        "K": k,
                        "kernel": label,
                        "M": m,
                        "GB/s": nbytes / sec / 1e9,
                        "step_s": per_step,
                    }
                )
    return results


def prefill(m: int, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    results = []
    for name, n, k, per_layer in SHAPES:
        if not per_layer:
            continue
        x = torch.randn(m, k, generator=gen).bfloat16()
        for label, (kind, fn) in KERNELS.items():
            if label == "qwenkit bf16":
                continue  # the same F.linear as the first row for M > GEMV_MAX_ROWS
            weights = _weights(kind, n, k, 4, gen)
            sec = _time_pass(fn, x, weights, repeats) / len(weights)
            results.append({"shape": name, "kernel": label, "M": m, "TFLOP/s": 2 * m * n * k / sec / 1e12})
    return results


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of a plain streaming read (torch.sum over `gib` GiB of fp32): the decode ceiling of this machine."""
    a = torch.ones(int(gib * (1 << 30)) // 4)
    a.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.numel() * 4 / statistics.median(times) / 1e9


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", default="1,4,8", help="activation rows (batch) for decode, comma separated")
    parser.add_argument("--prefill-rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    if not cpu.available():
        raise SystemExit(
            "the qwenkit C++ extension is not available (QWENKIT_DISABLE_EXT set, or see logging at INFO level); "
            "the reference kernels dequantize the whole weight per call and would take many minutes here"
        )
    print(f"threads {args.threads}, torch {torch.__version__}; CPU: {kernels.describe_cpu()}")
    print(f"read bandwidth (torch.sum over 1 GiB fp32): {read_bandwidth():.1f} GB/s\n")

    dec = decode(rows, args.repeats)
    labels = list(KERNELS)
    print("Decode, GB/s of weight bytes read (24 distinct matrices per shape):\n")
    body = []
    for name, *_ in SHAPES:
        for m in rows:
            cells = {r["kernel"]: r["GB/s"] for r in dec if r["shape"] == name and r["M"] == m}
            body.append([name, m, *(f"{cells[lb]:.1f}" for lb in labels)])
    print(_table(["shape", "M", *labels], body))

    print("\nAll linear layers of one decode step (24 layers + lm_head): ms per step and steps/s:\n")
    body = []
    for m in rows:
        cells = []
        for lb in labels:
            total = sum(r["step_s"] for r in dec if r["kernel"] == lb and r["M"] == m)
            cells.append(f"{total * 1e3:.1f} ms, {1 / total:.1f}/s")
        body.append([m, *cells])
    print(_table(["M", *labels], body))

    pre = prefill(args.prefill_rows, max(2, args.repeats // 2))
    print(
        f"\nPrefill, TFLOP/s at M = {args.prefill_rows} (quantized: dequantize tiles to bf16 + F.linear):\n"
    )
    plabels = [lb for lb in labels if lb != "qwenkit bf16"]
    body = []
    for name, _, _, per_layer in SHAPES:
        if per_layer:
            cells = {r["kernel"]: r["TFLOP/s"] for r in pre if r["shape"] == name}
            body.append([name, *(f"{cells[lb]:.2f}" for lb in plabels)])
    print(_table(["shape", *plabels], body))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "decode": dec, "prefill": pre}, f, indent=1)


if __name__ == "__main__":
    main()
