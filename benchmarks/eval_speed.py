"""Questions/s of `qwenkit eval --task mmlu` (batched) against a serial `model.chat` loop (the official way).

The serial loop calls `model.chat` without prefix reuse between questions, as the official remote-code model
does (qwenkit's own `model.chat` would reuse the shared system prompt and instruction).

Writes MMLU-shaped fixture questions (the real data cannot be downloaded here), loads the model once per
precision, runs the serial loop and the batched runner on the same questions with the same greedy settings,
and prints q/s, the speed-up and how many responses agree. Run it alone (heavy):

    flock /tmp/qwenkit-heavy.lock python benchmarks/eval_speed.py -m /work/ckpt/1.8b --threads 2
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from qwenkit.checkpoints.loading import load
from qwenkit.eval import evaluate
from qwenkit.eval.runner import eval_settings

WORDS = "the of a which following is true statement group element order field ring prime number set".split()


def write_mmlu(root: Path, n: int, seed: int = 0) -> None:
    """`n` questions in the official MMLU layout, about as long as real ones (~40-word question)."""
    rng = random.Random(seed)
    (root / "test").mkdir(parents=True)
    with open(root / "test" / "abstract_algebra_test.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        for _ in range(n):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "?"
            options = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(4)]
            writer.writerow([question, *options, rng.choice("ABCD")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--precisions", nargs="+", default=["bf16", "int4"])
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "mmlu")
        write_mmlu(data, args.questions)
        for precision in args.precisions:
            quantize = precision if precision in ("int8", "int4") else None
            model, tokenizer = load(args.model, dtype="bfloat16", quantize=quantize)
            model.chat(tokenizer, "warm up", history=None, **eval_settings(2))  # first-call costs
            result, _ = evaluate(
                model, tokenizer, "mmlu", data_dir=data, subjects=["abstract_algebra"], out_dir=Path(tmp, precision),
                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False,
            )  # fmt: skip
            records = [
                json.loads(line) for line in open(Path(tmp, precision, "mmlu", "abstract_algebra.jsonl"))
            ]
            start = time.perf_counter()
            serial = {
                r["id"]: model.chat(  # no prefix reuse between questions: the official model.chat
                    tokenizer,
                    r["prompt"],
                    history=None,
                    prefix_cache=False,
                    **eval_settings(args.max_new_tokens),
                )[0]
                for r in records
            }
            serial_s = time.perf_counter() - start
            same = sum(serial[r["id"]] == r["response"] for r in records)
            row = {
                "precision": precision, "questions": len(records), "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size, "threads": args.threads,
                "batched_qps": result.questions_per_second, "serial_qps": len(records) / serial_s,
                "speedup": result.questions_per_second * serial_s / len(records), "same_responses": same,
            }  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)
            del model
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
