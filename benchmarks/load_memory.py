"""Peak memory and time of `qwenkit.load()` on a full-size synthetic Qwen-1.8B checkpoint (CPU).

Builds the checkpoint once (bf16, official two-shard layout) into CACHE_DIR, then runs each case in a fresh
subprocess so every peak RSS (VmHWM) is that case's own. Prints a markdown table; --json also writes the rows.

    python benchmarks/load_memory.py ~/.cache/qwenkit-bench [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3
CASES = ("bfloat16", "float32")


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmHWM = peak RSS, VmRSS = current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _child_build(ckpt: Path) -> dict:
    from qwenkit.checkpoints.synthetic import make_checkpoint

    start = time.perf_counter()
    make_checkpoint(ckpt, "1.8b", dtype="bfloat16", overwrite=True)  # redo a broken build
    return {
        "case": "build 1.8b bf16",
        "seconds": time.perf_counter() - start,
        "peak_rss": _status_bytes("VmHWM"),
    }


def _child_load(ckpt: Path, dtype: str) -> dict:
    import torch

    from qwenkit.checkpoints.loading import load

    baseline = _status_bytes("VmRSS")  # interpreter + torch + qwenkit, before any weight is read
    start = time.perf_counter()
    net, _ = load(ckpt, dtype=dtype, device="cpu", progress=False)
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    with torch.no_grad():  # a forward pass proves the weights are usable and adds its own (small) activations
        net(torch.tensor([[9707, 11, 1879]]))
    return {
        "case": f"load as {dtype}",
        "seconds": seconds,
        "peak_rss": _status_bytes("VmHWM"),
        "baseline_rss": baseline,
        "weights": weights,
    }


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"measuring {' '.join(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    lines = [
        "| case | time (s) | peak RSS (GiB) | RSS before load (GiB) | weights (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r['seconds']:.1f}", f"{r['peak_rss'] / GIB:.2f}"]
        cells += [f"{r[k] / GIB:.2f}" if k in r else "-" for k in ("baseline_rss", "weights")]
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "cache_dir", type=Path, nargs="?", help="where the synthetic 1.8B checkpoint is built (once)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # inside a measured subprocess: one case, result as the last stdout line
        kind, ckpt, *rest = args.child
        result = _child_build(Path(ckpt)) if kind == "build" else _child_load(Path(ckpt), rest[0])
        print(json.dumps(result))
        return

    if args.cache_dir is None:
        parser.error("CACHE_DIR is required")
    ckpt = args.cache_dir / "qwen-1.8b-bf16"
    rows = []
    if not (ckpt / "model.safetensors.index.json").is_file():  # the index is written last
        rows.append(_run_child("build", str(ckpt)))
    rows += [_run_child("load", str(ckpt), dtype) for dtype in CASES]
    print(f"qwenkit load() on {ckpt} ({platform.machine()}, {platform.python_version()}, CPU)\n")
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
