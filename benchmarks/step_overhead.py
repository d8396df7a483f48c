"""Host time of one decode step: the model's 24 layers at a width where the arithmetic is negligible (hidden 256,
16 heads of 16, MLP 1,024, vocabulary 1,024), so what is measured is Python, the dispatcher, the kernels' fixed
costs and the fork/join of the thread pool: the time per token during which a full-size model's memory stream
stands idle. Writes the narrow checkpoint into a temporary directory and loads it twice, bf16 and quantized to
int4 at load (bf16 activations both times, as the speed benchmarks run), then times forward steps over an int8
cache.

    python benchmarks/step_overhead.py [--threads 2] [--steps 300] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from qwenkit.checkpoints.loading import load
from qwenkit.checkpoints.synthetic import make_checkpoint
from qwenkit.kernels import describe_cpu

NARROW = {"num_hidden_layers": 24, "hidden_size": 256, "num_attention_heads": 16, "kv_channels": 16,
          "intermediate_size": 1024, "vocab_size": 1024}  # fmt: skip


@torch.inference_mode()
def step_ms(model, steps: int) -> float:
    cache = model.new_cache(1, steps + 8, dtype="int8")
    ids = torch.tensor([[100]])
    for pos in range(4):
        model(ids, torch.tensor([[pos]]), cache, 1.0)
    start = time.perf_counter()
    for pos in range(4, 4 + steps):
        model(ids, torch.tensor([[pos]]), cache, 1.0)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--runs", type=int, default=5, help="the best of this many runs is reported")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"cpu": describe_cpu(), "threads": args.threads, "torch": torch.__version__}))
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "narrow", "tiny", overrides=NARROW)
        for quantize in (None, "int4"):
            model, _ = load(path, dtype="bfloat16", quantize=quantize, progress=False)
            best = min(step_ms(model, args.steps) for _ in range(args.runs))
            print(json.dumps({"weights": quantize or "bf16", "layers": 24, "ms_per_step": round(best, 3)}))


if __name__ == "__main__":
    main()
