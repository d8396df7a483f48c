"""`qwenkit bench`: the model card's speed and memory profile, on CPU or CUDA.

Speed: tokens/s of generating N tokens after a 1-token context (greedy, never stopping early), and prefill
tokens/s over a prompt of P tokens. Memory: peak while encoding 2048 tokens (and generating one), and while
generating at the end of an 8192-token context; each memory case runs in a fresh process so its peak is its own.
Without a model it benchmarks a full-size synthetic Qwen-1.8B checkpoint, created once in a cache directory.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generation.generate import TokenGenerator
from .generation.sampling import SamplingParams
from .kernels import describe_cpu
from .model.transformer import QWenLMHeadModel
from .quant import weight_precision

ENCODE_TOKENS = 2048
GENERATE_CONTEXT = 8192


@dataclass
class BenchResult:
    model: str
    device: str
    dtype: str
    quantize: str | None
    threads: int
    gen_tokens: int
    prompt_tokens: int
    decode_tok_s: list[float] = field(default_factory=list)
    prefill_tok_s: list[float] = field(default_factory=list)
    peak_encode_gb: float | None = None
    peak_generate_gb: float | None = None
    cpu: str = ""  # CPU model, relevant flags and the qwenkit kernel set (CPU runs)
    kv_cache: str | None = None  # the KV cache kind (None: the default, fp32 on CPU)

    @property
    def decode_median(self) -> float:
        return statistics.median(self.decode_tok_s)

    @property
    def prefill_median(self) -> float:
        return statistics.median(self.prefill_tok_s)


def default_checkpoint(cache_dir: Path | None = None) -> Path:
    """The full-size synthetic 1.8B bf16 checkpoint, created on first use (about 3.7 GB, 20-60 s)."""
    from .checkpoints.synthetic import make_checkpoint

    root = cache_dir or Path(os.environ.get("QWENKIT_CACHE", Path.home() / ".cache" / "qwenkit"))
    path = root / "synthetic-qwen-1_8b-bf16"
    if not (path / "config.json").is_file():
        print(f"Creating the synthetic 1.8B checkpoint in {path} (once) ...", file=sys.stderr)
        make_checkpoint(path, preset="1.8b", dtype="bfloat16", seed=0, overwrite=True)
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_decode(model: QWenLMHeadModel, n_tokens: int, valid_vocab: int) -> float:
    """Tokens/s of the decode steps that follow a 1-token prompt (the prefill step is not counted)."""
    params = SamplingParams(temperature=0, max_new_tokens=n_tokens + 1)
    gen = TokenGenerator(model, [[100]], params, valid_vocab_size=valid_vocab)
    device = model.device
    gen.step()  # prefill + first token
    _sync(device)
    start = time.perf_counter()
    for _ in range(n_tokens):
        gen.step()
    _sync(device)
    return n_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def measure_prefill(model: QWenLMHeadModel, n_tokens: int) -> float:
    """Tokens/s of one prefill pass over `n_tokens` tokens into a fresh cache (logits of the last one only)."""
    device = model.device
    ids = torch.randint(0, 151000, (1, n_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    cache = model.new_cache(1, n_tokens)
    last = torch.tensor([n_tokens - 1], device=device)
    _sync(device)
    start = time.perf_counter()
    model(ids, cache=cache, ntk_alpha=model.ntk_alpha(n_tokens), output_index=last)
    _sync(device)
    return n_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def _memory_case(model: QWenLMHeadModel, case: str) -> None:
    device = model.device
    if case == "encode":  # encode 2048 tokens as context and generate one token
        gen = TokenGenerator(model, [[100] * ENCODE_TOKENS], SamplingParams(temperature=0, max_new_tokens=1),
                             valid_vocab_size=151851)  # fmt: skip
        gen.step()
    else:  # the last steps of generating 8192 tokens: a full cache, attention over every position
        cache = model.new_cache(1, GENERATE_CONTEXT)
        alpha = model.ntk_alpha(1)
        for pos in range(GENERATE_CONTEXT - 8, GENERATE_CONTEXT):
            model(torch.tensor([[100]], device=device), torch.tensor([[pos]], device=device), cache, alpha)
    _sync(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA, else the peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _load(
    model: str, dtype: str, device: str, quantize: str | None, kv_cache: str | None = None
) -> QWenLMHeadModel:
    from .checkpoints.loading import load

    kwargs: dict[str, Any] = {"dtype": dtype, "device": device, "progress": False, "kv_cache_dtype": kv_cache}
    if quantize:
        kwargs["quantize"] = quantize
    return load(model, **kwargs)[0]


def run_memory_case(
    model: str,
    dtype: str,
    device: str,
    quantize: str | None,
    threads: int,
    case: str,
    kv_cache: str | None = None,
) -> float:
    """Run one memory case in a fresh interpreter and return its peak (GB)."""
    code = (
        "import json, sys, torch; from qwenkit import bench\n"
        f"torch.set_num_threads({threads})\n"
        f"m = bench._load({model!r}, {dtype!r}, {device!r}, {quantize!r}, {kv_cache!r})\n"
        f"bench._memory_case(m, {case!r})\n"
        "print(json.dumps(bench.peak_memory_gb(m.device)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory case {case!r} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def run_bench(
    model: str | None = None,
    *,
    dtype: str = "bfloat16",
    device: str = "auto",
    quantize: str | None = None,
    gen_tokens: int = 256,
    prompt_tokens: int = 512,
    runs: int = 3,
    threads: int | None = None,
    memory: bool = True,
    kv_cache: str | None = None,
) -> BenchResult:
    """Load once, measure decode and prefill `runs` times each, then the two memory cases."""
    if gen_tokens < 1 or prompt_tokens < 1 or runs < 1:
        raise ValueError("--gen, --prompt-len and --runs must be positive integers")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    path = str(model) if model else str(default_checkpoint())
    net = _load(path, dtype, device, quantize, kv_cache)
    dev = net.device
    result = BenchResult(path, str(dev), str(net.dtype).replace("torch.", ""), weight_precision(net), threads,
                         gen_tokens, prompt_tokens)  # fmt: skip
    result.kv_cache = kv_cache
    if dev.type == "cpu":
        result.cpu = describe_cpu()
    measure_decode(net, min(gen_tokens, 8), 151851)  # warm-up (allocator, oneDNN primitives)
    measure_prefill(net, min(prompt_tokens, 64))
    for _ in range(runs):
        result.decode_tok_s.append(measure_decode(net, gen_tokens, 151851))
        result.prefill_tok_s.append(measure_prefill(net, prompt_tokens))
    del net
    if memory:
        result.peak_encode_gb = run_memory_case(path, dtype, device, quantize, threads, "encode", kv_cache)
        result.peak_generate_gb = run_memory_case(
            path, dtype, device, quantize, threads, "generate", kv_cache
        )
    return result


def format_result(r: BenchResult) -> str:
    """The model card's two tables (speed, memory) for one configuration, in markdown."""
    name = f"{r.dtype}" + (f" + {r.quantize}" if r.quantize else "")
    mem_unit = "GPU memory" if r.device.startswith("cuda") else "peak RSS"
    lines = [
        f"Model: {r.model} on {r.device}, {r.threads} threads; medians of {len(r.decode_tok_s)} runs",
        *([f"CPU: {r.cpu}"] if r.cpu else []),
        *([f"KV cache: {r.kv_cache}"] if r.kv_cache else []),
        "",
        f"| Precision | Speed, generating {r.gen_tokens} tokens (tokens/s) | Prefill {r.prompt_tokens} tokens (tokens/s) |",
        "|---|---|---|",
        f"| {name} | {r.decode_median:.2f} | {r.prefill_median:.1f} |",
    ]
    if r.peak_encode_gb is not None:
        lines += [
            "",
            f"| Precision | {mem_unit}: encoding {ENCODE_TOKENS} tokens | {mem_unit}: generating {GENERATE_CONTEXT} tokens |",
            "|---|---|---|",
            f"| {name} | {r.peak_encode_gb:.2f} GB | {r.peak_generate_gb:.2f} GB |",
        ]
    return "\n".join(lines)


def write_json(r: BenchResult, path: str) -> None:
    data = {**asdict(r), "decode_median": r.decode_median, "prefill_median": r.prefill_median}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
