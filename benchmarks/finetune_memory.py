"""Peak RSS and seconds per optimizer step of `qwenkit.train` on the full-size synthetic Qwen-1.8B (CPU), batch 1:
LoRA on the bf16 checkpoint and Q-LoRA on its int4 copy, at sequence lengths 256 and 512 (the model card's table).

Each configuration runs in a fresh subprocess, so its peak RSS (that child's `getrusage` ru_maxrss) is its
own: load, a few optimizer steps of one full-length row (grad accumulation 1, the official LoRA settings
otherwise, gradient checkpointing on) and saving the adapter. s/step is the mean over the steps after the first.
Full finetuning is not run when it cannot fit: fp32 weights, gradients and AdamW's two moments need 16 bytes
per parameter.

    python benchmarks/finetune_memory.py --bf16 /work/ckpt/1.8b --int4 /work/ckpt/1.8b-int4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
TARGETS_GB = {("lora", 256): 6.7, ("qlora", 256): 5.8}  # the model card's A100 figures (issue 13)
CARD = {  # the card's A100 figures (GB, s/step; bs 1, accum 8) for the same lengths
    ("lora", 256): (6.7, 1.0), ("lora", 512): (7.4, 1.0), ("qlora", 256): (5.8, 1.4), ("qlora", 512): (6.0, 1.4),
}  # fmt: skip
FULL_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq


class _StepClock:
    """A stream for `train(stream=...)`: the time each progress line ("step N/M ...") is written."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def write(self, text: str) -> None:
        if text.lstrip("\r").startswith("step "):
            self.times.append(time.perf_counter())

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _child(method: str, ckpt: str, seq_len: int, steps: int, threads: int) -> dict:
    import torch

    from qwenkit.train.loop import train
    from qwenkit.train.setup import TrainConfig, load_for_training

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, _ = load_for_training(ckpt, method, device="cpu")
    loaded = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150_000, (steps, seq_len), generator=gen, dtype=torch.int32)
    data = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    config = TrainConfig(
        method=method,
        max_len=seq_len,
        epochs=1,
        batch_size=1,
        grad_accum=1,
        max_steps=steps,
        save_steps=10**9,
    )
    clock = _StepClock()
    with tempfile.TemporaryDirectory() as out:
        begin = time.perf_counter()
        result = train(model, data, config, out, base_model=ckpt, stream=clock)
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    return {
        "method": method,
        "seq_len": seq_len,
        "steps": result.steps,
        "load_s": loaded - start,
        "first_step_s": clock.times[0] - begin,
        "s_per_step": sum(gaps) / len(gaps) if gaps else clock.times[0] - begin,
        "losses": result.losses,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
    }


def _run(method: str, ckpt: Path, seq_len: int, steps: int, threads: int) -> dict:
    """One configuration in a fresh process (so the peak RSS it reports is its own)."""
    cmd = [sys.executable, __file__, "--child", method, str(ckpt), str(seq_len), str(steps), str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{method} @ {seq_len} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    """lscpu's model name (with family / model, which tell AMD generations apart) and the vector extensions that
    decide qwenkit's kernels."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name, family, model = (fields.get(k, "?").strip() for k in ("Model name", "CPU family", "Model"))
    flags = set(re.findall(r"\b(avx2|avx512\w*|amx\w*)\b", Path("/proc/cpuinfo").read_text()))
    listed = " ".join(sorted(flags)) or "-"
    return f"{name} (family {family} model {model}), {os.cpu_count()} cores; flags: {listed}"


def _ram_bytes() -> int:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


def _table(rows: list[dict], params: int, threads: int) -> str:
    lines = [
        "| method | base weights | seq len | peak RSS | target | s/step | first step (s) | card (A100) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        key = (r["method"], r["seq_len"])
        target = TARGETS_GB.get(key)
        mark = "" if target is None else (" (met)" if r["peak_rss"] / GB <= target else " (missed)")
        card = CARD.get(key)
        cells = [
            "LoRA" if r["method"] == "lora" else "Q-LoRA",
            "bf16" if r["method"] == "lora" else "int4 (qwenkit, g128)",
            str(r["seq_len"]),
            f"{r['peak_rss'] / GB:.2f} GB",
            f"<= {target} GB{mark}" if target else "-",
            f"{r['s_per_step']:.1f}",
            f"{r['first_step_s']:.1f}",
            f"{card[0]} GB, {card[1]} s" if card else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    need, ram = params * FULL_BYTES_PER_PARAM / GB, _ram_bytes() / GB
    lines.append(
        f"| full | fp32 | 256, 512 | not run: weights, grads and AdamW alone are {need:.1f} GB, the machine has "
        f"{ram:.1f} GB | - | - | - | 43.5 GB, 2.1 s |"
    )
    trainable = rows[0]["trainable"] if rows else 0
    return "\n".join(lines) + (
        f"\n\nBatch 1, gradient accumulation 1, gradient checkpointing, r 64 / alpha 16 / dropout 0.05 on "
        f"c_attn, c_proj, w1, w2 ({trainable / 1e6:.1f} M fp32 trainable), AdamW; {threads} threads; peak RSS in "
        "GB = 10^9 bytes over the whole process (load, steps, saving the adapter); s/step = mean of the steps "
        "after the first. The card's rows are an A100 (bs 1, accum 8) for comparison of scale only."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bf16", type=Path, default=Path("/work/ckpt/1.8b"), help="the bf16 1.8B checkpoint")
    parser.add_argument(
        "--int4", type=Path, default=Path("/work/ckpt/1.8b-int4"), help="its `qwenkit quantize` int4 copy"
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, ckpt, seq_len, steps, threads = args.child
        print(json.dumps(_child(method, ckpt, int(seq_len), int(steps), int(threads))))
        return
    from qwenkit.model.config import QwenConfig
    from qwenkit.model.transformer import QWenLMHeadModel

    config = QwenConfig.from_file(args.bf16 / "config.json")
    params = sum(p.numel() for p in QWenLMHeadModel(config, device="meta").parameters())
    rows = []
    for method in args.methods:
        for seq_len in args.seq_lens:
            rows.append(
                _run(method, args.bf16 if method == "lora" else args.int4, seq_len, args.steps, args.threads)
            )
            print(f"{method} @ {seq_len}: {rows[-1]['peak_rss'] / GB:.2f} GB, {rows[-1]['s_per_step']:.1f} s/step",
                  file=sys.stderr, flush=True)  # fmt: skip
    print(f"qwenkit finetuning, synthetic Qwen-1.8B ({params / 1e9:.2f} B parameters), CPU: {cpu_name()}\n")
    print(_table(rows, params, args.threads))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
