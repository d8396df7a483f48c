"""Cost of `sample()` per decode step with the model card's chat settings (top_p 0.8, repetition penalty 1.1,
temperature 1), for one row and for a batch, over rows of the real vocabulary width.

The rows are N(0, s^2) logits: s = 6 puts the top-p 0.8 nucleus among a handful of ids (a confident real model),
s = 3 and 2.5 among ~2,000 and ~7,000, s = 1 (what a random synthetic checkpoint gives) over ~65,000.

    python benchmarks/sampling.py [--threads 2] [--batches 1 8] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qwenkit.generation.sampling import SamplingParams, build_seen_mask, make_generator, sample
from qwenkit.kernels import describe_cpu

VOCAB = 151936
VALID = 151851
CONTEXT = 500  # ids in the repetition-penalty mask


def time_sample(logits, seen, generators, params: SamplingParams, repeats: int) -> float:
    """ms per `sample()` call over `logits` [B, V], after 3 warm-up calls."""
    rows = [params] * logits.shape[0]
    for _ in range(3):
        sample(logits, rows, generators, seen_mask=seen, valid_vocab_size=VALID)
    start = time.perf_counter()
    for _ in range(repeats):
        sample(logits, rows, generators, seen_mask=seen, valid_vocab_size=VALID)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--scales", type=float, nargs="+", default=[6.0, 3.0, 2.5, 1.0])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"cpu": describe_cpu(), "threads": args.threads, "torch": torch.__version__}))
    params = SamplingParams(temperature=1.0, top_p=0.8, top_k=0, repetition_penalty=1.1)
    gen = torch.Generator().manual_seed(0)
    for batch in args.batches:
        for scale in args.scales:
            logits = torch.randn(batch, VOCAB, generator=gen) * scale
            seen = build_seen_mask(torch.randint(0, VOCAB, (batch, CONTEXT), generator=gen), VOCAB)
            generators = [make_generator(i, "cpu") for i in range(batch)]
            mass = logits.softmax(-1).sort(dim=-1, descending=True).values.cumsum(-1)
            nucleus = int((mass < 0.8).sum(-1).float().mean()) + 1  # ids the top-p 0.8 nucleus holds, row mean
            ms = time_sample(logits, seen, generators, params, args.repeats)
            print(json.dumps({"batch": batch, "scale": scale, "nucleus_ids": nucleus, "ms_per_step": round(ms, 2)}))


if __name__ == "__main__":
    main()
