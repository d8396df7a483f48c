"""Kernel-set dispatch with faked CPU flags (so the AVX-512 and AMX machines' choices are tested on any machine),
QWENKIT_ISA / QWENKIT_REQUIRE_EXT / QWENKIT_DISABLE_EXT, and a compile check of the sets this CPU cannot run.

Running each set's kernels against the reference is tests/test_kernels.py's job (every set the CPU executes).
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig

import pytest
import torch

from qwenkit.kernels import cpu, isa

V3 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe", "sse4_2"}
ZEN2 = frozenset(V3)  # AMD EPYC Zen 2/3: AVX2 only
ZEN5 = frozenset(V3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"})
SPR = ZEN5 | {"amx_bf16", "amx_int8", "amx_tile", "avx_vnni"}  # Sapphire Rapids
SKYLAKE_X = frozenset(V3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"})  # AVX-512 without VNNI/BF16
OLD = frozenset({"avx", "sse4_2"})  # Sandy Bridge: no AVX2


@pytest.mark.parametrize(
    "flags, best",
    [
        (SPR, "avx512"),
        (ZEN5, "avx512"),
        (ZEN2, "avx2"),
        (SKYLAKE_X, "avx2"),
        (OLD, None),
        (frozenset(), None),
    ],
)
def test_best_set_from_flags(flags, best):
    assert isa.choose_kernel_set(flags, machine="x86_64") == best
    assert isa.runnable_sets(flags, "x86_64")[:1] == ([best] if best else [])


def test_avx512_machine_also_runs_avx2():
    assert isa.runnable_sets(SPR, "x86_64") == ["avx512", "avx2"]


def test_other_architectures_have_no_set():
    assert isa.runnable_sets(SPR, "aarch64") == []
    assert isa.choose_kernel_set(SPR, machine="aarch64") is None
    with pytest.raises(ValueError, match="aarch64"):
        isa.choose_kernel_set(SPR, "avx2", machine="aarch64")


def test_override_lower_set_and_none():
    assert isa.choose_kernel_set(SPR, "avx2", machine="x86_64") == "avx2"
    assert isa.choose_kernel_set(SPR, " AVX512 ", machine="x86_64") == "avx512"
    assert isa.choose_kernel_set(SPR, "none", machine="x86_64") is None


def test_override_the_cpu_cannot_run_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"QWENKIT_ISA=avx512: this CPU lacks avx512f.*avx512_bf16; it can run avx2, none"
    ):
        isa.choose_kernel_set(ZEN2, "avx512", machine="x86_64")
    with pytest.raises(ValueError, match="lacks avx512_vnni, avx512_bf16"):
        isa.choose_kernel_set(SKYLAKE_X, "avx512", machine="x86_64")
    with pytest.raises(ValueError, match="not a kernel set; use one of avx512, avx2 or none"):
        isa.choose_kernel_set(ZEN5, "sse2", machine="x86_64")


def test_native_bf16_gemm_flags():
    assert isa.native_bf16_gemm(SPR) and isa.native_bf16_gemm(ZEN5)
    assert not isa.native_bf16_gemm(ZEN2) and not isa.native_bf16_gemm(SKYLAKE_X)


def test_int16_dot_fast_flags():
    """The avx2 set's int16 prefill GEMM: on cores with AVX-VNNI (Alder Lake+, an AVX-512 VNNI machine forced
    to avx2), not on AMD Zen 2/3 (vpmaddwd no faster than the FMA there) nor AVX-512 without VNNI."""
    alder_lake = frozenset(V3 | {"avx_vnni"})
    assert isa.int16_dot_fast(alder_lake) and isa.int16_dot_fast(SPR) and isa.int16_dot_fast(ZEN5)
    assert not isa.int16_dot_fast(ZEN2) and not isa.int16_dot_fast(SKYLAKE_X) and not isa.int16_dot_fast(OLD)


def test_describe_names_cpu_flags_and_set():
    line = isa.describe(ZEN5, "avx512")
    assert "avx2" in line and "avx512_bf16" in line and "amx" not in line and line.endswith("kernels: avx512")
    assert isa.describe(OLD, None).endswith("kernels: PyTorch")


# ---------------------------------------------------------------- cpu.kernel_set with faked flags and builds


@pytest.fixture
def fake_builds(monkeypatch):
    """cpu.ops_for replaced: `builds` names the sets whose build succeeds; nothing is compiled or loaded."""
    builds: set[str] = set()
    monkeypatch.setattr(cpu, "ops_for", lambda name: object() if name in builds else None)
    monkeypatch.setattr(isa, "is_x86", lambda machine=None: True)
    return builds


def _resolve(override, flags):
    return cpu._resolve.__wrapped__(override, flags)  # uncached


def test_kernel_set_takes_best_that_builds(fake_builds):
    fake_builds.update({"avx512", "avx2"})
    assert _resolve(None, SPR) == "avx512"
    assert _resolve(None, ZEN2) == "avx2"
    fake_builds.discard("avx512")  # e.g. a compiler without -mavx512bf16
    assert _resolve(None, ZEN5) == "avx2"
    fake_builds.clear()
    assert _resolve(None, ZEN5) is None


def test_explicit_set_does_not_fall_back(fake_builds):
    fake_builds.add("avx2")
    assert _resolve("avx512", SPR) is None  # asked for avx512, it did not build: no silent avx2
    assert _resolve("avx2", SPR) == "avx2"
    with pytest.raises(ValueError, match="lacks"):
        _resolve("avx512", ZEN2)


def test_env_controls(monkeypatch):
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    assert cpu.kernel_set() is None and not cpu.available()
    monkeypatch.setenv(cpu.DISABLE_ENV, "0")
    monkeypatch.setenv(isa.ISA_ENV, "none")
    assert cpu.kernel_set() is None
    if "avx512" not in isa.runnable_sets(isa.cpu_flags()):
        monkeypatch.setenv(isa.ISA_ENV, "avx512")
        with pytest.raises(ValueError, match="QWENKIT_ISA=avx512"):
            cpu.kernel_set()


def test_kernel_set_scope_reads_the_environment_once(monkeypatch):
    """Inside the scope (each model forward) the set chosen when it began holds; outside, every call reads the
    environment again, so QWENKIT_DISABLE_EXT / QWENKIT_ISA changes take effect at the next forward."""
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    monkeypatch.setenv(isa.ISA_ENV, "none")
    with cpu.kernel_set_scope() as kset:
        assert kset is None
        monkeypatch.setenv(cpu.DISABLE_ENV, "0")
        monkeypatch.setenv(isa.ISA_ENV, "avx2" if "avx2" in isa.runnable_sets(isa.cpu_flags()) else "none")
        assert cpu.kernel_set() is None  # not read again inside
        with cpu.kernel_set_scope() as inner:  # nested: resolves from the outer scope's choice
            assert inner is None
        assert cpu.kernel_set() is None
    monkeypatch.setenv(isa.ISA_ENV, "none")
    assert cpu.kernel_set() is None
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    monkeypatch.delenv(isa.ISA_ENV)
    with cpu.kernel_set_scope():
        pass
    assert cpu.kernel_set() is None  # the scope left nothing behind


def test_kernel_set_scope_is_per_thread(monkeypatch):
    import threading

    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    seen = []
    with cpu.kernel_set_scope():
        monkeypatch.setenv(cpu.DISABLE_ENV, "0")
        monkeypatch.setenv(isa.ISA_ENV, "none")
        # Another thread sees no scope: it reads the environment (here: still no set, through QWENKIT_ISA).
        worker = threading.Thread(target=lambda: seen.append(cpu._SCOPED_SET.get()))
        worker.start()
        worker.join()
        assert cpu._SCOPED_SET.get() == (None,)
    assert seen == [None]


def test_unrunnable_set_is_never_loaded():
    """Loading a set the CPU cannot execute would crash the process (SIGILL in its static initializers)."""
    for name in isa.BY_NAME:
        if name not in isa.runnable_sets(isa.cpu_flags()):
            with pytest.raises(ValueError, match="cannot run on this CPU"):
                cpu.ops_for(name)


def test_require_ext_raises_on_build_failure(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu.REQUIRE_ENV, "1")
    if not isa.runnable_sets(isa.cpu_flags()):
        pytest.skip("no kernel set for this CPU")
    name = isa.runnable_sets(isa.cpu_flags())[0]
    monkeypatch.setattr(cpu, "_SOURCES", [tmp_path / "missing.cpp"])
    monkeypatch.setattr(cpu, "_source_digest", lambda name: "missing")  # its own build dir, not the real one
    with pytest.raises(
        RuntimeError, match=f"QWENKIT_REQUIRE_EXT is set but the {name} CPU kernels did not build"
    ):
        cpu.ops_for.__wrapped__(name)


@pytest.mark.parametrize(
    "flags, rates, override, use_bf16",
    [
        (ZEN2, None, None, False),  # emulated bf16
        (SKYLAKE_X, None, None, False),
        (SPR, None, None, True),  # AMX
        (SPR, (40.0, 80.0), None, True),  # AMX does not go through vdpbf16ps
        (ZEN5, (170.0, 85.0), None, True),  # vdpbf16ps at twice the FMA's MAC rate
        (ZEN5, (43.0, 85.0), None, False),  # the Intel VM without AMX: half of it
        (ZEN5, (85.0, 85.0), None, True),
        (ZEN5, (70.0, 85.0), None, True),  # close to the FMA's: timing noise must not flip it
        (ZEN5, (60.0, 85.0), None, False),
        (ZEN5, None, None, True),  # not measured: trust the hardware
        (ZEN5, (0.0, 85.0), None, True),
        (ZEN5, (170.0, 85.0), "fp32", False),
        (ZEN2, None, " BF16 ", True),  # forced, even where emulated
    ],
)
def test_bf16_gemm_choice(flags, rates, override, use_bf16):
    use, why = isa.bf16_gemm_choice(flags, rates, override)
    assert use is use_bf16 and why
    if rates and rates[0] > 0 and not override and "amx_bf16" not in flags:
        assert f"{rates[0]:.0f} vs fp32 FMA {rates[1]:.0f}" in why


def test_bf16_gemm_choice_rejects_unknown_override():
    with pytest.raises(ValueError, match=r"QWENKIT_GEMM_DTYPE='fp16': use bf16 or fp32"):
        isa.bf16_gemm_choice(ZEN5, None, "fp16")


@pytest.mark.parametrize("flags", [ZEN5, ZEN2])
def test_float_linear_dtype_rows(monkeypatch, flags):
    """fp32 GEMMs win: a native bf16 GEMM still takes the inputs too small to pay for converting the weight."""
    monkeypatch.setattr(isa, "cpu_flags", lambda: flags)
    monkeypatch.setenv(isa.GEMM_DTYPE_ENV, "fp32")
    few = torch.bfloat16 if flags is ZEN5 else torch.float32
    assert cpu.float_linear_dtype(torch.bfloat16, cpu.FP32_TILES_MIN_ROWS - 1) == few
    assert cpu.float_linear_dtype(torch.bfloat16, cpu.FP32_TILES_MIN_ROWS) == torch.float32
    assert cpu.float_linear_dtype(torch.float32, 1) == torch.float32
    monkeypatch.setenv(isa.GEMM_DTYPE_ENV, "bf16")
    assert cpu.float_linear_dtype(torch.bfloat16, 4096) == torch.bfloat16


def test_gemm_dtype(monkeypatch):
    assert cpu.gemm_dtype(torch.float32) == torch.float32
    for forced, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        monkeypatch.setenv(isa.GEMM_DTYPE_ENV, forced)
        assert cpu.gemm_dtype(torch.bfloat16) == dtype
    monkeypatch.delenv(isa.GEMM_DTYPE_ENV)
    flags = isa.cpu_flags()
    if not isa.native_bf16_gemm(flags):
        assert cpu.gemm_dtype(torch.bfloat16) == torch.float32
    kset = cpu.kernel_set()
    if kset is not None:  # the probe the choice is made from: both rates positive where measured
        bf16, fma = cpu.ops_for(kset).dot_rates()
        assert fma > 0 and (bf16 > 0) == (kset == "avx512")


# ---------------------------------------------------------------- every set compiles, also those this CPU cannot run


@pytest.mark.skipif(shutil.which("c++") is None or not isa.is_x86(), reason="needs an x86-64 C++ compiler")
@pytest.mark.parametrize("name", [n for n in isa.BY_NAME if n not in isa.runnable_sets(isa.cpu_flags())])
def test_other_kernel_sets_compile(name, tmp_path):
    """The sets this machine cannot execute still compile (the others are built and run by test_kernels.py).
    The kernel sources only: ops.cpp holds no instruction-set code and takes the longest to compile."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    for src in [p for p in cpu._SOURCES if p.name != "ops.cpp"]:
        cmd = ["c++", "-std=c++17", "-c", "-fPIC", "-O0", abi, *cpu._CFLAGS, *isa.BY_NAME[name].cflags, *includes,
               str(src), "-o", str(tmp_path / (src.stem + ".o"))]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]


def test_model_forward_runs_in_one_kernel_set_scope(make_tiny_model, monkeypatch):
    """Every kernel call of a forward sees the scope the model opened (one environment read per forward)."""
    model = make_tiny_model()
    seen = []
    real = cpu.rms_norm
    monkeypatch.setattr(cpu, "rms_norm", lambda *a, **k: seen.append(cpu._SCOPED_SET.get()) or real(*a, **k))
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    assert len(seen) == 2 * model.config.num_hidden_layers + 1  # ln_1, ln_2 per block, ln_f
    assert all(s is not None for s in seen) and len(set(seen)) == 1
    assert cpu._SCOPED_SET.get() is None  # closed after the forward
