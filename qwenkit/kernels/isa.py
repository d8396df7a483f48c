"""Which C++ kernel set this CPU can run, and which one to use: pure functions of the CPU's flags.

A kernel set is one compilation of the same sources in `csrc/` for one instruction set (see `csrc/simd.h`).
`choose_kernel_set` picks the best set the flags allow, or the one `QWENKIT_ISA` names; the flags are an
argument so that the dispatch of other CPUs can be tested anywhere. Building and calling the kernels is left to
`qwenkit.kernels.cpu`.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

ISA_ENV = "QWENKIT_ISA"  # avx512 | avx2 | none: force a kernel set (none: the PyTorch paths)


@dataclass(frozen=True)
class KernelSet:
    name: str
    flags: tuple[str, ...]  # /proc/cpuinfo flags the compiled code needs
    cflags: tuple[str, ...]  # compiler flags of this set (the define selects it in csrc/simd.h)
    chunk_k: dict[int, int]  # bits -> k per weight vector load of the GEMV: K must be a multiple


# Best first. x86-64-v3 = AVX2, FMA, F16C, BMI1/2, LZCNT (abm), MOVBE; v4 adds AVX-512 F/BW/CD/DQ/VL.
KERNEL_SETS = (
    KernelSet(
        "avx512",
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx2", "fma", "f16c"),
        ("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-DQK_ISA_AVX512"),
        {8: 32, 4: 64},
    ),
    KernelSet(
        "avx2",
        ("avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe"),
        ("-march=x86-64-v3", "-DQK_ISA_AVX2"),
        {8: 16, 4: 32},
    ),
)
BY_NAME = {s.name: s for s in KERNEL_SETS}
# Flags that make oneDNN's bf16 GEMM native (else PyTorch emulates it, ~0.01 TFLOP/s on 2 Zen 2/3 cores).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Flags worth naming in benchmark tables.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                  "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")  # fmt: skip


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of this CPU from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), or the platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def missing_flags(kernel_set: str, flags: frozenset[str]) -> list[str]:
    return [f for f in BY_NAME[kernel_set].flags if f not in flags]


def runnable_sets(flags: frozenset[str], machine: str | None = None) -> list[str]:
    """Kernel sets this CPU can execute, best first (none on other architectures)."""
    if not is_x86(machine):
        return []
    return [s.name for s in KERNEL_SETS if not missing_flags(s.name, flags)]


def choose_kernel_set(
    flags: frozenset[str], override: str | None = None, machine: str | None = None
) -> str | None:
    """The kernel set to use: `override` (a QWENKIT_ISA value) if given, else the best runnable one; None means
    the PyTorch paths. ValueError for an unknown name or a set this CPU cannot execute."""
    runnable = runnable_sets(flags, machine)
    name = (override or "").strip().lower()
    if not name:
        return runnable[0] if runnable else None
    if name == "none":
        return None
    if name not in BY_NAME:
        raise ValueError(
            f"{ISA_ENV}={override!r} is not a kernel set; use one of {', '.join(BY_NAME)} or none"
        )
    if name not in runnable:
        why = (
            f"lacks {', '.join(missing_flags(name, flags))}"
            if is_x86(machine)
            else f"is {machine or platform.machine()}"
        )
        choices = ", ".join([*runnable, "none"])
        raise ValueError(f"{ISA_ENV}={name}: this CPU {why}; it can run {choices}")
    return name


def native_bf16_gemm(flags: frozenset[str]) -> bool:
    """True when PyTorch's bf16 matrix multiply runs on bf16 hardware (AVX512-BF16 or AMX) here."""
    return any(f in flags for f in NATIVE_BF16_FLAGS)


GEMM_DTYPE_ENV = "QWENKIT_GEMM_DTYPE"  # bf16 | fp32: the GEMM dtype of bf16 activations (prefill), forced
# fp32 GEMMs only where vdpbf16ps clearly loses: its MAC rate below this share of the FMA's. The measured classes
# sit far from it (0.5 on the Intel Xeon VM without AMX; bf16's halved bytes win at ~1), so timing noise between
# processes cannot flip the choice (and with it the rounding of prefill) on one machine.
BF16_GEMM_MIN_RATE = 0.75


def bf16_gemm_choice(
    flags: frozenset[str], dot_rates: tuple[float, float] | None, override: str | None = None
) -> tuple[bool, str]:
    """(run bf16 GEMMs in bf16, why). Without AMX, oneDNN's bf16 GEMM is bound by vdpbf16ps, whose multiply-add
    rate against the fp32 FMA differs 4x between CPUs (`dot_rates`: one thread's MACs/ns of each, measured by the
    kernels; None where they are not built): bf16 unless it is below BF16_GEMM_MIN_RATE of the FMA's (bf16 also
    halves the bytes), else fp32 tiles of the weight. `override` (a QWENKIT_GEMM_DTYPE value) wins; ValueError
    for another value."""
    name = (override or "").strip().lower()
    if name:
        if name not in ("bf16", "fp32"):
            raise ValueError(f"{GEMM_DTYPE_ENV}={override!r}: use bf16 or fp32")
        return name == "bf16", f"{GEMM_DTYPE_ENV}={name}"
    if not native_bf16_gemm(flags):
        return False, "no bf16 hardware: PyTorch would emulate the bf16 GEMM"
    if "amx_bf16" in flags:
        return True, "AMX"
    if dot_rates is None or dot_rates[0] <= 0:
        return True, "AVX512-BF16 (vdpbf16ps rate not measured)"
    bf16, fma = dot_rates
    return bf16 >= BF16_GEMM_MIN_RATE * fma, (
        f"vdpbf16ps {bf16:.0f} vs fp32 FMA {fma:.0f} multiply-adds/ns per thread: {bf16 / fma:.2f}x, "
        f"fp32 below {BF16_GEMM_MIN_RATE:g}x"
    )


def int16_dot_fast(flags: frozenset[str]) -> bool:
    """True where the avx2 set's int16 dot (vpmaddwd + vpaddd) outruns the fp32 FMA enough for its int16 GEMM
    to beat dequantize + fp32 GEMM at prefill. Taken from the flags, not timed: a timing probe of vpmaddwd +
    vpaddd against the FMA gave ratios of 0.99-1.47 between processes on one VM, which would flip the choice (and
    the rounding of prefill) between runs. AVX-VNNI marks the cores where it pays (Intel since Alder Lake / Sapphire
    Rapids: the GEMM measured 1.2-1.45x the dequantize + MKL fp32 path on an Intel Xeon VM with the avx2 set);
    AMD Zen 2/3 (no AVX-VNNI) measured vpmaddwd at 0.95x the FMA's multiply-add rate, and Haswell runs it on one
    port. (On the avx512 set, vpdpwssd is one instruction for twice the FMA's products: always.)"""
    return "avx_vnni" in flags or "avx512_vnni" in flags


def describe(flags: frozenset[str], kernel_set: str | None) -> str:
    """One line for logs and benchmark tables: the CPU, its relevant flags and the kernel set in use."""
    have = [f for f in REPORTED_FLAGS if f in flags]
    return f"{cpu_model()}; flags: {' '.join(have) or 'none of ' + '/'.join(REPORTED_FLAGS[:3])}; kernels: {kernel_set or 'PyTorch'}"
