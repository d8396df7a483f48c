"""Top-1 agreement of weight-only int8 / int4 (and bf16) logits with fp32 logits of the same checkpoint.

Loads the checkpoint once per case through `qwenkit.load` (int8/int4 quantized weight by weight while reading) and
runs the same random token sequences (`--seqs` x `--seq-len` positions) through each; reports, per case, the share
of positions whose argmax equals the fp32 argmax, the share whose argmax is in the fp32 top-5, and the mean KL
divergence from the fp32 distribution. Without -m a synthetic random checkpoint (official layout, bf16) is written
once into CACHE_DIR. Random weights give flat next-token distributions (small top-1 margins), so they flip more
argmaxes than a trained model would: treat the figures as a lower bound.

    python benchmarks/quant_accuracy.py [-m MODEL_DIR] [--cache-dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from qwenkit.checkpoints.loading import load
from qwenkit.checkpoints.synthetic import make_checkpoint
from qwenkit.quant import Int4Linear, Int8Linear, target_linears

# Not trivial, still quick on 2 cores: 8 layers of width 1024 (both ffn and hidden widths divide by 128).
SYNTHETIC = {
    "num_hidden_layers": 8,
    "hidden_size": 1024,
    "num_attention_heads": 8,
    "kv_channels": 128,
    "intermediate_size": 5632,
}
CASES = (  # (name, compute dtype, quantize)
    ("bf16", "bfloat16", None),
    ("int8", "float32", "int8"),
    ("int4", "float32", "int4"),
    ("int8 + bf16 compute", "bfloat16", "int8"),
    ("int4 + bf16 compute", "bfloat16", "int4"),
)


def synthetic_checkpoint(cache_dir: Path) -> Path:
    path = cache_dir / "quant-accuracy-1024x8-bf16"
    if not (path / "config.json").is_file():
        make_checkpoint(path, "tiny", dtype="bfloat16", seed=0, overrides=SYNTHETIC, overwrite=True)
    return path


@torch.no_grad()
def logits_of(model_dir: Path, dtype: str, quantize: str | None, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load(model_dir, dtype=dtype, device="cpu", quantize=quantize, progress=False)
    out = torch.cat([model(row[None]) for row in ids])  # [S, T, V] fp32, one sequence at a time
    del model
    return out.flatten(0, 1)  # [positions, V]


@torch.no_grad()
def weight_errors(model_dir: Path) -> dict[str, float]:
    """Relative RMS error ||W - deq(q(W))|| / ||W|| over all quantized linears, per scheme (independent of how
    flat the model's predictions are)."""
    model, _ = load(model_dir, dtype="float32", device="cpu", progress=False)
    errors = {}
    for scheme, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
        num = den = 0.0
        for name in target_linears(model):
            w = model.get_submodule(name).weight
            num += (w - cls.from_linear(model.get_submodule(name)).dequantize()).pow(2).sum().item()
            den += w.pow(2).sum().item()
        errors[scheme] = (num / den) ** 0.5
    return errors


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    top1 = reference.argmax(-1)
    top5 = reference.topk(5, dim=-1).indices
    pred = logits.argmax(-1)
    log_p = reference.log_softmax(-1)
    kl = (log_p.exp() * (log_p - logits.log_softmax(-1))).sum(-1)
    return {
        "top1_agreement": (pred == top1).float().mean().item(),
        "in_reference_top5": (pred[:, None] == top5).any(-1).float().mean().item(),
        "mean_kl": kl.mean().item(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-m", "--model", default=None, help="checkpoint directory (default: synthetic, see above)"
    )
    parser.add_argument(
        "--cache-dir", default=str(Path.home() / ".cache" / "qwenkit"), help="for the synthetic one"
    )
    parser.add_argument("--seqs", type=int, default=4, help="number of sequences (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args(argv)

    model_dir = Path(args.model) if args.model else synthetic_checkpoint(Path(args.cache_dir))
    ids = torch.randint(
        0, 151643, (args.seqs, args.seq_len), generator=torch.Generator().manual_seed(args.seed)
    )
    start = time.perf_counter()
    reference = logits_of(model_dir, "float32", None, ids)
    rows = []
    for name, dtype, quantize in CASES:
        row = {"case": name, **compare(reference, logits_of(model_dir, dtype, quantize, ids))}
        rows.append(row)
        print(f"  {name}: done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    top2 = reference.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).median().item()
    confidence = reference.softmax(-1).amax(-1).mean().item()
    print(f"{model_dir} — {ids.numel()} positions, reference: fp32 weights and compute")
    print(
        f"fp32 reference: mean top-1 probability {confidence:.2e}, median top-1/top-2 logit margin {margin:.3f}\n"
    )
    errors = weight_errors(model_dir)
    for r in rows:
        r["weight_rel_rms_error"] = errors.get(r["case"].split()[0])  # None for bf16
    print("| case | top-1 agreement | argmax in fp32 top-5 | mean KL (nats) | weight rel. RMS error |")
    print("|---|---|---|---|---|")
    for r in rows:
        err = "-" if r["weight_rel_rms_error"] is None else f"{r['weight_rel_rms_error']:.2%}"
        top1, top5, kl = r["top1_agreement"], r["in_reference_top5"], r["mean_kl"]
        print(f"| {r['case']} | {top1:.2%} | {top5:.2%} | {kl:.2e} | {err} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": str(model_dir), "positions": ids.numel(), "rows": rows})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
